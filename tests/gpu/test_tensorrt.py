"""TensorRT on a GPU host: engines build and match ONNX Runtime, whole generations give the same
tokens, and the device-work discipline holds over real CUDA.

    python -m pytest tests/gpu -q        # needs TensorRT's Python package and a CUDA GPU

Where either is missing (this project's CI) the whole module is skipped with the reason. Nothing
here has run yet: it is written against the TensorRT 10 API (10.3 on JetPack 6).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from export.trt_build import tensorrt_status

USABLE, WHY, VERSION = tensorrt_status()
if not USABLE:
    pytest.skip(f"needs TensorRT and a GPU: {WHY}", allow_module_level=True)

from export.build import BuildRequest, build_bundle  # noqa: E402
from runtime.bundle import FLOAT_DTYPES  # noqa: E402
from runtime.checks import scaled_diff, worst_check  # noqa: E402
from export.profiles import validation_axes  # noqa: E402
from export.reference import generate  # noqa: E402
from export.subgraphs import SUBGRAPHS, dummy_inputs  # noqa: E402
from tests.conftest import road_sketch  # noqa: E402
from export.trt_build import check_engine  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from runtime.preprocess import prepare_image  # noqa: E402
from runtime.pruning import PruneSettings, kept_positions  # noqa: E402
from runtime.schedule import GenerationSettings  # noqa: E402
from runtime.backends.trt import TrtEngine, make_trt_runners, row_runs  # noqa: E402
from tests.conftest import RUNTIME_PROFILE, gradient_image  # noqa: E402
from tests.cuda_doubles import RecordedEngine, Recorder, device_work, expected_device_work, streams_used  # noqa: E402

GEN = GenerationSettings(steps=4, gen_length=8, block_length=8)
PROMPTS = ["What is ahead of the car?", "Is the traffic light red?"]


@pytest.fixture(scope="module")
def engines(tiny_dir, tmp_path_factory):
    """fp32 (one tile) and fp16 (AnyRes) bundles with engines; the build itself checks every engine
    against ONNX Runtime at the bundle's validation shapes and fails on a mismatch."""
    root = tmp_path_factory.mktemp("trt")
    fp32 = BuildRequest(tiny_dir, root / "fp32", 15, 50, "fp32", RUNTIME_PROFILE, engines="require")
    fp16 = BuildRequest(tiny_dir, root / "fp16", 15, 50, "fp16", replace(RUNTIME_PROFILE, layout="anyres"),
                        engines="require")
    return {r.precision: build_bundle(r, log=print) for r in (fp32, fp16)}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_build_with_the_bundle_settings_and_match_onnxruntime(engines, tiny, precision):
    result, cfg = engines[precision], tiny[1].config
    m = result.manifest
    assert m.tensorrt["built"] and m.tensorrt["version"] == VERSION and m.tensorrt["build_settings"]["tf32"] is False
    for spec in SUBGRAPHS:
        entry = m.subgraphs[spec.name]
        assert entry.engine is not None and entry.engine_check, spec.name
        feeds = [[dummy_inputs(spec, cfg, axes, FLOAT_DTYPES[precision], seed=10 + i, k=m.k)
                  for i, axes in enumerate(validation_axes(ranges))]  # each profile at its own shapes
                 for ranges in (m.profiles["axes"], m.profiles["cached_axes"])[: len(entry.shapes)]]
        report = check_engine(result.out / entry.engine.path, result.out / entry.onnx.path, feeds, spec.name,
                              entry.tolerances)
        worst = worst_check(report)
        print(spec.name, precision, f"max |diff| {worst['max_abs_diff']:.2e} <= {worst['allowed']:.2e} allowed")


@pytest.mark.parametrize("p", [0, 50, 70])
def test_fp32_generation_token_parity(engines, tiny, tokenizer, p):
    """TensorRT, ONNX Runtime and the PyTorch reference: the same tokens, kept tokens and lengths."""
    model, ckpt = tiny
    image = gradient_image(320, 200)
    prune = PruneSettings(k=15, p=p)
    with Pipeline(engines["fp32"].out, backend="tensorrt") as trt, Pipeline(engines["fp32"].out) as ort:
        for question in PROMPTS:
            got, other = trt.generate(image, question, GEN, prune), ort.generate(image, question, GEN, prune)
            want = generate(model, tokenizer.ids, tokenizer.encode_prompt(question),
                            prepare_image(image, ckpt.config.geometry, "single"), GEN, prune)
            assert got.answer_ids == other.answer_ids == want.answer_ids, question
            assert np.array_equal(got.kept_visual, want.kept_visual)
            assert [s.seq_len for s in got.steps] == want.seq_lens
            assert all(s.pre_ms > 0 and s.post_ms > 0 for s in got.steps)  # GPU time from events


