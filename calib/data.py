"""Calibration data from the real pipeline: what each graph sees when the runtime answers questions.

    data = record_calibration(bundle, CalibrationSettings(samples=48), root)   # or reuse, by key
    data.feeds("decoder_pre")   # [{input name: array}], in recording order

The runtime runs the bundle's graphs (ONNX Runtime) over a calibration set and every feed a
graph receives is copied to the host: vision on each image's tiles, decoder_pre at step 1 on the
full sequence and at later steps on the reduced one (the response partly unmasked), decoder_post
on the reduced sequences. Per question, step 1 and `steps_recorded - 1` evenly spaced later steps
are kept. The calibration set is the miniature's scene generator (scenes of the training range
that no training run reaches) unless a folder of images and a prompts file are given.

Stored in `root/<key>/` (`calibration.json` + one `<graph>.npz`), the key a hash of the model's
content hash, K, P, the graphs' precision and the settings: the same data feeds every
quantization mode, and data recorded for another model or K is refused by name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime.errors import LladaVError, expect
from runtime.files import atomic_directory, read_json, write_json

FORMAT_VERSION = 1
CALIBRATION_SEEDS = range(9_980_000, 9_990_000)  # training range, below VALIDATION_SEEDS; no run reaches it
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
META = "calibration.json"


@dataclass(frozen=True)
class CalibrationSettings:
    samples: int = 48  # questions run through the pipeline: the sample budget
    steps_recorded: int = 3  # per question: step 1 and this many - 1 evenly spaced later steps
    gen_length: int = 8
    steps: int = 8
    images: str | None = None  # a folder of the user's images; None: the miniature's scene generator
    prompts: str | None = None  # a text file, one question per line (with images)
    seed: int = 0  # first calibration scene, for the generator

    def validate(self) -> "CalibrationSettings":
        expect(isinstance(self.samples, int) and self.samples >= 1,
               f"calibration samples: got {self.samples!r}; expected an integer >= 1 (an empty calibration set "
               "gives no activation ranges)")
        expect(1 <= self.steps_recorded <= self.steps,
               f"calibration steps recorded: got {self.steps_recorded!r}; expected 1..{self.steps} (the steps run)")
        expect((self.images is None) == (self.prompts is None),
               "calibration: --calib-images and --calib-prompts go together (a folder of images and a file of "
               f"questions); got images={self.images!r}, prompts={self.prompts!r}")
        if self.images is not None:  # the folder and file are read now, before minutes of export
            _folder_items(Path(self.images), Path(self.prompts), 1)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_key(model_hash: str, k: int, p: float, precision: str, settings: CalibrationSettings) -> str:
    """Data recorded for other graphs' inputs (another bundle format) gets another key too."""
    from runtime.bundle import FORMAT_VERSION

    text = json.dumps([model_hash, k, p, precision, settings.to_dict(), FORMAT_VERSION], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the calibration set


def calibration_items(settings: CalibrationSettings) -> list[tuple[object, str]]:
    """(image, question) pairs: `samples` of them."""
    if settings.images is None:
        from miniature.scenes import questions, scene

        out = []
        for i in range(settings.samples):  # one question per scene, the kinds in turn
            s = scene(CALIBRATION_SEEDS[settings.seed + i])
            qs = questions(s)
            out.append((s.image, qs[i % len(qs)].text))
        return out
    return _folder_items(Path(settings.images), Path(settings.prompts), settings.samples)


def _folder_items(folder: Path, prompts_file: Path, samples: int) -> list[tuple[object, str]]:
    expect(folder.is_dir(), f"calibration images: {str(folder)!r} is not a directory; expected a folder of images")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    expect(bool(images), f"calibration images: {str(folder)!r} holds no images; expected files ending in "
                         f"{', '.join(IMAGE_SUFFIXES)}")
    expect(prompts_file.is_file(), f"calibration prompts: {str(prompts_file)!r} is not a file; expected one question per line")
    prompts = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    expect(bool(prompts), f"calibration prompts: {str(prompts_file)!r} holds no questions; expected one per line")
    return [(images[i % len(images)], prompts[i % len(prompts)]) for i in range(samples)]


# ---------------------------------------------------------------- recording


class RecordingRunner:
    """Wraps a runner: every infer() also copies its feeds to the host, tagged by call number."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def infer(self, feeds: dict, keep_on_device: bool = False, **kw) -> dict:
        self.calls.append({name: np.array(self.runner.to_host(x)) for name, x in feeds.items()})
        return self.runner.infer(feeds, keep_on_device, **kw)

    def take(self, keep: list[int]) -> list[dict]:
        """The recorded calls at these indices (those that happened); the record starts afresh."""
        out = [self.calls[i] for i in keep if i < len(self.calls)]
        self.calls = []
        return out

    def __getattr__(self, name):  # the rest of the runner contract: lifecycle, device helpers, timing
        return getattr(self.runner, name)


def recorded_steps(steps: int, count: int) -> list[int]:
    """Step 1 (index 0) and count - 1 later steps spread evenly up to the last."""
    if count == 1:
        return [0]
    return sorted({0, *(round(1 + i * (steps - 2) / max(1, count - 2)) for i in range(count - 1))})[:count]


@dataclass
class CalibrationData:
    path: Path
    meta: dict
    _feeds: dict  # graph -> [feeds]

    def feeds(self, graph: str) -> list[dict]:
        return self._feeds[graph]

    def check_for(self, model_hash: str, k: int) -> None:
        """Refuse data recorded for another model or K (the decoder halves' inputs differ)."""
        m = self.meta
        expect(m["model_hash"] == model_hash and m["k"] == k,
               f"calibration data {str(self.path)!r}: recorded for model {m['model_hash'][:12]} K={m['k']}; this "
               f"build is model {model_hash[:12]} K={k} (delete it or record again)")


def record_calibration(bundle: Path, settings: CalibrationSettings, root: Path, log=print) -> CalibrationData:
    """Run the bundle over the calibration set and store what each graph saw; reuse stored data
    with the same key."""
    from runtime.bundle import read_manifest

    settings.validate()
    m = read_manifest(bundle)
    key = calibration_key(m.model["content_hash"], m.k, m.p, m.precision, settings)
    path = Path(root) / key
    if (path / META).is_file():
        data = load_calibration(path)
        log(f"calibration data: reused {path} ({data.meta['counts']})")
        return data
    feeds = _run(bundle, settings, log)
    meta = {"format_version": FORMAT_VERSION, "model_hash": m.model["content_hash"], "k": m.k, "p": m.p,
            "precision": m.precision, "settings": settings.to_dict(), "key": key,
            "counts": {g: len(v) for g, v in feeds.items()},
            "bytes": {g: int(sum(x.nbytes for f in v for x in f.values())) for g, v in feeds.items()}}
    with atomic_directory(path) as tmp:
        for graph, calls in feeds.items():
            np.savez(tmp / f"{graph}.npz", **{f"{i:06d}.{name}": x for i, f in enumerate(calls) for name, x in f.items()})
        write_json(tmp / META, meta)
    log(f"calibration data: {path} ({meta['counts']}, {sum(meta['bytes'].values()) / 2**20:.1f} MiB)")
    return CalibrationData(path, meta, feeds)


def _run(bundle: Path, settings: CalibrationSettings, log) -> dict[str, list[dict]]:
    from runtime.pipeline import Pipeline
    from runtime.pruning import PruneSettings
    from runtime.backends import make_runners
    from runtime.schedule import GenerationSettings

    gen = GenerationSettings(steps=settings.steps, gen_length=settings.gen_length,
                             block_length=settings.gen_length).validate()
    recorders = {}

    def factory(opened):
        recorders.update({n: RecordingRunner(r) for n, r in make_runners("onnxruntime", opened).items()})
        return recorders

    keep = recorded_steps(settings.steps, settings.steps_recorded)
    feeds: dict[str, list[dict]] = {"vision": [], "decoder_pre": [], "decoder_post": []}
    items = calibration_items(settings)
    with Pipeline(bundle, runner_factory=factory) as pipe:
        prune = PruneSettings(pipe.manifest.k, pipe.manifest.p, rule=pipe.manifest.rule)
        for n, (image, question) in enumerate(items):
            pipe.generate(image, question, gen, prune)
            feeds["vision"] += recorders["vision"].take([0])
            for graph in ("decoder_pre", "decoder_post"):
                feeds[graph] += recorders[graph].take(keep)
            if (n + 1) % 16 == 0 or n + 1 == len(items):
                log(f"calibration: {n + 1}/{len(items)} questions")
    return feeds


def load_calibration(path: Path) -> CalibrationData:
    path = Path(path)
    meta = read_json(path / META, "calibration data")
    expect(meta.get("format_version") == FORMAT_VERSION,
           f"calibration data {str(path)!r}: format_version {meta.get('format_version')!r}; expected {FORMAT_VERSION}")
    feeds = {}
    for graph, count in meta["counts"].items():
        try:
            with np.load(path / f"{graph}.npz") as z:
                calls: dict[int, dict] = {}
                for name in z.files:
                    i, tensor = name.split(".", 1)
                    calls.setdefault(int(i), {})[tensor] = z[name]
        except (OSError, ValueError) as exc:
            raise LladaVError(f"calibration data {str(path)!r}: {graph}.npz is unreadable ({exc}); delete the "
                              "directory and record again") from None
        expect(len(calls) == count, f"calibration data {str(path)!r}: {graph}.npz holds {len(calls)} feeds; "
                                    f"{META} says {count}")
        feeds[graph] = [calls[i] for i in sorted(calls)]
    return CalibrationData(path, meta, feeds)
