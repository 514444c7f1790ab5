"""ONNX graph helpers shared by the INT8 (calib.quantize) and INT4 (calib.int4) passes."""

from __future__ import annotations

from runtime.errors import LladaVError


class QuantizationError(LladaVError):
    """A graph cannot take the asked quantization, or the result breaks TensorRT's Q/DQ rules."""


def weight_matmuls(model) -> tuple[list, list]:
    """(MatMuls with a constant weight, the others) of an ONNX model proto."""
    consts = {t.name for t in model.graph.initializer}
    mm = [n for n in model.graph.node if n.op_type == "MatMul"]
    return [n for n in mm if n.input[1] in consts], [n for n in mm if n.input[1] not in consts]


def lm_head_nodes(model, vocab: int) -> list[str]:
    """Names of the MatMuls whose weight maps to the vocabulary (the LM head): kept in float."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    weighted, _ = weight_matmuls(model)
    return [n.name for n in weighted if dims[n.input[1]][-1:] == [vocab]]
