"""The built-in demo scene: what `python -m runtime` answers about when no --image is given, and
what the examples and tests use. A held-out driving scene of the miniature's task
(miniature/scenes.py: numpy and PIL only, so the car can draw it too)."""

from __future__ import annotations

DEMO_SEED = 10_000_000  # the first held-out scene: its answers are in the miniature's test set


def demo_image(width: int = 640, height: int = 360):
    """The demo driving scene drawn at width x height (the miniature was trained at 640x360)."""
    from miniature.scenes import TEST_SEEDS, scene

    assert DEMO_SEED in TEST_SEEDS
    return scene(DEMO_SEED, (width, height)).image
