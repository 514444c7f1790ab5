"""The built-in demo scene: what `python -m runtime` answers about when no --image is given, and
what the examples and tests use. PIL only, so the car can draw it too."""

from __future__ import annotations


def demo_image(width: int = 640, height: int = 480):
    """A synthetic road scene (sky, road, lane marks, a red car), drawn deterministically."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (135, 180, 235))
    draw = ImageDraw.Draw(img)
    horizon = height * 9 // 20
    draw.rectangle([0, horizon, width, height], fill=(90, 140, 70))
    draw.polygon([(width * 0.42, horizon), (width * 0.58, horizon), (width, height), (0, height)], fill=(70, 70, 75))
    for i in range(6):
        y0 = horizon + (height - horizon) * i / 6
        y1 = y0 + (height - horizon) / 14
        draw.rectangle([width / 2 - 2 - i, y0, width / 2 + 2 + i, y1], fill=(240, 240, 240))
    draw.rectangle([width * 0.55, height * 0.62, width * 0.72, height * 0.78], fill=(200, 30, 30))
    draw.rectangle([width * 0.57, height * 0.58, width * 0.70, height * 0.64], fill=(160, 20, 20))
    return img
