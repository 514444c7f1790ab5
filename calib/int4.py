"""INT4 weight-only (W4A16) of the decoder's linear layers, as TensorRT takes it.

    quantize_int4(src, dst, vocab, block=128)     # an fp16 graph -> the same graph with INT4 weights

Every MatMul with a constant weight W (in, out), except the LM head, gets an INT4 initializer of the
same shape and a DequantizeLinear(axis=0, block_size=128) with one float16 scale per block of 128
input rows and output column (scale shape (in / 128, out)): symmetric, scale = max |W_block| / 7,
values round(W / scale) clipped to [-8, 7], no zero point (0). Activations stay fp16. The graph's
opset becomes 21, the first with INT4 and blocked DequantizeLinear; the ops the exporter emits
(opset 19/20) mean the same at 21. Round to nearest here; activation-aware scales (AWQ) fold into
the weights before this step (calib.smooth's folding, alpha searched per layer).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from calib.graph import QuantizationError, lm_head_nodes, weight_matmuls
from runtime.errors import expect

INT4_OPSET = 21
QMAX = 7


MIN_BLOCK = 16


def weight_block(rows: int, block: int) -> int:
    """The block of a weight with `rows` input rows: the scheme's `block` where it divides them (the
    8B's 4096 and 12288 rows), else the largest power of two from MIN_BLOCK up that does (a checkpoint
    of another width: 352 rows -> 32). TensorRT's support for blocks under 128 is unverified."""
    if rows % block == 0:
        return block
    b = block // 2
    while b >= MIN_BLOCK and rows % b:
        b //= 2
    expect(b >= MIN_BLOCK, f"INT4: a weight with {rows} input rows has no block of {MIN_BLOCK}..{block} rows "
                           f"(a power of two) that divides them; expected a multiple of {MIN_BLOCK}")
    return b


def blocked_int4(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """W (in, out) -> (q int8 in [-8, 7] of W's shape, scales (in / b, out) float32), b = weight_block(in, block)."""
    rows, cols = w.shape
    block = weight_block(rows, block)
    blocks = w.astype(np.float32).reshape(rows // block, block, cols)
    scale = np.abs(blocks).max(axis=1) / QMAX  # (in / block, out)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float16).astype(np.float32)  # what the graph will hold
    q = np.clip(np.rint(blocks / scale[:, None, :]), -8, 7).astype(np.int8)
    return q.reshape(rows, cols), scale


def quantize_int4(src: Path, dst: Path, vocab: int, block: int = 128) -> dict:
    """src (+ .data) -> dst (+ .data): the decoder linears INT4 weight-only. Returns counts."""
    import ml_dtypes
    import onnx
    from onnx import helper, numpy_helper

    from export.onnx_export import consolidate_external_data

    model = onnx.load(str(src), load_external_data=True)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise QuantizationError(f"{src.name}: already holds Q/DQ nodes; expected a float graph to quantize")
    weighted, _ = weight_matmuls(model)
    keep = set(lm_head_nodes(model, vocab))
    inits = {t.name: t for t in model.graph.initializer}
    new_nodes, done = [], 0
    for node in model.graph.node:
        if node in weighted and node.name not in keep:
            w = numpy_helper.to_array(inits[node.input[1]])
            q, scale = blocked_int4(w, block)
            rows_block = weight_block(w.shape[0], block)
            qname, sname, out = f"{node.input[1]}_int4", f"{node.input[1]}_int4_scale", f"{node.input[1]}_dq"
            model.graph.initializer.append(numpy_helper.from_array(q.astype(ml_dtypes.int4), qname))  # packed, 2 per byte
            model.graph.initializer.append(numpy_helper.from_array(scale.astype(w.dtype), sname))
            new_nodes.append(helper.make_node("DequantizeLinear", [qname, sname], [out], name=f"{node.name}_dq", axis=0,
                                              block_size=rows_block))
            node.input[1] = out
            done += 1
        new_nodes.append(node)
    expect(done > 0, f"{src.name}: no linear layer to quantize")
    used = {i for n in new_nodes for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = INT4_OPSET
    model.ir_version = max(model.ir_version, 10)  # INT4 needs IR 10
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        raw = Path(tmp) / "int4.onnx"
        onnx.save_model(model, str(raw), save_as_external_data=True, location="int4.onnx.data")
        consolidate_external_data(raw, dst, edit=_stamp_int4)
    return {"linear_layers": done, "kept_float": sorted(keep)}


def _stamp_int4(model) -> None:
    for p in model.metadata_props:
        if p.key == "lladav.precision":
            p.value = "int4"
