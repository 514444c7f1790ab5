"""The one exception type the project raises at its boundaries.

Every message names the input, what was received and what was expected, so a deployment
engineer can fix the cause without reading our code.
"""


class LladaVError(Exception):
    """Bad input or a broken artifact: a checkpoint, an image, a setting, a bundle."""


def expect(condition: bool, message: str) -> None:
    """Raise LladaVError(message) unless condition holds (for user-facing checks)."""
    if not condition:
        raise LladaVError(message)
