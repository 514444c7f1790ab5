"""The trained miniature LLaDA-V: its task (scenes with known answers), training and evaluation.

Its checkpoint, committed in the Hugging Face layout under `miniature/checkpoint/`, is the
project's embedded default model.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"


def embedded_checkpoint() -> Path:
    """The committed miniature checkpoint: what the entry points use without --model."""
    if not (CHECKPOINT / "config.json").is_file():
        from runtime.errors import LladaVError

        raise LladaVError(f"embedded model: {str(CHECKPOINT)!r} has no config.json; expected the committed "
                          "miniature checkpoint (restore it from git, or retrain: python -m miniature.train --seed 0)")
    return CHECKPOINT
