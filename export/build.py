"""checkpoint -> bundle: ONNX subgraphs (validated), host tensors, manifest, engines or their commands.

Cheap checks run before any heavy work. The bundle is written in a temporary directory and
renamed into place when complete, so an interrupted run leaves nothing a later run mistakes for
complete. Artifacts of a previous bundle at the same place are reused when their cache key
(checkpoint content hash, subgraph, K, precision, opset, exporter source) matches and their
bytes are intact: a re-run with another P, or the same inputs, exports nothing again.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from export.checkpoint import TOKENIZER_FILES, Checkpoint, load_model, open_checkpoint
from export.engine_config import EngineBuildSettings, build_script, trtexec_command
from export.onnx_export import DEFAULT_OPSET, MERGE_CHECK, GraphExport, check_visual_tokens, copy_or_link
from runtime.checks import worst_check
from export.profiles import (VALIDATION_SIZES, ProfileSettings, axis_ranges, full_sequence_opt, input_shapes,
                             profile_ranges, settings_dict, validation_axes)
from export.subgraphs import SUBGRAPHS, SubgraphSpec
from export.yardstick import engine_tolerances
from runtime.bundle import (ENGINES, FLOAT_DTYPES, FileInfo, Manifest, SubgraphEntry, TensorInfo, artifact_key, device_engine,
                            device_engines, engine_problem, engine_provenance, file_info, graph_identity, read_manifest,
                            sha256_file, write_manifest)
from runtime.errors import LladaVError, expect
from runtime.files import atomic_directory, check_output_dir, output_lock
from runtime.pruning import DEFAULT_RULE, PruneSettings
from runtime.tokens import TextTokenizer

# what a build writes afresh every time: files of an earlier bundle under these are never carried over
# (another model's tokenizer files must not survive into the new bundle); everything else is kept
OWNED = ("onnx", "host", "tokenizer", "jetson", "manifest.json", "manifest.json.sha256")
# int8 / int4: fp16 graphs whose decoders calib/ quantizes (W8A8 Q/DQ; INT4 weight-only, blocked DQ)
PRECISIONS = ("fp16", "fp32", "int8", "int4")
QUANTIZED = ("int8", "int4")
# what an exported graph and its validation record depend on (repository paths): a change re-exports
SOURCES = ("export/model.py", "export/subgraphs.py", "export/onnx_export.py", "export/yardstick.py",
           "runtime/merge.py", "runtime/pruning.py")


@dataclass(frozen=True)
class BuildRequest:
    model_dir: Path
    out: Path
    k: int
    p: float
    precision: str = "fp16"
    profiles: ProfileSettings = field(default_factory=ProfileSettings)
    opset: int | None = None  # None: DEFAULT_OPSET, or the quantization scheme's minimum
    engines: str = "auto"  # auto: build where TensorRT and a GPU exist; skip; require
    clean: bool = False  # delete the old bundle's stale engines instead of keeping them
    quant: "QuantSettings | None" = None  # quantized precisions: scheme and calibration (None: the mode's defaults)
    force: bool = False  # replace a bundle of another model at `out`
    rule: str = DEFAULT_RULE  # the pruning rule the runtime uses unless told otherwise (runtime.pruning.RULES)

    @property
    def float_precision(self) -> str:
        """The exported graphs' float type: quantized bundles are fp16 (or, asked for, fp32) graphs with
        Q/DQ decoders."""
        return self.quant_settings().float_precision if self.precision in QUANTIZED else self.precision

    @property
    def graph_opset(self) -> int:
        if self.opset is not None:
            return self.opset
        return self.quant_settings().scheme.min_opset if self.precision in QUANTIZED else DEFAULT_OPSET

    def quant_settings(self):
        from calib.stage import QuantSettings

        return self.quant or QuantSettings.for_mode(self.precision)


@dataclass
class BuildResult:
    manifest: Manifest
    out: Path
    reused: list[str]
    exported: list[str]
    engines_built: bool
    engines_reason: str
    seconds: float
    retuned: str | None = None  # what changed in the profiles of the bundle this build replaced
    stale: list[str] = field(default_factory=list)  # engines of the old bundle that no longer fit


class Progress:
    def __init__(self, stream=sys.stderr):
        self.start, self.stream = time.perf_counter(), stream

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=self.stream, flush=True)


def validate_request(req: BuildRequest) -> tuple[Checkpoint, dict]:
    """Everything that can be checked before loading weights; returns the checkpoint and its token ids."""
    expect(req.precision in PRECISIONS, f"precision: got {req.precision!r}; expected one of {PRECISIONS}")
    expect(req.engines in ("auto", "skip", "require"), f"engines: got {req.engines!r}; expected auto, skip or require")
    low = req.quant_settings().scheme.min_opset if req.precision in QUANTIZED else 17
    why = f" ({req.precision} Q/DQ with float16 scales needs opset {low})" if req.precision in QUANTIZED else ""
    # int4's blocked DequantizeLinear is opset 21: calib.int4 raises the quantized graphs' opset itself
    expect(low <= req.graph_opset <= 20, f"opset: got {req.graph_opset!r}; expected {low}..20{why} (TensorRT 10.3 parses "
                                         "up to 20)")
    if req.precision in QUANTIZED:
        req.quant_settings().validate()
    if req.engines == "require":  # before any export: minutes of work must not end in this error
        from export.trt_build import tensorrt_status

        usable, why, _ = tensorrt_status()
        expect(usable, f"engines: required, but {why}")
    expect(0 <= req.p < 100, f"P: got {req.p!r}; expected a percentage in [0, 100)")
    req.profiles.validate()
    ckpt = open_checkpoint(req.model_dir)
    PruneSettings(k=req.k, p=req.p, rule=req.rule).validate(ckpt.config.n_layers)
    token_ids = TextTokenizer(req.model_dir).ids.to_dict()
    seq_max = axis_ranges(ckpt.config, req.profiles, req.p)["seq"][2]
    expect(seq_max <= ckpt.config.decoder.max_positions,
           f"profiles: longest sequence {seq_max} tokens; the model allows {ckpt.config.decoder.max_positions}")
    out = Path(req.out)
    expect(not out.is_file(), f"out {str(out)!r}: is a file; expected a directory for the bundle")
    check_output_dir(out, "out")  # a file above it, or a place this user cannot write: before any work
    if out.is_dir() and any(out.iterdir()):
        expect((out / "manifest.json").is_file(),
               f"out {str(out)!r}: exists, is not empty and holds no bundle manifest; refusing to replace it")
    return ckpt, token_ids


def exporter_source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((Path(__file__).resolve().parents[1] / name).read_bytes())
    return h.hexdigest()[:16]


def previous_manifest(out: Path) -> Manifest | None:
    try:
        return read_manifest(out) if (out / "manifest.json").is_file() else None
    except LladaVError:
        return None  # unreadable or another format: export everything again


def intact(old_root: Path, info: FileInfo | None) -> bool:
    path = old_root / info.path if info else None
    return bool(path and path.is_file() and path.stat().st_size == info.bytes and sha256_file(path) == info.sha256)


class Builder:
    """One run of build_bundle: the export's state (request, checkpoint and its content hash, token
    ids, profile ranges, build settings, the previous bundle) and the stages that share it."""

    def __init__(self, req: BuildRequest, ckpt: Checkpoint, log, token_ids: dict | None = None):
        self.req, self.ckpt, self.cfg, self.log = req, ckpt, ckpt.config, log
        self.token_ids = token_ids if token_ids is not None else TextTokenizer(req.model_dir).ids.to_dict()
        self.ckpt_hash, self.source = ckpt.content_hash(), exporter_source_hash()
        self.ranges = profile_ranges(self.cfg, req.profiles, req.p)  # [full, cached]
        self.settings = EngineBuildSettings(req.precision)
        self.model = None
        self.old = previous_manifest(Path(req.out))
        self.reused, self.exported = [], []

    def loaded_model(self):
        if self.model is None:
            import torch

            dtype = {"fp16": torch.float16, "fp32": torch.float32}[self.req.float_precision]
            self.log(f"loading weights ({self.req.float_precision}) from {self.ckpt.path}")
            self.model, _ = load_model(self.ckpt.path, dtype)
        return self.model

    def graph_export(self, spec: SubgraphSpec) -> GraphExport:
        """How this build exports and validates `spec`'s graph (also calib/'s re-exports with folded scales)."""
        fp = self.req.float_precision
        return GraphExport(spec, self.cfg, self.req.k, fp, self.req.graph_opset,
                           graph_identity(spec.name, self.req.k, self.cfg.n_layers, self.ckpt_hash, fp),
                           tuple(VALIDATION_SIZES), self.req.p)

    def export_graph(self, name: str, model, dst: Path):
        """Subgraph `name` of `model` exported to dst and validated (export.onnx_export.ExportReport)."""
        spec = next(s for s in SUBGRAPHS if s.name == name)
        return self.graph_export(spec).run(spec.build(model, self.req.k), dst)

    def subgraph(self, tmp: Path, spec: SubgraphSpec) -> SubgraphEntry:
        k = self.req.k if spec.name.startswith("decoder") else "-"
        fp = self.req.float_precision
        key = artifact_key(self.ckpt_hash, spec.name, k, fp, self.req.graph_opset, self.source)
        shapes = input_shapes(spec, self.cfg, self.ranges, self.req.k)
        old = self.old.subgraphs.get(spec.name) if self.old else None
        onnx_path = tmp / "onnx" / f"{spec.name}.onnx"
        if old and old.key == key and intact(self.req.out, old.onnx) and intact(self.req.out, old.data):
            for info in (old.onnx, old.data):
                copy_or_link(self.req.out / info.path, tmp / info.path)
            self.log(f"{spec.name}: reused (same checkpoint, K, precision and exporter)")
            self.reused.append(spec.name)
            entry = copy.deepcopy(old)  # the old manifest stays as it was: engines_stage compares against it
            entry.shapes, entry.engine, entry.engine_check = shapes, None, {}
            entry.precision = fp  # its tolerances were derived from its own validation
            return entry
        self.log(f"{spec.name}: exporting ({fp}, opset {self.req.graph_opset}) and validating ...")
        # the ONNX graph does not depend on the profile: validate it at fixed sizes (proving its axes dynamic)
        report = self.export_graph(spec.name, self.loaded_model(), onnx_path)
        tolerances = engine_tolerances(report.checks, fp)
        if spec.name == "vision":  # the merge the runtime does, with the image_newline the bundle holds
            newline = np.load(tmp / "host" / "image_newline.npy")
            report.checks[MERGE_CHECK] = check_visual_tokens(onnx_path, newline, self.loaded_model(), self.cfg, fp)
        self.release_weights(spec)
        worst = worst_check(report.checks)
        self.log(f"{spec.name}: valid ({sum(report.ops.values())} nodes, max |ORT - model| "
                 f"{worst['max_abs_diff']:.2e} <= {worst['allowed']:.2e} allowed, {report.seconds:.1f}s)")
        self.exported.append(spec.name)
        return SubgraphEntry(
            spec.name, file_info(tmp, onnx_path), file_info(tmp, report.data),
            [TensorInfo(t.name, t.dtype, list(t.dims)) for t in spec.inputs],
            [TensorInfo(t.name, t.dtype, list(t.dims)) for t in spec.outputs],
            shapes, key, report.checks, report.ops, tolerances=tolerances, precision=fp)

    def release_weights(self, spec: SubgraphSpec) -> None:
        """Drop the PyTorch weights only this (exported, validated) graph needs: the model shrinks as the
        build proceeds, which is what lets the 8B build stay well inside a 64 GB workstation."""
        import torch

        m = self.model
        if spec.name == "vision":
            modules = [m.model.vision_tower, m.model.mm_projector]
        elif spec.name == "decoder_pre":
            modules = list(m.model.layers[: self.req.k])
        elif spec.name == "decoder_post":
            modules = [*m.model.layers[self.req.k :], m.model.norm, m.lm_head]
        else:
            modules = []  # similarity: no weights
        for module in modules:
            for sub in module.modules():
                for name, p in list(sub._parameters.items()):
                    if p is not None:
                        sub._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, device="meta"),
                                                                   requires_grad=False)
        from export.onnx_export import release_memory

        release_memory()

    def host_files(self, tmp: Path) -> dict[str, FileInfo]:
        key_dir = tmp / "host"
        key_dir.mkdir()
        out = {}
        for name in ("embed_tokens", "image_newline"):
            path = key_dir / f"{name}.npy"
            old = self.old.host.get(name) if self.old else None
            same_dtype = self.old.float_precision == self.req.float_precision if self.old else False
            if old and self.old.model.get("content_hash") == self.ckpt_hash and same_dtype \
                    and intact(self.req.out, old):
                copy_or_link(self.req.out / old.path, path)
            else:
                m = self.loaded_model()
                tensor = m.model.embed_tokens.weight if name == "embed_tokens" else m.model.image_newline
                np.save(path, tensor.detach().numpy())
            out[name] = file_info(tmp, path)
        return out

    def quantize_bundle(self, tmp: Path, entries: dict, host: dict, tokenizer: list[str]) -> dict:
        """The float bundle at `tmp` (a provisional manifest makes it runnable) -> its decoders quantized
        by calib/, calibrated on what they see when that bundle answers questions; re-exports (scales
        folded into the weights) go through this builder's export_graph."""
        from calib.stage import quantize_stage

        trt = {"built": False, "reason": "provisional: calibration", "version": None,
               "script": "jetson/build_engines.sh", "build_settings": None}
        float_req = replace(self.req, precision=self.req.float_precision, opset=self.req.graph_opset)
        provisional = self.make_manifest(entries, host, tokenizer, trt, float_req)
        write_manifest(tmp, provisional)
        return quantize_stage(tmp, provisional, self.req.quant_settings(), self.log, self.export_graph)

    def make_manifest(self, entries: dict, host: dict, tokenizer: list[str], trt: dict,
                      req: BuildRequest | None = None) -> Manifest:
        """The bundle's manifest; req: another request over the same checkpoint (the provisional float one)."""
        import onnx
        import onnxruntime
        import torch
        import transformers

        req = req or self.req
        cfg, ranges = self.cfg, self.ranges
        d, v, g = cfg.decoder, cfg.vision, cfg.geometry
        return Manifest(
            model={"name": cfg.name, "source": str(self.ckpt.path), "content_hash": self.ckpt_hash,
                   "decoder": {"layers": d.n_layers, "d_model": d.d_model, "heads": d.n_heads, "d_mlp": d.d_mlp,
                               "vocab": d.vocab_size, "rope_theta": d.rope_theta, "rms_eps": d.rms_eps,
                               "max_positions": d.max_positions},
                   "vision": {"d_model": v.d_model, "layers": v.n_layers, "heads": v.n_heads, "d_mlp": v.d_mlp}},
            k=req.k, p=req.p, n_layers=d.n_layers, precision=req.precision, opset=final_opset(req),
            token_ids=self.token_ids,
            geometry={"image_size": g.image_size, "patch_size": g.patch_size, "tokens_per_tile": g.tokens_per_tile,
                      "grid_pinpoints": [list(p) for p in g.grid_pinpoints], "max_tiles": g.max_tiles,
                      "mean": list(g.mean), "std": list(g.std)},
            profiles={"settings": settings_dict(req.profiles), "axes": {a: list(r) for a, r in ranges[0].items()},
                      "cached_axes": {a: list(r) for a, r in ranges[1].items()},
                      "full_step1_seq_opt": full_sequence_opt(cfg, req.profiles),
                      # per profile: where engines are checked against ONNX Runtime
                      "validation_axes": [validation_axes(r) for r in ranges]},
            subgraphs=entries, host=host, tokenizer=sorted(tokenizer),
            versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                      "transformers": transformers.__version__, "tensorrt": trt["version"]},
            tensorrt=trt, float_precision=req.float_precision, rule=req.rule,
        )