def test_fp16_anyres_generation_matches_onnxruntime(engines):
    """fp16 on the GPU vs fp16 on ONNX Runtime CPU: saliency within the saliency rule, the kept set
    equal outside near-ties, the same answer."""
    from export.subgraphs import DECODER_PRE

    image, prune = road_sketch(640, 480), PruneSettings(k=15, p=50)  # saliencies clear of the cut
    with Pipeline(engines["fp16"].out, backend="tensorrt") as trt, Pipeline(engines["fp16"].out) as ort:
        got, want = trt.generate(image, PROMPTS[0], GEN, prune), ort.generate(image, PROMPTS[0], GEN, prune)
    atol, rtol = DECODER_PRE.tolerance("fp16", "saliency")
    ok, diff, scale = scaled_diff(got.saliency, want.saliency, atol, rtol)
    print(f"saliency TensorRT vs ONNX Runtime: {diff:.2e} of max {scale:.2e}")
    assert ok
    cut = np.sort(want.saliency)[::-1][want.kept_visual.size - 1]
    clear = np.abs(want.saliency - cut) > 2 * (atol + rtol * scale)
    n = want.layout.n_visual
    assert np.array_equal(np.isin(np.arange(n), got.kept_visual)[clear], np.isin(np.arange(n), want.kept_visual)[clear])
    assert got.answer_ids == want.answer_ids


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("p", [0, 50])
def test_fp32_cached_generation_token_parity(engines, mode, p):
    """The device-side KV cache (two profiles, strided gathers) on real engines: the ONNX Runtime
    backend's tokens and rows per step, over two blocks."""
    from runtime.caching import CacheSettings

    gen, cache = GenerationSettings(steps=8, gen_length=8, block_length=4), CacheSettings(mode)
    image, prune = gradient_image(320, 200), PruneSettings(k=15, p=p)
    with Pipeline(engines["fp32"].out, backend="tensorrt") as trt, Pipeline(engines["fp32"].out) as ort:
        for question in PROMPTS:
            got = trt.generate(image, question, gen, prune, cache=cache)
            want = ort.generate(image, question, gen, prune, cache=cache)
            assert got.answer_ids == want.answer_ids and np.array_equal(got.kept_visual, want.kept_visual), question
            assert [s.rows for s in got.steps] == [s.rows for s in want.steps]


def test_device_work_over_real_cuda(engines):
    """The order, stream and lifetimes the simulated tests check (tests/test_trt_runtime.py), recorded
    over libcudart and the real engines."""
    from runtime.backends.cuda import CudaRuntime

    log = []

    def runners(bundle):
        return make_trt_runners(bundle, lambda: Recorder(CudaRuntime(), log),
                                lambda name, path: RecordedEngine(TrtEngine(name, path), name, log))

    gen = GenerationSettings(steps=3, gen_length=6, block_length=6)
    with Pipeline(engines["fp32"].out, backend="tensorrt", runner_factory=runners) as pipe:
        result = pipe.generate(gradient_image(160, 120), PROMPTS[0], gen, PruneSettings(k=15, p=50))
    kept = kept_positions(result.layout, result.kept_visual)
    assert device_work(log) == expected_device_work(len(row_runs(kept)), later_steps=2)
    calls = lambda op: [c for c in log if c.op == op]  # noqa: E731
    assert len(calls("stream_create")) == 1 and streams_used(log) == {calls("stream_create")[0].result}
    first_run = next(i for i, c in enumerate(log) if c.op == "enqueue")
    assert all(i < first_run for i, c in enumerate(log) if c.op == "malloc")
    assert sorted(c.result for c in calls("malloc")) == sorted(c.args[0] for c in calls("free"))
    assert len(calls("event_destroy")) == len(calls("event_create")) == 6


def test_profile_with_trtexec(engines, tmp_path):
    """jetson/latency.py over TensorRT: engines checked against ONNX Runtime, trtexec timings at the
    shapes of an answer, and the runtime's answers (power only on a Jetson)."""
    import shutil

    from jetson import latency
    from jetson.trtexec import TRTEXEC_ON_JETPACK

    exe = shutil.which("trtexec") or (TRTEXEC_ON_JETPACK if Path(TRTEXEC_ON_JETPACK).is_file() else None)
    if exe is None:
        pytest.skip(f"needs trtexec on PATH or at {TRTEXEC_ON_JETPACK}")
    bundle = engines["fp32"].out
    r = latency.latency_report(latency.LatencyRequest(bundle, "tensorrt", ps=(0, 50), steps=4, iterations=10, repeats=1,
                                         out=tmp_path / "report", trtexec=exe))
    assert set(r["engine_check"]) == {"vision", "decoder_pre", "decoder_post"}
    assert all(c["compute_ms"]["median"] > 0 and c["top_layers"] for c in r["cases"])
    assert all(a["measured"]["steps"] == 4 for a in r["answers"])
