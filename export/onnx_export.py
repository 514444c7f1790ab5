"""Export one subgraph to ONNX (weights as external data), then validate it right away.

Validation, each failure a typed error: the output names match the spec; the ops are on the
TensorRT ONNX parser's list and none makes shapes data-dependent; ONNX Runtime matches the
PyTorch module within the spec's tolerance at two sizes of every dynamic axis (which also
proves those axes dynamic); an exported decoder is still bidirectional.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from export.subgraphs import VISION as VISION_SPEC
from export.subgraphs import SubgraphSpec, dummy_inputs, export_patches, model_dims
from runtime.backends.ort import ort_session
from runtime.bundle import FLOAT_DTYPES
from runtime.errors import LladaVError

OPS_FILE = Path(__file__).with_name("trt_onnx_ops.txt")
DATA_DEPENDENT_OPS = {"NonZero", "Unique", "NonMaxSuppression", "Compress", "Loop", "If", "Scan"}
DEFAULT_OPSET = 18  # TensorRT 10.3 parses opsets 17-20 (docs/tensorrt.md)
EXTERNAL_THRESHOLD = 1024  # bytes: initializers at least this large go to the .data file
ALIGN = 64


class ExportError(LladaVError):
    """An exported graph failed a check (subclasses say which)."""


class OutputNamesError(ExportError):
    pass


class UnsupportedOpError(ExportError):
    pass


class DataDependentShapeError(ExportError):
    pass


class ParityError(ExportError):
    pass


class DynamicAxisError(ExportError):
    pass


class CausalExportError(ExportError):
    pass


@dataclass
class ExportReport:
    name: str
    onnx: Path
    data: Path
    ops: dict = field(default_factory=dict)  # op type -> count
    checks: dict = field(default_factory=dict)  # "axis sizes" -> {output: {"max_abs_diff", "allowed"}}
    seconds: float = 0.0


# ---------------------------------------------------------------- export


def export_onnx(spec: SubgraphSpec, module: torch.nn.Module, cfg, precision: str, dst: Path,
                example_axes: dict, opset: int = DEFAULT_OPSET, identity: dict | None = None,
                k: int | None = None) -> Path:
    """torch.onnx.export (TorchScript exporter) at `opset` -> dst + dst.data; `identity` becomes the
    graph's metadata_props (runtime.bundle.graph_identity); k: the pruning layer (K/V layer counts)."""
    feeds = dummy_inputs(spec, cfg, example_axes, FLOAT_DTYPES[precision], k=k)
    args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with export_patches(), torch.inference_mode(), warnings.catch_warnings():
            # the TorchScript exporter is deprecated upstream but emits plain opset 17-20 graphs with
            # dynamic_axes and no extra dependency; tracer warnings concern static head sizes
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                module, args, str(raw), input_names=spec.input_names, output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(), opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        consolidate_external_data(raw, dst, edit=lambda m: stamp(m, spec, cfg, identity or {}, k))
    return dst


def stamp(model, spec: SubgraphSpec, cfg, identity: dict, k: int | None = None) -> None:
    stamp_io_dims(model, spec, cfg, k)
    for key, value in identity.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value


def stamp_io_dims(model, spec: SubgraphSpec, cfg, k: int | None = None) -> None:
    """Graph inputs/outputs carry the spec's dims: numbers for model dims, names for dynamic axes."""
    dims = model_dims(cfg, k)
    tensors = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        t = tensors.get(value.name)
        if t is None:
            continue
        shape = value.type.tensor_type.shape
        for d, want in zip(shape.dim, t.dims):
            if isinstance(want, int) or want in dims:
                d.Clear()
                d.dim_value = want if isinstance(want, int) else dims[want]
            else:
                d.Clear()
                d.dim_param = want


