"""The bundle manifest: what `export/build_engines.py` produced and what the runtime may run.

    bundle/
      manifest.json                 this file's data
      onnx/<subgraph>.onnx(.data)   vision, decoder_pre, decoder_post
      host/embed_tokens.npy         token embeddings (the runtime embeds text and response)
      host/image_newline.npy
      tokenizer/                    tokenizer.json, tokenizer_config.json, special_tokens_map.json
      jetson/build_engines.sh       trtexec commands with the profile shapes filled in
      engines/                      TensorRT engines, where they were built
      manifest.json.sha256          the manifest's digest: an edited manifest is refused

A runtime refuses a bundle whose format version, K or model it does not expect, a manifest that
was changed after the build, and graphs whose own identity (ONNX metadata_props, written at
export: subgraph, layer range, K, model content hash, precision, format) disagrees with it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from runtime.anyres import ImageGeometry
from runtime.errors import LladaVError, expect
from runtime.files import read_json, write_json, write_text
from runtime.pruning import DEFAULT_RULE

FORMAT = "lladav-edge-bundle"
# 2: validation results carry their bound; graphs carry their identity; manifest digest
# 3: the decoder graphs take and return per-layer K/V (docs/caching.md); float_precision
# 4: per-output tolerances from the checkpoint's own noise (export.yardstick)
# 5: the similarity graph (the duplicate-aware rule) and the bundle's default rule
FORMAT_VERSION = 5
# Optimization profiles of the decoder graphs (index = TensorRT's profile index): refreshes, step 1 and
# uncached steps (no cached rows), and cached steps (the window's rows against the others' K/V).
FULL_PROFILE, CACHED_PROFILE = 0, 1
MANIFEST = "manifest.json"
DIGEST = "manifest.json.sha256"


@dataclass
class TensorInfo:
    name: str
    dtype: str
    dims: list  # ints and axis names


@dataclass
class FileInfo:
    path: str  # relative to the bundle
    sha256: str
    bytes: int


@dataclass
class SubgraphEntry:
    name: str
    onnx: FileInfo
    data: FileInfo
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    shapes: list[dict]  # per optimization profile (FULL_PROFILE, CACHED_PROFILE): input -> {"min", "opt", "max"}
    key: str  # cache key: checkpoint hash, subgraph, K, precision, opset, exporter source
    # axis sizes -> {output: {"max_abs_diff", "allowed", "rule"}}: ONNX Runtime vs PyTorch at export
    validation: dict = field(default_factory=dict)
    ops: dict = field(default_factory=dict)
    engine: FileInfo | None = None
    engine_check: dict = field(default_factory=dict)  # feed index -> the same, TensorRT vs ONNX Runtime, where built
    tolerances: dict = field(default_factory=dict)  # output -> [atol, rtol] of the checks above, for this precision
    precision: str = ""  # the graph's own: fp32, fp16, or a quantization mode (int8); "" = the manifest's
    quantization: dict = field(default_factory=dict)  # quantized graphs: scheme, calibration, counts, error (calib/)

    def graph_precision(self, manifest_precision: str) -> str:
        return self.precision or manifest_precision


# A float precision's numpy type: what a bundle's graphs take and return for their float tensors
# (Manifest.float_precision; quantized bundles are fp16 or fp32 graphs with Q/DQ). The one rule the
# exporter and the runtime share; `float_dtype` names the numpy type everywhere.
FLOAT_DTYPES = {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}


@dataclass
class Manifest:
    model: dict  # name, source path, content hash, dims
    k: int
    p: float  # the default strategy's P; the runtime may choose another
    n_layers: int
    precision: str  # fp32, fp16 or a quantization mode (int8: quantized decoders, fp16 float type)
    opset: int
    token_ids: dict
    geometry: dict
    profiles: dict  # settings, axis ranges, full step-1 opt length
    subgraphs: dict[str, SubgraphEntry]
    host: dict[str, FileInfo]
    tokenizer: list[str]
    versions: dict
    tensorrt: dict  # {"built": bool, "reason": str, "script": path, "version": str|None}
    float_precision: str = ""  # the graphs' float type, fp16 or fp32 ("": by precision)
    rule: str = DEFAULT_RULE  # the default strategy's pruning rule (runtime.pruning.RULES); the runtime may choose another
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self):
        self.float_precision = self.float_precision or ("fp32" if self.precision == "fp32" else "fp16")
        expect(self.float_precision in FLOAT_DTYPES, f"manifest: float_precision {self.float_precision!r}; expected "
                                                     f"one of {tuple(FLOAT_DTYPES)}")

    @property
    def float_dtype(self) -> np.dtype:
        """The numpy type of the graphs' float inputs and outputs (FLOAT_DTYPES[float_precision])."""
        return FLOAT_DTYPES[self.float_precision]

    def model_dims(self) -> dict[str, int]:
        """The model dims that tensor dims name (D, V, S, F, Dv; H, Dh and the halves' layers Lpre, Lpost)."""
        d, g = self.model["decoder"], self.geometry
        return {"D": d["d_model"], "V": d["vocab"], "S": g["image_size"], "F": g["tokens_per_tile"],
                "Dv": self.model["vision"]["d_model"], "H": d["heads"], "Dh": d["d_model"] // d["heads"],
                "Lpre": self.k, "Lpost": self.n_layers - self.k}

    def image_geometry(self) -> ImageGeometry:
        """The image geometry (runtime.anyres.ImageGeometry) the vision graph was exported for."""
        g = self.geometry
        return ImageGeometry(g["image_size"], g["patch_size"], tuple(tuple(p) for p in g["grid_pinpoints"]),
                             g["max_tiles"], tuple(g["mean"]), tuple(g["std"]))

    @staticmethod
    def from_dict(d: dict) -> "Manifest":
        d = dict(d)
        expect(d.get("format") == FORMAT, f"manifest: format is {d.get('format')!r}; expected {FORMAT!r}")
        expect(d.get("format_version") == FORMAT_VERSION,
               f"manifest: format_version {d.get('format_version')!r}; this runtime reads {FORMAT_VERSION} "
               "(rebuild the bundle with export/build_engines.py)")
        try:
            d["subgraphs"] = {k: _subgraph(v) for k, v in d["subgraphs"].items()}
            d["host"] = {k: FileInfo(**v) for k, v in d["host"].items()}
            return Manifest(**d)
        except (KeyError, TypeError) as exc:
            raise LladaVError(f"manifest: malformed ({exc})") from None


