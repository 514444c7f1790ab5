"""The bundle build's quantization stage: calibrate on the exported graphs, then quantize the decoders.

Runs inside the build's temporary bundle, after the float graphs (the quantized graphs' float
type: fp16, or fp32 with `float_precision`) are exported and validated and a provisional manifest
names them:

    1. record (or reuse) calibration data by running that bundle (calib.data)
    2. int8: SmoothQuant, int4: AWQ scales, folded into the checkpoint and the decoders re-exported
    3. per decoder graph (and vision, with `quantize_vision`): quantize (calib.quantize), then
       validate right away: TensorRT's op list, its Q/DQ rules, ONNX Runtime runs it, and its error
       against the float graph on the calibration feeds is recorded (typed errors; a failure leaves
       nothing behind); the entry's files, precision, op counts and `quantization` record are updated

The vision graph stays fp16 by default: one pass per image against 8-32 decoder passes per answer,
and W8A8 there doubles the step-1 logits error on the miniature (docs/quantization.md).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calib.data import CalibrationSettings, record_calibration
from calib.quantize import SCHEMES, QuantScheme, check_qdq, quantize
from runtime.backends.ort import ort_session
from runtime.bundle import Manifest, SubgraphEntry, file_info
from runtime.errors import expect

QUANTIZED_GRAPHS = ("decoder_pre", "decoder_post")
DEFAULT_DATA_ROOT = Path("bundles") / "calibration"
FLOAT_BASES = ("fp16", "fp32")


@dataclass(frozen=True)
class QuantSettings:
    scheme: QuantScheme
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    data_root: Path = DEFAULT_DATA_ROOT  # where calibration data is stored and reused, by key
    # the quantized graphs' float type: fp16 for TensorRT on Orin; fp32 for ONNX Runtime on x86 CPUs,
    # whose integer GEMM fusion takes float32 graphs only (fp16 runs through casts: docs/quantization.md)
    float_precision: str = "fp16"
    # int8 only: the vision tower W8A8 too (off by default: measured in docs/quantization.md)
    quantize_vision: bool = False

    def graphs(self) -> tuple[str, ...]:
        return ("vision",) + QUANTIZED_GRAPHS if self.quantize_vision else QUANTIZED_GRAPHS

    def validate(self) -> None:
        expect(self.float_precision in FLOAT_BASES, f"quantized graphs' float type: got {self.float_precision!r}; "
                                                   f"expected one of {FLOAT_BASES}")
        s = self.scheme
        expect(0 <= s.smooth_alpha < 1, f"smooth alpha: got {s.smooth_alpha!r}; expected a value in [0, 1) "
                                        "(SmoothQuant's migration strength; 0: off)")
        expect(not (s.smooth_alpha and s.awq_grid), f"{s.mode}: SmoothQuant (alpha {s.smooth_alpha}) and AWQ (grid "
                                                    f"{s.awq_grid}) both asked for; expected one (SmoothQuant for int8, AWQ for int4)")
        expect(s.awq_grid >= 0 and (not s.awq_grid or s.mode == "int4"),
               f"AWQ grid: got {s.awq_grid!r} for {s.mode}; expected 0 (off), or a count of alphas with int4")
        expect(not self.quantize_vision or s.mode == "int8",
               f"quantize vision: asked for with {s.mode}; expected int8 (W8A8 of the vision tower's linears)")
        self.calibration.validate()

    @staticmethod
    def for_mode(mode: str, **kw) -> "QuantSettings":
        expect(mode in SCHEMES, f"precision: {mode!r} has no quantization scheme; expected one of {tuple(SCHEMES)}")
        return QuantSettings(SCHEMES[mode], **kw)


def quantize_stage(tmp: Path, manifest: Manifest, q: QuantSettings, log, export_graph) -> dict[str, SubgraphEntry]:
    """The entries of `manifest` (a complete float bundle at `tmp`), their graphs quantized in place.
    export_graph(name, model, dst) -> ExportReport: the build's export-and-validate step
    (export.build.Builder.export_graph), which re-exports the decoders with folded scales."""
    data = record_calibration(tmp, q.calibration, q.data_root, log)
    data.check_for(manifest.model["content_hash"], manifest.k)
    out, folded, model = dict(manifest.subgraphs), {}, None
    if q.scheme.smooth_alpha or q.scheme.awq_grid:
        entries, folded, model = folded_graphs(tmp, manifest, data, q.scheme, log, export_graph)
        out.update(entries)
    if q.scheme.mode != "int4" and model is not None:
        model = None  # int8's graphs are not checked against a PyTorch model (activation Q/DQ: docs/export.md)
        from export.onnx_export import release_memory

        release_memory()
    for name in q.graphs():
        out[name] = quantize_entry(tmp, out[name], data, q.scheme, manifest.model["decoder"]["vocab"], log)
        if name in folded:
            out[name].quantization["awq"] = folded[name]
    if q.scheme.mode == "int4":
        out.update(int4_model_check(tmp, manifest, out, model, q.scheme, log))
    return out


def int4_model_check(tmp: Path, manifest: Manifest, entries: dict, model, scheme: QuantScheme, log) -> dict:
    """The int4 decoder graphs against the model they stand for: the float model (AWQ-folded, as the
    graphs were) with every decoder linear's weight rounded as calib.int4 stores it (calib.awq.fake_int4,
    the same blocks and float16 scales), by export.yardstick's rule: an int4 graph is a float graph of
    that model, so its checkpoint's noise at the graph's float type bounds it. Returns the entries with
    this as their validation (the float graphs' validation stays in quantization['float_validation'])."""
    import torch

    from calib.awq import fake_int4
    from export.checkpoint import load_model
    from export.onnx_export import check_parity, release_memory
    from export.profiles import VALIDATION_SIZES
    from export.subgraphs import SUBGRAPHS
    fp = manifest.float_precision
    if model is None:
        model, _ = load_model(Path(manifest.model["source"]), getattr(torch, manifest.float_dtype.name))
    with torch.no_grad():
        for block in model.model.layers:
            for lin in block.modules():
                if isinstance(lin, torch.nn.Linear):
                    lin.weight = torch.nn.Parameter(fake_int4(lin.weight, scheme.block).to(lin.weight.dtype),
                                                    requires_grad=False)
    out = {}
    for spec in (s for s in SUBGRAPHS if s.name in QUANTIZED_GRAPHS):
        entry = entries[spec.name]
        path = tmp / entry.onnx.path
        report = check_parity(path, spec, spec.build(model, manifest.k), model.cfg, fp, list(VALIDATION_SIZES),
                              ort_session(path, quantized=True, exact=True), manifest.k, p=manifest.p)
        worst = max((c for per in report.values() for c in per.values()), key=lambda c: c["max_abs_diff"] / c["allowed"])
        log(f"{spec.name}: int4 graph vs the model with int4-rounded weights: max |diff| {worst['max_abs_diff']:.2e} "
            f"<= {worst['allowed']:.2e} allowed")
        out[spec.name] = dataclasses.replace(entry, validation=report, quantization={
            **entry.quantization, "float_validation": entry.validation})
    del model
    release_memory()
    return out


def quantize_entry(tmp: Path, entry: SubgraphEntry, data, scheme: QuantScheme, vocab: int, log) -> SubgraphEntry:
    """One graph quantized and validated right away (op list, TensorRT's Q/DQ rules, ONNX Runtime runs it,
    error against the float graph), then put in the float graph's place; its entry updated."""
    from runtime.bundle import artifact_key
    from export.onnx_export import check_graph
    from export.subgraphs import SUBGRAPHS

    name, src = entry.name, tmp / entry.onnx.path
    work = src.parent / f".{scheme.mode}"  # same names as the float graph: the .onnx names its .data file
    work.mkdir(exist_ok=True)
    dst = work / src.name
    log(f"{name}: quantizing ({scheme.mode}: weights {scheme.weights}, activations {scheme.activations}) ...")
    unshare(src.with_name(src.name + ".data"))
    try:
        info = quantize(src, dst, data.feeds(name), scheme, vocab)
        ops = check_graph(dst, next(s for s in SUBGRAPHS if s.name == name))
        counts = check_qdq(dst, scheme)
        error = quantization_error(src, dst, data.feeds(name)[:8])
    except Exception:
        shutil.rmtree(work, ignore_errors=True)
        raise
    float_bytes = entry.data.bytes
    for suffix in ("", ".data"):  # the quantized graph takes the float graph's place
        os.replace(dst.with_name(dst.name + suffix), src.with_name(src.name + suffix))
    work.rmdir()
    spec = next(s for s in SUBGRAPHS if s.name == name)
    # engine vs ONNX Runtime on the same Q/DQ graph: the fixed quantized rule (export.subgraphs), unverified on a device
    new = dataclasses.replace(entry, onnx=file_info(tmp, src), data=file_info(tmp, src.with_name(src.name + ".data")),
                              ops=ops, precision=scheme.mode, tolerances=spec.tolerances_for(scheme.mode),
                              key=artifact_key(entry.key, data.meta["key"], sorted(scheme.to_dict().items())))
    new.quantization = {"scheme": scheme.to_dict(), "calibration": {"key": data.meta["key"], "counts": data.meta["counts"],
                                                                   "settings": data.meta["settings"]},
                        "quantized": counts, "kept_float": info["kept_float"], "weight_bytes": new.data.bytes,
                        "float_weight_bytes": float_bytes, "error_vs_float": error}
    worst = max(error.values(), key=lambda e: e["relative"])
    log(f"{name}: {counts['weights']} {scheme.mode} weights, {counts['activations']} activation Q/DQ; "
        f"weights {float_bytes / 2**20:.2f} -> {new.data.bytes / 2**20:.2f} MiB; max |quantized - float| "
        f"{worst['max_abs_diff']:.3g} ({worst['relative']:.2%} of max|float|) on {len(data.feeds(name)[:8])} calibration feeds")
    return new


def unshare(path: Path) -> None:
    """Give `path` a link of its own: a float graph reused from the previous bundle is hard-linked to it,
    and onnx refuses to load external data with several hard links ("potential hardlink attack")."""
    if path.stat().st_nlink > 1:
        tmp = path.with_name(path.name + ".own")
        shutil.copy2(path, tmp)
        os.replace(tmp, path)


def folded_graphs(tmp: Path, manifest: Manifest, data, scheme: QuantScheme, log,
                  export_graph) -> tuple[dict[str, SubgraphEntry], dict, object]:
    """The decoder graphs re-exported (and validated) from the checkpoint with per-channel scales
    folded into their weights, taken on the calibration feeds: SmoothQuant's migration (int8,
    calib.smooth) or AWQ's searched scales (int4, calib.awq). The graphs compute the same function,
    so the feeds recorded on the unscaled ones still hold. Returns the entries, for AWQ what the
    search chose per graph, and the folded model (at the graphs' float type)."""
    import torch

    from export.checkpoint import load_model
    from export.subgraphs import SUBGRAPHS

    model, _ = load_model(Path(manifest.model["source"]), torch.float32)
    k, n = manifest.k, manifest.n_layers
    spans = {"decoder_pre": range(0, k), "decoder_post": range(k, n)}
    specs = {s.name: s for s in SUBGRAPHS}
    chosen = {}
    for name, span in spans.items():
        blocks = {i: model.model.layers[i] for i in span}
        chosen[name] = fold_scales(specs[name].build(model, k), blocks, data.feeds(name), specs[name].input_names, scheme, log)
    fp = manifest.float_precision
    model = model.half() if fp == "fp16" else model
    out = {}
    for name in spans:
        entry = manifest.subgraphs[name]
        path = tmp / entry.onnx.path
        report = export_graph(name, model, path)
        out[name] = dataclasses.replace(entry, onnx=file_info(tmp, path), data=file_info(tmp, report.data),
                                        validation=report.checks, ops=report.ops)
    return out, {name: c for name, c in chosen.items() if c}, model


def fold_scales(module, blocks: dict, feeds: list[dict], names: list[str], scheme: QuantScheme, log) -> dict:
    """One decoder half's scales, measured on its calibration feeds and folded into `blocks` (in place)."""
    import torch

    if scheme.smooth_alpha:
        from calib.smooth import input_maxima, smooth

        log(f"SmoothQuant (alpha {scheme.smooth_alpha}): activation maxima of layers {min(blocks)}..{max(blocks)} ...")
        with torch.inference_mode():
            smooth(blocks, input_maxima(module, blocks, feeds, names), scheme.smooth_alpha)
        return {}
    from calib.awq import awq, group_inputs

    log(f"AWQ: searching the scales of layers {min(blocks)}..{max(blocks)} over {scheme.awq_grid} alphas ...")
    with torch.inference_mode():
        found = awq(blocks, group_inputs(module, blocks, feeds, names), scheme.block, scheme.awq_grid)
    log(f"AWQ: output error on the calibration rows {found['output_error_rtn']:.4g} (round to nearest) -> "
        f"{found['output_error_awq']:.4g}")
    return found


def quantization_error(float_path: Path, quant_path: Path, feeds: list[dict]) -> dict:
    """Per output, max |quantized - float| over the feeds and that relative to max |float|: what
    quantization costs, measured on what the graph really sees. ONNX Runtime runs both graphs."""
    a, b = ort_session(float_path), ort_session(quant_path, quantized=True)
    names = [o.name for o in a.get_outputs()]
    diff, scale = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for f in feeds:
        for n, x, y in zip(names, a.run(None, f), b.run(None, f)):
            x, y = x.astype(np.float64), y.astype(np.float64)
            diff[n] = max(diff[n], float(np.max(np.abs(x - y))))
            scale[n] = max(scale[n], float(np.max(np.abs(x))))
    return {n: {"max_abs_diff": diff[n], "relative": diff[n] / scale[n] if scale[n] else 0.0} for n in names}
