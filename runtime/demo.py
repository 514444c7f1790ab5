"""The built-in demo scene: what `python -m runtime` answers about when no --image is given, and
what the examples and tests use. The first held-out driving scene of the miniature's task
(miniature/scenes.py, seed DEMO_SEED), drawn at 640x360 and stored as `demo.png` beside this
file, so the car needs neither the miniature nor its scene generator (a test checks the file
against the generator, pixel for pixel)."""

from __future__ import annotations

from pathlib import Path

DEMO_SEED = 10_000_000  # the first held-out scene: its answers are in the miniature's test set
DEMO_PNG = Path(__file__).with_name("demo.png")


def demo_image(width: int = 640, height: int = 360):
    """The demo driving scene at width x height: as drawn at 640x360 (the miniature's training size),
    bicubically resized for other sizes (profiling and tests at camera resolutions)."""
    from PIL import Image

    with Image.open(DEMO_PNG) as img:
        image = img.convert("RGB")
    return image if image.size == (width, height) else image.resize((width, height), Image.BICUBIC)