def _subgraph(v: dict) -> SubgraphEntry:
    v = dict(v)
    v["onnx"], v["data"] = FileInfo(**v["onnx"]), FileInfo(**v["data"])
    v["inputs"] = [TensorInfo(**t) for t in v["inputs"]]
    v["outputs"] = [TensorInfo(**t) for t in v["outputs"]]
    v["engine"] = FileInfo(**v["engine"]) if v.get("engine") else None
    return SubgraphEntry(**v)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def file_info(bundle: Path, path: Path) -> FileInfo:
    return FileInfo(str(path.relative_to(bundle)), sha256_file(path), path.stat().st_size)


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    """The manifest, then its digest (both through temporary names)."""
    write_json(bundle / MANIFEST, manifest.to_dict())
    write_text(bundle / DIGEST, f"{sha256_file(bundle / MANIFEST)}  {MANIFEST}\n")


def read_manifest(bundle) -> Manifest:
    """The manifest, refused if its format is another or it changed since the build (its digest)."""
    bundle = Path(bundle)
    expect(bundle.is_dir(), f"bundle {str(bundle)!r}: not a directory; expected the output of build_engines.py")
    expect((bundle / MANIFEST).is_file(), f"bundle {str(bundle)!r}: holds no {MANIFEST}; expected a bundle directory "
                                           "written by export/build_engines.py (manifest, onnx/, host/, tokenizer/)")
    manifest = Manifest.from_dict(read_json(bundle / MANIFEST, "bundle manifest"))
    digest = bundle / DIGEST
    expect(digest.is_file(), f"bundle {str(bundle)!r}: {DIGEST} is missing; rebuild the bundle")
    expect(digest.read_text().split()[:1] == [sha256_file(bundle / MANIFEST)],
           f"bundle {str(bundle)!r}: {MANIFEST} was changed after the build (its sha256 differs from {DIGEST}); "
           "restore it or rebuild the bundle")
    return manifest