def build_bundle(req: BuildRequest, log=None) -> BuildResult:
    log = log or Progress()
    start = time.perf_counter()
    ckpt, token_ids = validate_request(req)
    with output_lock(req.out, "out"):
        return _build_bundle(req, ckpt, token_ids, log, start)


def _build_bundle(req: BuildRequest, ckpt, token_ids: dict, log, start: float) -> BuildResult:
    log(f"checkpoint {ckpt.path}: {ckpt.config.n_layers} layers, d={ckpt.config.decoder.d_model}; hashing ...")
    b = Builder(req, ckpt, log, token_ids)
    if b.old is not None and b.old.model.get("content_hash") != b.ckpt_hash:
        expect(req.force, f"out {str(req.out)!r}: holds a bundle of another model ({b.old.model.get('name')!r}, "
                          f"{str(b.old.model.get('source'))!r}); this build is of {ckpt.config.name!r} "
                          f"({str(ckpt.path)!r}). Expected a new --out, or --force to replace that bundle")
        log(f"replacing the bundle of model {b.old.model.get('name')!r} at {req.out} (--force)")
    dropped: set[Path] = set()  # files of the old bundle not carried over (stale engines, with --clean)
    with atomic_directory(req.out, keep=lambda rel: rel not in dropped and rel.parts[0] not in OWNED) as tmp:
        for sub in ("onnx", "tokenizer", "jetson"):
            (tmp / sub).mkdir()
        host = b.host_files(tmp)  # first: the vision check merges with the image_newline written here
        entries = {s.name: b.subgraph(tmp, s) for s in SUBGRAPHS}
        tokenizer = [name for name in TOKENIZER_FILES if (ckpt.path / name).is_file()]
        for name in tokenizer:
            shutil.copy2(ckpt.path / name, tmp / "tokenizer" / name)
        if req.precision in QUANTIZED:
            entries = b.quantize_bundle(tmp, entries, host, tokenizer)
        trt = engines_stage(req, tmp, entries, b, log)
        manifest = b.make_manifest(entries, host, tokenizer, trt)
        write_jetson_script(tmp, manifest, b.settings)
        stale = stale_engines(Path(req.out), manifest, req.clean, dropped, log)
        write_manifest(tmp, manifest)
    log(f"bundle written to {req.out}")
    return BuildResult(manifest, Path(req.out), b.reused, b.exported, trt["built"], trt["reason"],
                       time.perf_counter() - start, retuned(b.old, manifest), stale)


