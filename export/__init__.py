"""Workstation side: LLaDA-V checkpoint -> PyTorch model -> ONNX subgraphs -> TensorRT engines.

Data flow: `checkpoint` reads/writes the Hugging Face layout (and `tiny` writes the embedded
default), `model` is the math, `reference` is the PyTorch reference generator with persistent
visual-token pruning that every later stage must match token for token.
"""