def resolve_dims(dims, sizes: dict[str, int]) -> tuple[int, ...]:
    """A tensor's shape from its dims (ints, model-dim and axis names) and the sizes of those names: the
    one rule the export's specs (export.subgraphs.TensorSpec) and the car's manifest entries share."""
    return tuple(d if isinstance(d, int) else sizes[d] for d in dims)


def artifact_key(*parts) -> str:
    """A bundle entry's cache key (SubgraphEntry.key) from what its artifact depends on."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


def graph_identity(subgraph: str, k: int, n_layers: int, model_hash: str, precision: str) -> dict[str, str]:
    """What an exported graph says about itself (ONNX metadata_props). The vision and similarity graphs
    do not depend on K, so they are reused across K and say nothing about it."""
    layers = {"vision": "vision", "decoder_pre": f"0-{k}", "decoder_post": f"{k}-{n_layers}", "similarity": "-"}[subgraph]
    return {"lladav.format": FORMAT, "lladav.format_version": str(FORMAT_VERSION), "lladav.subgraph": subgraph,
            "lladav.layers": layers, "lladav.k": str(k) if subgraph.startswith("decoder") else "-",
            "lladav.model_hash": model_hash, "lladav.precision": precision}


def verify_identity(bundle: Path, manifest: Manifest) -> None:
    """Every graph's own identity agrees with the manifest (reads graph protos only, not weights)."""
    import onnx

    for name, entry in manifest.subgraphs.items():
        want = graph_identity(name, manifest.k, manifest.n_layers, manifest.model["content_hash"],
                              entry.graph_precision(manifest.precision))
        try:
            model = onnx.load(str(bundle / entry.onnx.path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and OSError: the file is not an ONNX graph
            raise LladaVError(f"bundle {str(bundle)!r}: {entry.onnx.path} is not a readable ONNX graph ({exc})") from None
        got = {p.key: p.value for p in model.metadata_props if p.key.startswith("lladav.")}
        wrong = [f"{k.removeprefix('lladav.')} {got.get(k)!r} (manifest: {v!r})" for k, v in want.items() if got.get(k) != v]
        expect(not wrong, f"bundle {str(bundle)!r}: {entry.onnx.path} was exported with {', '.join(wrong)}: the "
                          "manifest was edited or files from other bundles were mixed in; rebuild the bundle")


def verify_files(bundle: Path, manifest: Manifest, check_hashes: bool = True) -> None:
    """Every file the manifest names exists with its size (and hash): a corrupt bundle is refused."""
    infos = [*manifest.host.values()]
    for entry in manifest.subgraphs.values():
        infos += [entry.onnx, entry.data] + ([entry.engine] if entry.engine else [])
    for info in infos:
        path = bundle / info.path
        expect(path.is_file(), f"bundle {str(bundle)!r}: {info.path} is missing")
        size = path.stat().st_size
        expect(size == info.bytes, f"bundle {str(bundle)!r}: {info.path} has {size} bytes; manifest says {info.bytes}")
        if check_hashes:
            expect(sha256_file(path) == info.sha256, f"bundle {str(bundle)!r}: {info.path} is corrupt (sha256 mismatch)")


VERIFY = ("sizes", "hashes", "none")  # how much of a bundle's bytes Bundle checks when it opens one


class Bundle:
    """A bundle directory, opened and checked: the one object that reads a bundle. It owns the
    manifest, the tokenizer, the host tensors (embed_tokens memory-mapped, image_newline), the image
    geometry and the graphs' float type (float_dtype); the pipeline, the backends, jetson/, calib/
    and the harness take it. verify: sizes (every file present and whole), hashes (also sha256, slow
    for the 8B), none; expect_k / expect_model: refuse a bundle of another K or model (hash prefix)."""

    def __init__(self, root, verify: str = "sizes", expect_k: int | None = None, expect_model: str | None = None):
        self.root = Path(root)
        self.manifest = m = read_manifest(self.root)
        where = f"bundle {str(self.root)!r}"
        expect(expect_k is None or expect_k == m.k, f"{where}: built for K={m.k}; asked to run K={expect_k} "
                                                    f"(rebuild with --k {expect_k})")
        expect(expect_model is None or m.model["content_hash"].startswith(expect_model),
               f"{where}: built from model {m.model['content_hash'][:12]}; expected {expect_model}")
        expect(verify in VERIFY, f"verify: got {verify!r}; expected one of {VERIFY}")
        if verify != "none":
            verify_files(self.root, m, check_hashes=verify == "hashes")
            verify_identity(self.root, m)  # the graphs say what they are; an edited manifest is refused
        self._tokenizer = self._embed = self._newline = None

    def __repr__(self) -> str:
        return f"Bundle({str(self.root)!r}, K={self.manifest.k}, {self.manifest.precision})"

    @property
    def float_dtype(self) -> np.dtype:
        return self.manifest.float_dtype

    @property
    def tokenizer(self):
        """The bundle's tokenizer (runtime.tokens.TextTokenizer), checked against the manifest's token ids."""
        if self._tokenizer is None:
            from runtime.tokens import TextTokenizer

            tok = TextTokenizer(self.root / "tokenizer")
            expect(tok.ids.to_dict() == self.manifest.token_ids, f"bundle {str(self.root)!r}: tokenizer ids "
                                                                 f"{tok.ids.to_dict()} differ from the manifest's")
            self._tokenizer = tok
        return self._tokenizer

    @property
    def embed(self) -> np.ndarray:
        """(V, D) token embeddings, memory-mapped: the runtime embeds the text and the response."""
        if self._embed is None:
            self._embed = np.load(self.root / self.manifest.host["embed_tokens"].path, mmap_mode="r")
        return self._embed

    @property
    def newline(self) -> np.ndarray:
        """(D,) the image_newline the vision merge appends to each row of tiles."""
        if self._newline is None:
            self._newline = np.load(self.root / self.manifest.host["image_newline"].path)
        return self._newline

    @property
    def geometry(self) -> ImageGeometry:
        """The image geometry the vision graph was exported for."""
        return self.manifest.image_geometry()

    def graph(self, name: str) -> Path:
        """Subgraph `name`'s ONNX file."""
        return self.root / self.manifest.subgraphs[name].onnx.path


ENGINES = "engines"


def device_engine(name: str) -> str:
    """Where an engine of subgraph `name` lives in a bundle (built here or by jetson/build_engines.sh);
    its record (what it was built from) is this path + ".json"."""
    return f"{ENGINES}/{name}.engine"


def engine_provenance(manifest: Manifest, name: str) -> dict:
    """What an engine of subgraph `name` must have been built from to serve this manifest
    (jetson/build_engines.sh writes it, with the TensorRT version, beside each engine it builds)."""
    e = manifest.subgraphs[name]
    return {"subgraph": name, "onnx_sha256": e.onnx.sha256, "data_sha256": e.data.sha256, "shapes": e.shapes,
            "build_settings": manifest.tensorrt.get("build_settings")}


def engine_problem(bundle: Path, manifest: Manifest, name: str, tensorrt_version: str | None) -> str | None:
    """Why the engine of `name` in `bundle` must not serve `manifest` (stale, or of unknown origin),
    or None. `tensorrt_version` None skips the version check (a build host without TensorRT)."""
    entry = manifest.subgraphs[name]
    if entry.engine is not None:  # built with the bundle: the manifest says how
        built = manifest.tensorrt.get("version")
        if tensorrt_version and built != tensorrt_version:
            return f"stale: built with TensorRT {built}, this host has {tensorrt_version}"
        return None
    record = Path(bundle) / f"{device_engine(name)}.json"
    if not record.is_file():
        return f"of unknown origin: {device_engine(name)}.json (what it was built from) is missing"
    got, want = read_json(record, "engine record"), engine_provenance(manifest, name)
    words = {"subgraph": "subgraph", "onnx_sha256": "ONNX graph", "data_sha256": "ONNX weights",
             "shapes": "profile", "build_settings": "build settings"}
    changed = [words[k] for k in want if got.get(k) != want[k]]
    if tensorrt_version and got.get("tensorrt") != tensorrt_version:
        changed.append(f"TensorRT version ({got.get('tensorrt')}; this host has {tensorrt_version})")
    return f"stale (changed since it was built: {', '.join(changed)})" if changed else None


def device_engines(bundle: Path) -> list[str]:
    """Subgraph names with an engine file in the bundle's engines/ directory."""
    return sorted(p.name.removesuffix(".engine") for p in (Path(bundle) / ENGINES).glob("*.engine"))