def write_jetson_script(tmp: Path, manifest: Manifest, settings: EngineBuildSettings) -> None:
    """jetson/build_engines.sh: the trtexec command of every engine, each recording its provenance."""
    commands = {n: trtexec_command(e.onnx.path, device_engine(n), e.shapes, settings,
                                   f"{ENGINES}/timing.cache") for n, e in manifest.subgraphs.items()}
    script = tmp / manifest.tensorrt["script"]
    script.write_text(build_script(commands, {n: engine_provenance(manifest, n) for n in commands}))
    script.chmod(0o755)


def stale_engines(old: Path, manifest: Manifest, clean: bool, dropped: set, log) -> list[str]:
    """Engines the old bundle holds (built on the device by its script) that no longer fit the new
    manifest: reported, kept unless `clean` (then added to `dropped`). Fitting ones are kept silently."""
    notes = []
    for name in device_engines(old) if old.is_dir() else []:
        if name not in manifest.subgraphs or manifest.subgraphs[name].engine is not None:
            continue  # not ours to judge, or replaced by an engine this build made
        problem = engine_problem(old, manifest, name, None)
        if problem is None:
            continue
        if clean:
            dropped.update([Path(device_engine(name)), Path(f"{device_engine(name)}.json")])
        action = "deleted (--clean)" if clean else "kept; rebuild it with jetson/build_engines.sh, or --clean deletes it"
        notes.append(f"{device_engine(name)} is {problem}: {action}")
        log(notes[-1])
    return notes


