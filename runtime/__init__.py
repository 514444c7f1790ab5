"""The C++-free runtime that runs on the car.

This package must import without torch, transformers or TensorRT: it holds the pieces the
car needs (preprocessing, token ids and the chat template, the denoising schedule, the pruning
rules, the bundle reader, the split denoising loop) and the backends (runtime.backends), each
imported lazily.
"""

from runtime.errors import LladaVError

__all__ = ["LladaVError"]
