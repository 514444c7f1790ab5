"""Quantize an exported decoder graph with ONNX Runtime's tooling, by TensorRT's rules.

    quantize_graph(src, dst, feeds, INT8)     # src: an fp16 graph at opset >= 19; feeds: calibration

INT8 (W8A8, the speed lever on Orin): the decoder's linear layers (every MatMul with a constant
weight) get per-channel symmetric INT8 weights (DequantizeLinear, axis 1: one scale per output
channel) and per-tensor symmetric INT8 activations (QuantizeLinear -> DequantizeLinear, scale
from the calibration feeds); every zero point is 0. Left in the graph's float type: the
attention MatMuls (q.k and p.v, which have no constant weight), softmax, RMSNorm, RoPE, the
saliency of layer K-1 and the LM head (its MatMul is excluded by name). MatMul outputs are not
re-quantized: TensorRT fuses DQ -> MatMul into an INT8 GEMM with a float output. The scales are
float16 in an fp16 graph, which ONNX allows from opset 19 (docs/quantization.md).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from calib.graph import QuantizationError, lm_head_nodes, weight_matmuls
from runtime.errors import expect


@dataclass(frozen=True)
class QuantScheme:
    """How one mode quantizes a graph (recorded in the bundle manifest per graph)."""

    mode: str  # int8 | int4
    weights: str  # e.g. "int8 per-channel symmetric"
    activations: str  # e.g. "int8 per-tensor symmetric" or "fp16"
    calibration: str = "minmax"  # ONNX Runtime CalibrationMethod: minmax | percentile | entropy
    percentile: float = 99.999  # with calibration = percentile
    smooth_alpha: float = 0.0  # SmoothQuant migration strength (calib.smooth); 0: off
    min_opset: int = 19  # of the exported float graph
    tool: str = "onnxruntime.quantization.quantize_static"
    block: int = 0  # blocked weights (int4): input rows per scale
    graph_opset: int = 0  # the quantized graph's opset, when the scheme needs a later one than the export's
    awq_grid: int = 0  # int4: activation-aware scales searched over this many alphas (calib.awq); 0: off

    def to_dict(self) -> dict:
        return asdict(self)


# alpha 0.8: on the miniature it gave the least step-1 logits error of 0 / 0.5 / 0.8 (docs/quantization.md)
INT8 = QuantScheme("int8", "int8 per-channel (output channel) symmetric", "int8 per-tensor symmetric", smooth_alpha=0.8)
INT4 = QuantScheme("int4", "int4 blocked (128 input rows per scale) symmetric, weight-only", "fp16 (not quantized)",
                   calibration="none", tool="calib.awq scales + calib.int4 (round to nearest)", block=128, graph_opset=21,
                   awq_grid=20)
SCHEMES = {"int8": INT8, "int4": INT4}


def quantize(src: Path, dst: Path, feeds: list[dict], scheme: QuantScheme, vocab: int) -> dict:
    """The scheme's quantizer: ONNX Runtime's static W8A8 for int8, calib.int4 for int4."""
    if scheme.mode == "int4":
        from calib.int4 import quantize_int4

        return quantize_int4(src, dst, vocab, scheme.block)
    return quantize_graph(src, dst, feeds, scheme, vocab)


class _Feeds:
    """ONNX Runtime's CalibrationDataReader contract over recorded feeds."""

    def __init__(self, feeds: list[dict]):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):  # some ORT versions call it between passes
        pass