def retuned(old: Manifest | None, new: Manifest) -> str | None:
    """How the replaced bundle differs from the new one (model, K, precision, P, profiles), or None."""
    if old is None:
        return None
    changes = [f"{what} {a} -> {b}" for what, a, b in (
        ("model", old.model.get("name"), new.model.get("name")), ("K", old.k, new.k),
        ("precision", old.precision, new.precision), ("P", f"{old.p:g}", f"{new.p:g}")) if a != b]
    if old.model.get("content_hash") != new.model.get("content_hash") and old.model.get("name") == new.model.get("name"):
        changes.insert(0, "model weights (another checkpoint of the same name)")
    axes = [f"{which}{a} {tuple(old.profiles.get(key, {}).get(a, ()))} -> {tuple(r)}"
            for key, which in (("axes", ""), ("cached_axes", "cached "))
            for a, r in new.profiles[key].items() if old.profiles.get(key, {}).get(a) != r]
    if axes:
        changes.append(f"profile (min, opt, max): {', '.join(axes)}")
    return "; ".join(changes) or None


def engines_stage(req: BuildRequest, tmp: Path, entries: dict, b: Builder, log) -> dict:
    from export.trt_build import tensorrt_status

    usable, why, version = tensorrt_status()
    status = {"built": False, "reason": why, "version": version, "script": "jetson/build_engines.sh",
              "build_settings": b.settings.to_dict()}
    if req.engines == "skip":
        status["reason"] = "skipped (--engines skip)"
        return status
    if not usable:
        expect(req.engines != "require", f"engines: required, but {why}")
        log(f"TensorRT engines: not built here: {why}. Run jetson/build_engines.sh on the Jetson.")
        return status
    from export.subgraphs import dummy_inputs
    from export.trt_build import build_engine, check_engine

    (tmp / "engines").mkdir()
    cache = tmp / "engines" / "timing.cache"
    if (Path(req.out) / "engines" / "timing.cache").is_file():  # the timing cache carries over between builds
        shutil.copy2(Path(req.out) / "engines" / "timing.cache", cache)
    for name, entry in entries.items():
        spec = next(s for s in SUBGRAPHS if s.name == name)
        engine = tmp / device_engine(name)
        old = b.old.subgraphs.get(name) if b.old else None
        if old and old.engine and reusable_engine(b.old, old, entry, version, b.settings) \
                and intact(Path(req.out), old.engine):
            copy_or_link(Path(req.out) / old.engine.path, engine)
            entry.engine, entry.engine_check = old.engine, old.engine_check
            log(f"{name}: TensorRT engine reused (same ONNX, profile, build settings and TensorRT {version})")
            continue
        log(f"{name}: building TensorRT engine ...")
        build_engine(tmp / entry.onnx.path, engine, entry.shapes, b.settings, cache)
        feeds = [[dummy_inputs(spec, b.cfg, axes, FLOAT_DTYPES[req.float_precision], seed=i, k=req.k)
                  for i, axes in enumerate(validation_axes(ranges))]  # inside each of the engine's profiles
                 for ranges in b.ranges[: len(entry.shapes)]]
        entry.engine = file_info(tmp, engine)
        entry.engine_check = check_engine(engine, tmp / entry.onnx.path, feeds, spec.name, entry.tolerances)
    status.update(built=True, reason=f"built with {why}")
    return status