def consolidate_external_data(src: Path, dst: Path, edit=None) -> None:
    """Rewrite src (weights inline or one file per tensor, as the exporter left them past 2 GB)
    as dst + one dst.data file, streaming tensor by tensor; `edit(model)` may touch the graph."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(src), load_external_data=False)
    data_path = dst.with_name(dst.name + ".data")
    offset = 0
    with open(data_path, "wb") as out:
        for tensor in _initializers(model):
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                with open(src.parent / info.location, "rb") as f:
                    f.seek(info.offset or 0)
                    blob = f.read(info.length) if info.length else f.read()
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
                blob = tensor.raw_data
            else:
                continue
            pad = (-offset) % ALIGN
            out.write(b"\0" * pad)
            offset += pad
            out.write(blob)
            _point_to(tensor, data_path.name, offset, len(blob))
            offset += len(blob)
    if edit is not None:
        edit(model)
    onnx.save_model(model, str(dst))


def _point_to(tensor, location: str, offset: int, length: int) -> None:
    import onnx

    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


def _initializers(model):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t


# ---------------------------------------------------------------- checks


def supported_ops() -> set[str]:
    lines = OPS_FILE.read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def check_graph(path: Path, spec: SubgraphSpec) -> dict:
    """Names, op support, no data-dependent shapes. Returns op counts."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    outputs = [o.name for o in model.graph.output]
    if outputs != spec.output_names:
        raise OutputNamesError(f"{spec.name}: outputs {outputs}; expected {spec.output_names}")
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if inputs != spec.input_names:
        raise OutputNamesError(f"{spec.name}: inputs {inputs}; expected {spec.input_names}")
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(f"{spec.name}: op {node.domain}::{node.op_type} is outside the ONNX domain")
    dependent = sorted(set(ops) & DATA_DEPENDENT_OPS)
    if dependent:
        raise DataDependentShapeError(f"{spec.name}: ops {dependent} make shapes data-dependent; expected none")
    unsupported = sorted(set(ops) - supported_ops())
    if unsupported:
        raise UnsupportedOpError(f"{spec.name}: ops {unsupported} are not on TensorRT's ONNX parser list ({OPS_FILE.name})")
    return dict(sorted(ops.items()))


def check_parity(path: Path, spec: SubgraphSpec, module, cfg, precision: str, axes_list: list[dict],
                 session=None, k: int | None = None, reference=None, p: float = 50.0) -> dict:
    """ONNX Runtime on the graph against the PyTorch model, at each set of axis sizes, by the
    checkpoint's own noise at the graph's precision (export.yardstick); scores that choose tokens also
    by the kept set at P. reference: the module to compare with (default `module`; a test plants a
    fault in `module` only). Returns {axes: {output: check}}; raises ParityError past a bound."""
    from export.yardstick import NOISE_FACTOR, REFERENCE_DTYPE, decision_check, decision_rule, noise_check, run_module

    float_dtype = FLOAT_DTYPES[precision]
    reference = module if reference is None else reference
    report = {}
    session = session or ort_session(path)
    for i, axes in enumerate(axes_list):
        feeds = dummy_inputs(spec, cfg, axes, float_dtype, seed=i, k=k)
        got = dict(zip(spec.output_names, session.run(spec.output_names, feeds)))
        _check_shapes(spec, got, {**model_dims(cfg, k), **axes}, float_dtype)
        yard = run_module(reference, feeds, spec.input_names, spec.output_names)
        ref = run_module(reference, feeds, spec.input_names, spec.output_names, widen_to=REFERENCE_DTYPE[precision])
        key = ",".join(f"{a}={v}" for a, v in sorted(axes.items()))
        report[key] = {}
        for t in spec.outputs:
            check = noise_check(got[t.name], yard[t.name], ref[t.name], precision)
            report[key][t.name] = check
            if not np.isfinite(check["noise"]):  # the rule needs a finite yardstick
                raise ParityError(f"{spec.name}: output {t.name}: the model itself gives non-finite values at {precision} "
                                  f"(PyTorch, at {key}), so its {precision} noise cannot be measured; expected finite "
                                  "values (this checkpoint's activations overflow float16: build with --precision fp32)")
            if not check["max_abs_diff"] <= check["allowed"]:
                raise ParityError(f"{spec.name}: output {t.name} differs from the model by {check['max_abs_diff']:.3g} "
                                  f"at {key}; expected <= {check['rule']} = {check['allowed']:.3g}")
            if t.chooses:
                decided = decision_check(got[t.name], yard[t.name], ref[t.name], decision_rule(t.chooses, feeds, p))
                check.update(p=p, **{k: v for k, v in decided.items() if k != "first_moved"})
                if decided["moved"] > decided["allowed_moves"]:
                    raise ParityError(f"{spec.name}: output {t.name} keeps other tokens than the model at P={p:g}: "
                                      f"{decided['moved']} moved across the cut at {key}, first (row, token) "
                                      f"{decided['first_moved']}; expected <= {NOISE_FACTOR:g} x {decided['moved_yardstick']} "
                                      f"(PyTorch {precision}'s moves) + one per row = {decided['allowed_moves']:g}")
    return report