def quantize_graph(src: Path, dst: Path, feeds: list[dict], scheme: QuantScheme, vocab: int) -> dict:
    """src (+ .data) -> dst (+ .data) quantized by `scheme`, calibrated on `feeds`. Returns what
    was quantized (counts) for the manifest."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    expect(0 <= scheme.smooth_alpha < 1, f"smooth alpha: got {scheme.smooth_alpha!r}; expected a value in [0, 1)")
    expect(bool(feeds), f"{src.name}: no calibration feeds; expected at least one (an empty calibration set)")
    model = onnx.load(str(src), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < scheme.min_opset:
        raise QuantizationError(f"{src.name}: opset {opset}; {scheme.mode} Q/DQ with float16 scales needs opset >= "
                                f"{scheme.min_opset}")
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise QuantizationError(f"{src.name}: already holds Q/DQ nodes; expected a float graph to quantize")
    weighted, attention = weight_matmuls(model)
    excluded = lm_head_nodes(model, vocab)
    expect(len(weighted) > len(excluded), f"{src.name}: no linear layer to quantize ({len(weighted)} weighted MatMuls)")
    # excluded by name: ORT's MatMulConstBOnly does not keep its QDQ quantizer off the attention MatMuls
    excluded_nodes = excluded + [n.name for n in attention]
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[scheme.calibration]
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        raw = Path(tmp) / "quantized.onnx"
        # DedicatedQDQPair: each linear layer gets its own Q -> DQ on its input, also where q/k/v
        # (gate/up) read the same tensor: TensorRT shares no Q/DQ pair between nodes
        quantize_static(
            str(src), str(raw), _Feeds(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
            nodes_to_exclude=excluded_nodes, calibrate_method=method, use_external_data_format=True,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True, "DedicatedQDQPair": True,
                           "OpTypesToExcludeOutputQuantization": ["MatMul"], "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                           "CalibPercentile": scheme.percentile},
        )
        from export.onnx_export import consolidate_external_data

        consolidate_external_data(raw, dst, edit=lambda m: _restamp(m, model, scheme.mode))
    return {"linear_layers": len(weighted) - len(excluded), "kept_float": excluded}


def _restamp(quantized, original, mode: str) -> None:
    """The quantized graph keeps the exported graph's identity, its precision now the mode's."""
    del quantized.metadata_props[:]
    for p in original.metadata_props:
        prop = quantized.metadata_props.add()
        prop.key, prop.value = p.key, (mode if p.key == "lladav.precision" else p.value)


# ---------------------------------------------------------------- TensorRT's Q/DQ rules


def check_qdq(path: Path, scheme: QuantScheme) -> dict:
    """TensorRT's explicit-quantization rules on a quantized graph: symmetric (every zero point 0);
    int8: weights per-channel INT8 on the output axis, activations per-tensor, one Q/DQ pair per
    consuming node; int4: weights INT4
    blocked along the input axis (axis 0, block_size), no activation Q/DQ. Returns counts."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    consts = {t.name: t for t in model.graph.initializer}
    counts = {"weights": 0, "activations": 0}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        scale = consts.get(node.input[1])
        if scale is None:
            raise QuantizationError(f"{path.name}: {node.name}'s scale is not a constant; TensorRT needs constant scales")
        if zero is not None:
            z = numpy_helper.to_array(zero)
            if z.dtype != np.int8 or np.any(z != 0):
                raise QuantizationError(f"{path.name}: {node.name} has zero point {z.dtype} {z.ravel()[:4]}...; "
                                        "TensorRT needs int8 zero points of 0 (symmetric)")
        s = numpy_helper.to_array(scale)
        if node.op_type == "DequantizeLinear" and node.input[0] in consts and scheme.block:
            _check_blocked(path, node, consts[node.input[0]], s, scheme.block)
            counts["weights"] += 1
        elif scheme.block:
            raise QuantizationError(f"{path.name}: {node.op_type} {node.name} on an activation; {scheme.mode} is weight-only")
        elif node.op_type == "DequantizeLinear" and node.input[0] in consts:  # a weight
            w = consts[node.input[0]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if w.data_type != onnx.TensorProto.INT8 or s.ndim != 1 or len(w.dims) != 2 or axis != 1 \
                    or s.size != w.dims[1]:
                raise QuantizationError(f"{path.name}: weight {node.input[0]} is not int8 per output channel (dims "
                                        f"{list(w.dims)}, scale shape {s.shape}, axis {axis})")
            counts["weights"] += 1
        elif s.ndim != 0:
            raise QuantizationError(f"{path.name}: activation {node.input[0]} has a scale of shape {s.shape}; "
                                    "expected per-tensor (a scalar)")
        elif node.op_type == "QuantizeLinear":
            counts["activations"] += 1
    expect(counts["weights"] > 0, f"{path.name}: no quantized weight found")
    _check_qdq_placement(path, model, consts)
    return counts


def _check_qdq_placement(path: Path, model, consts: dict) -> None:
    """One dedicated activation Q/DQ pair per consumer; attention MatMuls read no quantized input."""
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    weights = {n.output[0] for n in dqs if n.input[0] in consts}
    dq_out = {n.output[0] for n in dqs}
    attention = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weights | set(consts)]
    consumers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    shared = [n.name for n in dqs if n.input[0] not in consts and consumers.get(n.output[0], 0) > 1]
    if shared:
        raise QuantizationError(f"{path.name}: activation Q/DQ {shared[:3]} feed more than one node; expected a "
                                "dedicated Q/DQ pair per consumer (TensorRT shares none between nodes)")
    touched = [n.name for n in attention if set(n.input) & dq_out]
    if touched:
        raise QuantizationError(f"{path.name}: attention MatMuls {touched[:3]} read quantized inputs; expected them "
                                "in float (softmax(q.k) and p.v stay fp16/fp32)")


def _check_blocked(path: Path, node, w, s: np.ndarray, block: int) -> None:
    import onnx

    from calib.int4 import weight_block

    attrs = {a.name: a.i for a in node.attribute}
    rows, cols = w.dims
    block = weight_block(rows, block)
    if w.data_type != onnx.TensorProto.INT4 or attrs.get("axis") != 0 or attrs.get("block_size") != block \
            or s.shape != (rows // block, cols):
        raise QuantizationError(f"{path.name}: weight {node.input[0]} is not int4 blocked by {block} along its input rows "
                                f"(dims {list(w.dims)}, scale shape {s.shape}, attributes {attrs})")

