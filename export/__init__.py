"""Workstation side: LLaDA-V checkpoint -> PyTorch model -> ONNX subgraphs -> TensorRT engines.

Data flow: `checkpoint` reads/writes the Hugging Face layout (and `tiny` writes the embedded
default), `model` is the math, `reference` is the PyTorch reference generator with persistent
visual-token pruning that every later stage must match token for token.
"""

try:
    import torch  # noqa: F401
except ImportError as exc:  # the car's install has no torch; the workstation's export needs it
    raise ImportError("the export side (build_engines, generate, the pytorch backend) needs PyTorch and the "
                      "`export` extra: pip install torch==2.13.0 (see the README for CPU-only hosts) and "
                      "pip install -e '.[export]'") from exc