def reusable_engine(old_manifest: Manifest, old: SubgraphEntry, new: SubgraphEntry, version: str | None,
                    settings: EngineBuildSettings) -> bool:
    """An engine may be reused when its ONNX bytes, profile shapes, build settings and TensorRT version are the same."""
    return (old.onnx.sha256 == new.onnx.sha256 and old.data.sha256 == new.data.sha256 and old.shapes == new.shapes
            and old_manifest.tensorrt.get("version") == version
            and old_manifest.tensorrt.get("build_settings") == settings.to_dict())


def final_opset(req: BuildRequest) -> int:
    """The bundle's graphs' opset: the export's, or the quantization scheme's when it needs a later one."""
    later = req.quant_settings().scheme.graph_opset if req.precision in QUANTIZED else 0
    return max(req.graph_opset, later)


def summary(result: BuildResult) -> str:
    m, out = result.manifest, result.out
    rows = [f"bundle {out}  (K={m.k}, P={m.p:g}, rule {m.rule}, {m.precision}, {m.n_layers} layers, "
            f"model {m.model['name']})", ""]
    rows.append(f"{'file (size with its .onnx.data)':<34} {'size':>10}  shapes (min / opt / max)")
    for name, e in m.subgraphs.items():
        first = next(iter(e.shapes[0].values()))
        shape = " / ".join("x".join(map(str, first[w])) for w in ("min", "opt", "max"))
        status = "reused" if name in result.reused else "exported+validated"
        rows.append(f"{e.onnx.path:<34} {_size(e.onnx.bytes + e.data.bytes):>10}  {next(iter(e.shapes[0]))}: {shape}  [{status}]")
        rows.append(f"{'':<46}{_check_line('ORT vs model', e.validation)}")
        if e.engine:
            rows.append(f"{e.engine.path:<34} {_size(e.engine.bytes):>10}  {_check_line('engine vs ORT', e.engine_check)}")
    for name, f in m.host.items():
        rows.append(f"{f.path:<34} {_size(f.bytes):>10}")
    rows.append("")
    if result.engines_built:
        rows.append(f"TensorRT engines: {result.engines_reason}")
    else:
        rows.append(f"TensorRT engines: not built: {result.engines_reason}")
        rows.append(f"  build them on the Jetson: bash {out / m.tensorrt['script']}")
    for note in result.stale:
        rows.append(note)
    if result.retuned:
        rows.append(f"this bundle replaced one that differed: {result.retuned}")
    rows.append(f"done in {result.seconds:.1f}s")
    return "\n".join(rows)


def _check_line(what: str, checks: dict) -> str:
    worst = worst_check(checks)
    return f"{what}: max |diff| {worst['max_abs_diff']:.2e} <= {worst['allowed']:.2e} allowed ({worst['rule']})"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