def _check_shapes(spec, outputs, dims, float_dtype):
    for t in spec.outputs:
        _, want = t.resolve(dims, float_dtype)
        got = tuple(np.asarray(outputs[t.name]).shape)
        if got != want:
            raise DynamicAxisError(f"{spec.name}: output {t.name} has shape {got} at {dims}; expected {want}")


MERGE_CHECK = "visual_tokens"  # the name of the vision + AnyRes merge check in a vision entry's validation


def merge_check_layout(geometry):
    """The image the merge check tiles: the fewest tiles (at most 8) whose grid is un-padded and, where
    the geometry shrinks grids that large, bilinearly shrunk; else the first that is un-padded."""
    from runtime.anyres import ANYRES, plan_tiles

    s = geometry.image_size
    plans = [plan_tiles((w * s // 4, h * s // 4), geometry, ANYRES) for w in range(5, 17) for h in range(2, 13)]
    plans = [pl for pl in plans if pl.num_tiles <= 9 and pl.grid[0] * pl.grid[1] > 1
             and pl.unpadded != (pl.grid[1] * geometry.side, pl.grid[0] * geometry.side)]
    shrunk = [pl for pl in plans if pl.merged != pl.unpadded]
    return min(shrunk or plans, key=lambda pl: (pl.num_tiles, pl.image_size))


def check_visual_tokens(path: Path, newline: np.ndarray, reference, cfg, precision: str, session=None) -> dict:
    """The car's image path against the model's: the vision graph on the tiles of a wide image, merged
    by the runtime (runtime.merge: un-padding, the shrink past anyres_max_N where the geometry allows
    one in a few tiles, and the checkpoint's image_newline after every grid row,
    as the bundle stores it) against LladaV.visual_tokens, by export.yardstick's rule. A newline that is
    missing or wrong fails here. Returns {"visual_tokens": check}."""
    from export.yardstick import REFERENCE_DTYPE, noise_check, widened
    from runtime.merge import merge_tiles

    layout = merge_check_layout(cfg.geometry)
    pixels = dummy_inputs(VISION_SPEC, cfg, {"tiles": layout.num_tiles}, FLOAT_DTYPES[precision], seed=3)["pixel_values"]
    session = session or ort_session(path)
    feats = session.run(["image_features"], {"pixel_values": pixels})[0]
    got = merge_tiles(feats, layout, newline)
    x = torch.from_numpy(pixels)
    with torch.no_grad():
        yard = reference.visual_tokens(x, layout)
        with widened(reference, REFERENCE_DTYPE[precision]):
            ref = reference.visual_tokens(x.to(REFERENCE_DTYPE[precision]), layout)
    if got.shape != tuple(ref.shape):
        raise ParityError(f"vision: {MERGE_CHECK}: the runtime's merge gives {got.shape[0]} tokens of width {got.shape[1]} "
                          f"for a {layout.image_size[0]}x{layout.image_size[1]} image; the model {tuple(ref.shape)}")
    check = noise_check(got, yard.double().numpy(), ref.double().numpy(), precision)
    if not check["max_abs_diff"] <= check["allowed"]:
        raise ParityError(f"vision: {MERGE_CHECK} (vision graph + AnyRes merge with the bundle's image_newline) differ "
                          f"from the model by {check['max_abs_diff']:.3g} on a {layout.grid[0]}x{layout.grid[1]} grid "
                          f"({layout.image_size[0]}x{layout.image_size[1]} pixels); "
                          f"expected <= {check['rule']} = {check['allowed']:.3g}")
    return {MERGE_CHECK: check}


def check_bidirectional(path: Path, spec: SubgraphSpec, cfg, precision: str, axes: dict, session=None,
                        k: int | None = None) -> float:
    """Perturb the last token's input; the first position's output must change."""
    float_dtype = FLOAT_DTYPES[precision]
    feeds = dummy_inputs(spec, cfg, axes, float_dtype, seed=7, k=k)
    x_name, out_name = spec.input_names[0], spec.output_names[0]
    if "logit_rows" in feeds:
        feeds["logit_rows"] = np.array([0], dtype=np.int64)
    sess = session or ort_session(path)
    base = sess.run([out_name], feeds)[0]
    feeds[x_name] = feeds[x_name].copy()
    feeds[x_name][:, -1] += 1.0
    moved = float(np.max(np.abs(sess.run([out_name], feeds)[0][:, 0].astype(np.float64) - base[:, 0])))
    if not moved > 1e-4:
        raise CausalExportError(f"{spec.name}: perturbing the last token moved position 0 by {moved:.2e}; "
                                "the exported decoder is not bidirectional")
    return moved


def export_and_validate(spec: SubgraphSpec, module, cfg, precision: str, dst: Path, axes_list: list[dict],
                        opset: int = DEFAULT_OPSET, identity: dict | None = None, k: int | None = None,
                        reference=None, p: float = 50.0) -> ExportReport:
    """Export to dst (+ .data), then run every check. A failed check removes the files. k: the
    pruning layer (the decoders' K/V tensors have one row per layer of their half); reference: what
    the graph must compute (default `module`); p: the bundle's P, at which token choices are checked."""
    import time

    start = time.perf_counter()
    try:
        export_onnx(spec, module, cfg, precision, dst, axes_list[0], opset, identity, k)
        report = ExportReport(spec.name, dst, dst.with_name(dst.name + ".data"))
        release_memory()  # the exporter's transient copies, before a session loads the weights again
        report.ops = check_graph(dst, spec)
        session = ort_session(dst)
        report.checks = check_parity(dst, spec, module, cfg, precision, axes_list, session, k, reference, p)
        if spec.name.startswith("decoder"):
            check_bidirectional(dst, spec, cfg, precision, axes_list[-1], session, k)
        del session
        release_memory()
    except Exception:
        for f in (dst, dst.with_name(dst.name + ".data")):
            if f.exists():
                os.remove(f)
        raise
    report.seconds = time.perf_counter() - start
    return report


@dataclass(frozen=True)
class GraphExport:
    """One subgraph's export with its state bound in one place: which graph (spec), of which model
    (cfg), split at K, at which float precision and opset, the identity it carries
    (runtime.bundle.graph_identity), the axis sizes it is validated at and the P its token choices
    are checked at. The export patches are the spec's (export.subgraphs.export_patches). The build
    (export.build.Builder) makes one per graph; calib/'s re-exports with folded scales go through it."""

    spec: SubgraphSpec
    cfg: object
    k: int
    precision: str  # the graph's float precision (fp16, fp32)
    opset: int
    identity: dict
    sizes: tuple  # validation axis sizes (export.profiles.VALIDATION_SIZES)
    p: float = 50.0

    def run(self, module, dst: Path, reference=None) -> ExportReport:
        """Export `module` (the spec's graph of some weights of this model) to dst, then validate it."""
        return export_and_validate(self.spec, module, self.cfg, self.precision, dst, list(self.sizes), self.opset,
                                   self.identity, self.k, reference, self.p)


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so stages do not stack up."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed memory is reused within the process instead


def copy_or_link(src: Path, dst: Path) -> None:
    """Hard-link when possible (GB-sized reuse costs nothing), copy otherwise."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
