"""The TensorRT backend's host logic over simulated CUDA and stand-in engines (tests/cuda_doubles.py).

These tests run no TensorRT and no GPU, and claim nothing about either: they check the order,
streams and lifetimes of the device work the backend asks for, and what each engine was given
to read. Numerical parity with TensorRT is tests/gpu's job.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import replace

import numpy as np
import pytest

from runtime.errors import LladaVError
from runtime.pipeline import Pipeline, empty_past
from runtime.pruning import PruneSettings, keep_by_score, keep_duplicate_aware, kept_positions, pick_pivots
from runtime.schedule import GenerationSettings
from runtime.backends.trt import TrtBackend, make_trt_runners, row_runs
from tests.conftest import gradient_image
from runtime.caching import CacheSettings, cache_window
from tests.cuda_doubles import (Call, HazardError, OrtEngine, RecordedEngine, Recorder, SimulatedCuda, SimulatedEngine,
                                Work, device_work, expected_device_work, stamp, streams_used)

GEN = GenerationSettings(steps=3, gen_length=6, block_length=6)
PROMPT = "What is ahead of the car?"


class Device:
    """A simulated CUDA device and stand-in engines, every call recorded in one log. compute: the
    engines compute with ONNX Runtime (OrtEngine) instead of writing stamps."""

    def __init__(self, profiles: dict | None = None, fail: str | None = None, compute: bool = False,
                 kv_cache: bool = True):
        self.sim, self.log = SimulatedCuda(), []
        self.engines: dict[str, SimulatedEngine] = {}
        self.profiles, self.fail, self.compute, self.kv_cache = profiles or {}, fail, compute, kv_cache

    def runners(self, bundle):
        manifest, float_dtype = bundle.manifest, bundle.float_dtype

        def engine(name, path):
            if name == self.fail:
                raise LladaVError(f"{name}: could not be deserialized")
            if self.compute:
                import onnxruntime as ort

                session = ort.InferenceSession(str(bundle.graph(name)),
                                               providers=["CPUExecutionProvider"])
                self.engines[name] = OrtEngine(manifest, name, float_dtype, self.sim, session)
            else:
                self.engines[name] = SimulatedEngine(manifest, name, float_dtype, self.sim, self.profiles.get(name))
            return RecordedEngine(self.engines[name], name, self.log)

        return make_trt_runners(bundle, lambda: Recorder(self.sim, self.log), engine, self.kv_cache)

    def calls(self, op: str) -> list[Call]:
        return [c for c in self.log if c.op == op]


@pytest.fixture
def image():
    return gradient_image(160, 120)


def generate(bundle, device: Device, prune=PruneSettings(k=15, p=50), gens: int = 1):
    """Run `gens` generations inside one activation, with warnings turned into errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Pipeline(bundle, backend="tensorrt", runner_factory=device.runners) as pipe:
            results = [pipe.generate(gradient_image(160, 120), PROMPT, GEN, prune) for _ in range(gens)]
    return pipe, results


def test_row_runs_reassemble_the_gather():
    rows = np.array([0, 1, 2, 5, 6, 9, 12, 13, 14, 15])
    runs = row_runs(rows)
    assert runs == [(0, 0, 3), (5, 3, 2), (9, 5, 1), (12, 6, 4)]
    source = np.arange(20) * 10
    gathered = np.empty(rows.size, dtype=int)
    for src, dst, count in runs:  # what the device-to-device copies do, row by row
        gathered[dst : dst + count] = source[src : src + count]
    assert np.array_equal(gathered, source[rows])
    assert row_runs(np.arange(7)) == [(0, 0, 7)]  # P=0: one copy


def test_the_simulation_catches_the_faults_issue_8_found():
    """The checker is live: two streams without ordering race (the old design: decoder_pre on its
    stream, decoder_post reading the result on another); reads before a sync see poison; frees
    and timings of unfinished work are refused."""
    sim = SimulatedCuda()
    a, b = sim.stream_create(), sim.stream_create()
    hidden = sim.malloc(64)
    sim.issue(Work(a, "enqueue decoder_pre", [], [(hidden, 64)], lambda: None))
    with pytest.raises(HazardError, match="races with enqueue decoder_pre"):
        sim.issue(Work(b, "enqueue decoder_post", [(hidden, 64)], [], lambda: None))
    with pytest.raises(HazardError, match="while queued work uses it"):
        sim.free(hidden)
    sim.stream_synchronize(a)  # what the old step 1 did by accident, and its later steps did not
    sim.issue(Work(b, "enqueue decoder_post", [(hidden, 64)], [], lambda: None))
    host = np.zeros(16, np.float32)
    sim.copy_dtoh(host, hidden, b)
    assert np.isnan(host).all()  # not there before the host waits
    sim.stream_synchronize(b)
    assert not np.isnan(host).any()
    start, end = sim.event_create(), sim.event_create()
    sim.event_record(start, a)
    sim.event_record(end, a)
    with pytest.raises(HazardError, match="not completed"):
        sim.event_elapsed_ms(start, end)
    sim.event_synchronize(end)
    assert sim.event_elapsed_ms(start, end) == 0.0
    with pytest.raises(HazardError, match="not inside one live allocation"):
        sim.copy_dtod(hidden + 32, hidden, 64, a)


def test_three_step_generation_device_work(runtime_bundles, capfd):
    """Order and stream of every copy, enqueue, event and wait over a three-step K=15 P=50 generation."""
    device = Device()
    pipe, (result,) = generate(runtime_bundles[15], device)
    assert capfd.readouterr().err == ""  # nothing logged per step (Polygraphy's DeviceView.dtype warned every step)
    lay = result.layout
    kept = kept_positions(lay, result.kept_visual)
    n, g = kept.size, lay.n_response
    assert device_work(device.log) == expected_device_work(len(row_runs(kept)), later_steps=2)

    assert len(device.calls("stream_create")) == 1 and streams_used(device.log) == {device.calls("stream_create")[0].result}
    first_run = next(i for i, c in enumerate(device.log) if c.op == "enqueue")
    assert all(i < first_run for i, c in enumerate(device.log) if c.op == "malloc")  # nothing after activation
    assert len(device.calls("malloc")) == sum((len(e.inputs) + len(e.outputs)) * len(e.shapes)  # per profile
                                              for e in pipe.manifest.subgraphs.values())
    step1_post = next(i for i, c in enumerate(device.log) if c.op == "enqueue" and c.args[0] == "decoder_post")
    uploads = [c for c in device.log[step1_post:] if c.op == "copy_htod"]
    assert [c.args[1] for c in uploads] == [("host", g * 64 * 4)] * 2  # later steps upload the G response rows only

    # what each engine read
    pre, post = device.engines["decoder_pre"].runs, device.engines["decoder_post"].runs
    saliency = stamp(1, (1, lay.total), np.float32)[0, lay.visual]
    (sim,) = device.engines["similarity"].runs  # step 1 only, on decoder_pre's hidden states as it left them
    pivots = pick_pivots(saliency, 8)
    assert np.array_equal(sim["hidden_states"], stamp(1, (1, lay.total, 64), np.float32))
    assert np.array_equal(sim["visual_rows"], np.arange(lay.visual.start, lay.visual.stop)) and np.array_equal(sim["pivots"], pivots)
    similarities = stamp(1, (1, 8, lay.n_visual), np.float32)[0]
    assert np.array_equal(result.kept_visual, keep_duplicate_aware(similarities, pivots, 50))
    assert not np.array_equal(result.kept_visual, keep_by_score(saliency, 50))
    assert np.array_equal(post[0]["hidden_states"], stamp(1, (1, lay.total, 64), np.float32)[:, kept])
    for step in (1, 2):
        assert np.array_equal(post[step]["hidden_states"], stamp(step + 1, (1, n, 64), np.float32))
    for seen in (*pre[1:], *post):
        assert np.array_equal(seen["position_ids"], kept[None])
    assert all(np.array_equal(p["logit_rows"], np.arange(n - g, n)) for p in post)
    assert all(np.array_equal(p["score_rows"], [n - 1]) for p in pre[1:])
    prompt_rows = pre[0]["inputs_embeds"][:, kept[: n - g]]
    mask_row = pipe.embed[pipe.tokenizer.ids.mask]
    for step in (1, 2):
        x = pre[step]["inputs_embeds"]
        assert np.array_equal(x[:, : n - g], prompt_rows)
        unmasked = [i for i in range(g) if not np.array_equal(x[0, n - g + i], mask_row)]
        assert len(unmasked) == sum(result.denoise.transfers[:step])
        assert all(np.array_equal(x[0, n - g + i], pipe.embed[result.denoise.response[i]]) for i in unmasked)
    # the events' clock, not the host's; step 1's decoder_pre time includes the similarity engine's
    assert [(s.pre_ms, s.post_ms) for s in result.steps] == [(2.0, 1.0)] + [(1.0, 1.0)] * 2


def test_everything_allocated_is_freed_and_nothing_per_generation(runtime_bundles):
    device = Device()
    generate(runtime_bundles[15], device, gens=2)
    mallocs, frees = device.calls("malloc"), device.calls("free")
    first_run = next(i for i, c in enumerate(device.log) if c.op == "enqueue")
    assert all(i < first_run for i, c in enumerate(device.log) if c.op == "malloc")  # two answers, none after activation
    assert sorted(c.result for c in mallocs) == sorted(c.args[0] for c in frees)
    assert sorted(c.result for c in device.calls("event_create")) == sorted(c.args[0] for c in device.calls("event_destroy"))
    assert len(device.calls("event_create")) == 2 * len(device.engines)  == 8  # a pair per engine
    assert [c.args[0] for c in device.calls("stream_destroy")] == [device.calls("stream_create")[0].result]
    assert device.sim.memory == {} and device.sim.pending() == 0


@pytest.mark.parametrize("p", [0, 70])
def test_unpruned_and_heavily_pruned_runs_keep_the_same_discipline(runtime_bundles, p):
    device = Device()
    _, (result,) = generate(runtime_bundles[15], device, PruneSettings(k=15, p=p))
    assert len(device.calls("copy_dtod")) == (0 if p == 0 else len(row_runs(kept_positions(result.layout, result.kept_visual))))
    assert len(streams_used(device.log)) == 1 and device.sim.memory == {}


def test_an_engine_built_for_another_profile_is_refused(runtime_bundles):
    """set_input_shape's result is checked: at activation (the profile's maxima) and at run time."""
    from runtime.bundle import read_manifest

    entry = read_manifest(runtime_bundles[15]).subgraphs["decoder_pre"]
    narrow = {n: {**s, "max": [*s["max"][:-1], s["max"][-1] // 2] if n == "score_rows" else s["max"]}
              for n, s in entry.shapes[0].items()}
    device = Device(profiles={"decoder_pre": [narrow, entry.shapes[1]]})
    with pytest.raises(LladaVError, match=r"decoder_pre: the engine refused shape \(\d+,\) for input 'score_rows'"):
        generate(runtime_bundles[15], device)
    assert device.sim.memory == {} and not device.sim.queues  # what activation had allocated is freed


def test_a_shape_refused_at_run_time_stops_before_the_enqueue(runtime_bundles):
    device = Device()
    with Pipeline(runtime_bundles[15], backend="tensorrt", runner_factory=device.runners) as pipe:
        pre = pipe.runners["decoder_pre"]
        engine = device.engines["decoder_pre"]
        engine.profiles = [{**engine.profiles[0], "score_rows": {"min": [1], "max": [1]}}, engine.profiles[1]]
        feeds = {"inputs_embeds": np.zeros((1, 10, 64), np.float32), "position_ids": np.zeros((1, 10), np.int64),
                 "score_rows": np.zeros(2, np.int64), **empty_past(pipe.manifest, "decoder_pre", 1, np.float32)}
        with pytest.raises(LladaVError, match=r"refused shape \(2,\) for input 'score_rows'"):
            pre.infer(feeds)
    assert not device.calls("enqueue") and device.sim.memory == {}


def test_failed_activation_frees_what_it_allocated(runtime_bundles):
    device = Device(fail="decoder_post")
    with pytest.raises(LladaVError, match="decoder_post: could not be deserialized"):
        generate(runtime_bundles[15], device)
    assert device.calls("malloc") and device.sim.memory == {} and not device.sim.queues and not device.sim.events


def test_an_engine_with_other_tensors_is_refused(runtime_bundles):
    device = Device()

    def runners(bundle):
        manifest, float_dtype = bundle.manifest, bundle.float_dtype
        other = replace(manifest.subgraphs["vision"], outputs=[replace(manifest.subgraphs["vision"].outputs[0],
                                                                       name="features")])
        wrong = lambda name, path: SimulatedEngine(manifest, name, float_dtype, device.sim,  # noqa: E731
                                                   entry=other if name == "vision" else None)
        return make_trt_runners(bundle, lambda: device.sim, wrong)

    with pytest.raises(LladaVError, match=r"vision: the engine's tensors are \['features', 'pixel_values'\]"):
        with Pipeline(runtime_bundles[15], backend="tensorrt", runner_factory=runners):
            pass
    assert device.sim.memory == {}


def test_gather_and_row_writes_cover_every_batch_entry(runtime_bundles):
    """Classifier-free guidance runs batch 2: the step-1 gather and the response-row writes serve both."""
    from runtime.bundle import Bundle

    bundle = Bundle(runtime_bundles[15])
    manifest = bundle.manifest
    for entry in manifest.subgraphs.values():
        for profile in entry.shapes:
            for name, shapes in profile.items():
                if len(shapes["max"]) > 1 and entry.name != "vision":
                    shapes["max"][1 if name.startswith("past_") else 0] = 2  # the batch axis (K/V: after the layers)
    sim = SimulatedCuda()
    backend = TrtBackend(bundle, lambda: sim,
                         lambda name, path: SimulatedEngine(manifest, name, np.float32, sim))
    backend.acquire()
    x = np.random.default_rng(0).standard_normal((2, 40, 64)).astype(np.float32)
    staged = backend.stage("decoder_pre", "inputs_embeds", x)
    rows = np.array([0, 1, 2, 7, 8, 20, 39])
    gathered = backend.gather_rows(staged, rows, "decoder_post", "hidden_states")
    response = np.full((3, 64), 5.0, np.float32)
    backend.write_rows(staged, 37, response)
    host = backend.to_host({"g": gathered, "s": staged})
    assert np.array_equal(host["g"], x[:, rows])
    want = x.copy()
    want[:, 37:] = response
    assert np.array_equal(host["s"], want)

    # the KV cache's gather: every layer, batch entry and head of the past rows, one strided copy per run
    present = backend.buffers["decoder_post", 0, "present_keys"]
    kv = np.random.default_rng(1).standard_normal((17, 2, 4, 40, 16)).astype(np.float32)
    sim.copy_htod(present.ptr, kv, backend.stream)
    src = type(present)(present.ptr, kv.shape, present.dtype)
    before = len([w for q in sim.queues.values() for w in q])
    past = backend.gather_past(src, rows, "decoder_post", "past_keys")
    assert len([w for q in sim.queues.values() for w in q]) - before == len(row_runs(rows))
    assert np.array_equal(backend.to_host({"p": past})["p"], kv[:, :, :, rows])
    backend.release()
    assert sim.memory == {}


CACHED_GEN = GenerationSettings(steps=8, gen_length=8, block_length=4)  # two blocks: prefix and dual differ


@pytest.mark.parametrize("mode,refresh_every", [("prefix", 0), ("dual", 0), ("dual", 2)])
@pytest.mark.parametrize("p", [0, 50])
def test_the_device_cache_generates_the_onnxruntime_backends_tokens(runtime_bundles, mode, refresh_every, p):
    """The TensorRT backend's cached path (refresh K/V left in the full profile's buffers, past rows
    gathered by strided copies into the cached profile's, window rows uploaded, the engine switched
    between its profiles) over simulated CUDA, with engines that compute with ONNX Runtime: the same
    tokens, kept tokens and rows per step as the ONNX Runtime backend (also with a refresh every 2nd
    step inside a block: profile switches mid-block). Not TensorRT: its data movement."""
    from calib.data import RecordingRunner
    from runtime.backends import make_runners

    prune, cache = PruneSettings(k=15, p=p), CacheSettings(mode, refresh_every)
    image, question = gradient_image(320, 200), "Is the traffic light red?"
    device = Device(compute=True)
    with Pipeline(runtime_bundles[15], backend="tensorrt", runner_factory=device.runners) as pipe:
        got = pipe.generate(image, question, CACHED_GEN, prune, cache=cache)
    recorded = {}

    def recording(bundle):
        recorded.update({n: RecordingRunner(r) for n, r in make_runners("onnxruntime", bundle).items()})
        return recorded

    with Pipeline(runtime_bundles[15], runner_factory=recording) as pipe:
        want = pipe.generate(image, question, CACHED_GEN, prune, cache=cache)
    for name in ("decoder_pre", "decoder_post"):  # every feed of every run, the past K/V included
        runs, calls = device.engines[name].runs, recorded[name].calls
        assert len(runs) == len(calls)
        for i, (seen, fed) in enumerate(zip(runs, calls)):
            for tensor, x in fed.items():
                assert seen[tensor].shape == x.shape and np.allclose(seen[tensor], x, rtol=0, atol=1e-6), (name, i, tensor)
    assert np.array_equal(got.denoise.response, want.denoise.response) and got.answer_ids == want.answer_ids
    assert np.array_equal(got.kept_visual, want.kept_visual)
    assert [s.rows for s in got.steps] == [s.rows for s in want.steps]
    assert min(s.rows for s in got.steps) < got.steps[0].seq_len  # cached steps happened
    assert device.sim.memory == {} and len(streams_used(device.log)) == 1


def test_device_cache_work_per_refresh(runtime_bundles):
    """Dual cache, K=15 P=50, two blocks of 4 over 8 steps (a refresh and three cached steps per block):
    nothing allocated after activation; each refresh's first cached step gathers the past rows once per
    half and tensor, one strided copy per run of rows (step 1's decoder_pre: the kept rows' runs); the
    engines switch profiles only between refreshes and cached steps; a cached step uploads its window's
    rows, never the staged reduced sequence, and reads the gathered past K/V in place."""
    device = Device()
    with Pipeline(runtime_bundles[15], backend="tensorrt", runner_factory=device.runners) as pipe:
        result = pipe.generate(gradient_image(320, 200), PROMPT, CACHED_GEN, PruneSettings(k=15, p=50),
                               cache=CacheSettings("dual"))
    lay = result.layout
    kept = kept_positions(lay, result.kept_visual)
    n, g = kept.size, lay.n_response
    first_run = next(i for i, c in enumerate(device.log) if c.op == "enqueue")
    assert all(i < first_run for i, c in enumerate(device.log) if c.op == "malloc")
    assert [s.rows for s in result.steps] == [n, 4, 4, 4, n, 4, 4, 4]

    windows = [cache_window("dual", n, g, block) for block in ((0, 4), (4, 8))]
    runs = lambda rows: len(row_runs(rows))  # noqa: E731
    want = 2 * (runs(kept[windows[0].past]) + runs(windows[0].past)) + 2 * 2 * runs(windows[1].past)
    copies = device.calls("copy_2d_dtod")
    assert len(copies) == want
    dims = pipe.manifest.model_dims()
    assert {c.args[5] for c in copies} == {dims["Lpre"] * dims["H"], dims["Lpost"] * dims["H"]}  # layers x batch x heads

    switches = [(c.args[0], c.args[1]) for c in device.log[first_run:] if c.op == "set_profile"]
    per_block = [("decoder_pre", 1), ("decoder_post", 1)]
    assert switches == per_block + [("decoder_pre", 0), ("decoder_post", 0)] + per_block

    pre, post = device.engines["decoder_pre"].runs, device.engines["decoder_post"].runs
    assert [r["inputs_embeds"].shape[1] for r in pre] == [lay.total, 4, 4, 4, n, 4, 4, 4]
    assert [r["past_keys"].shape[3] for r in post] == [0, n - 4, n - 4, n - 4, 0, n - 4, n - 4, n - 4]
    # the past rows a cached step of block 2 reads are the refresh's (step 5) present K/V of those rows
    refresh_kv = stamp(5, (dims["Lpost"], 1, dims["H"], n, dims["Dh"]), np.float32)
    assert np.array_equal(post[5]["past_keys"], refresh_kv[:, :, :, windows[1].past])
    for step in (1, 2, 3, 5, 6, 7):  # window position ids: the block's rows of the reduced sequence
        block = windows[0] if step < 4 else windows[1]
        assert np.array_equal(pre[step]["position_ids"], kept[None, block.compute])
    assert np.array_equal(pre[4]["inputs_embeds"][:, : n - g], pre[0]["inputs_embeds"][:, kept[: n - g]])  # staged intact


def test_without_the_kv_cache_only_the_full_profile_is_allocated(runtime_bundles):
    """kv_cache=False (the runtime's --cache none): the cached-step profile's buffers (the K/V cache among
    them) are never allocated; uncached generations run as before; a cached one is refused by name."""
    with_cache, without = Device(), Device(kv_cache=False)
    generate(runtime_bundles[15], with_cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Pipeline(runtime_bundles[15], backend="tensorrt", runner_factory=without.runners, kv_cache=False) as pipe:
            result = pipe.generate(gradient_image(160, 120), PROMPT, GEN, PruneSettings(k=15, p=50))
            with pytest.raises(LladaVError, match="cache dual: this pipeline was opened without KV-cache buffers"):
                pipe.generate(gradient_image(160, 120), PROMPT, GEN, PruneSettings(k=15, p=50),
                              cache=CacheSettings("dual"))
    kept = kept_positions(result.layout, result.kept_visual)
    assert device_work(without.log) == expected_device_work(len(row_runs(kept)), later_steps=2)
    m = pipe.manifest
    assert len(without.calls("malloc")) == sum(len(e.inputs) + len(e.outputs) for e in m.subgraphs.values())
    saved = sum(c.args[0] for c in with_cache.calls("malloc")) - sum(c.args[0] for c in without.calls("malloc"))
    dims, seq_max = m.model_dims(), m.profiles["axes"]["seq"][2]
    cache_bytes = 2 * (dims["Lpre"] + dims["Lpost"]) * dims["H"] * seq_max * dims["Dh"] * 4  # past K and V, fp32
    assert saved > cache_bytes  # the cache and the cached profile's other (small) buffers
    assert without.sim.memory == {}


def test_cuda_runtime_over_the_real_libcudart():
    """runtime/backends/cuda.py's ctypes layer over the real libcudart. Without a GPU (this CI has the CUDA
    toolkit but no driver) every call fails with an error naming the call and CUDA's error; with
    one, a round trip through device memory on a stream, timed by events."""
    from runtime.backends.cuda import CudaError, CudaRuntime

    try:
        cuda = CudaRuntime()
    except CudaError as exc:
        pytest.skip(f"no libcudart on this host: {exc}")
    try:
        ptr = cuda.malloc(4096)
    except CudaError as exc:
        assert re.fullmatch(r"cudaMalloc failed: cudaError\w+ \(.+\)", str(exc)), str(exc)
        return
    stream, start, end = cuda.stream_create(), cuda.event_create(), cuda.event_create()
    x, back = np.arange(1024, dtype=np.float32), np.zeros(1024, np.float32)
    cuda.event_record(start, stream)
    cuda.copy_htod(ptr, x, stream)
    cuda.copy_dtoh(back, ptr, stream)
    cuda.event_record(end, stream)
    cuda.stream_synchronize(stream)
    cuda.event_synchronize(end)
    assert np.array_equal(back, x) and cuda.event_elapsed_ms(start, end) >= 0
    for event in (start, end):
        cuda.event_destroy(event)
    cuda.stream_destroy(stream)
    cuda.free(ptr)


def test_an_error_after_queued_work_waits_for_the_stream_before_destroying_contexts(runtime_bundles):
    """An enqueue that fails midway leaves earlier work queued: the backend synchronises the stream
    before the execution contexts go (and before their buffers are freed)."""
    device = Device()
    original = SimulatedEngine.enqueue

    def enqueue(self, stream):  # decoder_post's first enqueue fails, after vision and decoder_pre queued work
        return False if self.entry.name == "decoder_post" else original(self, stream)

    SimulatedEngine.enqueue = enqueue
    try:
        with pytest.raises(LladaVError, match="decoder_post: TensorRT could not enqueue"):
            generate(runtime_bundles[15], device)
    finally:
        SimulatedEngine.enqueue = original
    ops = [c.op for c in device.log]
    first_close, last_enqueue = ops.index("close"), len(ops) - 1 - ops[::-1].index("enqueue")
    assert last_enqueue < first_close  # decoder_pre's work was queued, then the error
    assert "stream_synchronize" in ops[last_enqueue:first_close]  # that work finished before any context went
    assert ops.index("free") > first_close and device.sim.memory == {}


def test_a_profile_switch_that_raises_becomes_the_projects_error():
    """TensorRT's Python binding raises RuntimeError from set_optimization_profile_async (pyCore.cpp,
    release/10.3) instead of returning False: TrtEngine.set_profile turns it into False, which the
    backend reports by name."""
    from runtime.backends.trt import TrtEngine

    class Context:
        def set_optimization_profile_async(self, index, stream):
            raise RuntimeError("Error in set optimization profile async.")

    engine = TrtEngine.__new__(TrtEngine)
    engine.context = Context()
    assert engine.set_profile(1, 0) is False


def test_a_timing_cache_from_another_device_is_refused_before_building(tmp_path, monkeypatch):
    """setTimingCache returns false for a cache recorded on another device (NvInfer.h, release/10.3);
    the build stops there with the cache's path, before build_serialized_network."""
    import sys
    from unittest import mock

    from export.engine_config import EngineBuildSettings
    from export.trt_build import EngineBuildError, build_engine

    trt = mock.MagicMock()
    config = trt.Builder.return_value.create_builder_config.return_value
    config.set_timing_cache.return_value = False
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another GPU")
    with pytest.raises(EngineBuildError, match="timing.cache: recorded on another GPU or TensorRT version"):
        build_engine(tmp_path / "g.onnx", tmp_path / "g.engine", [], EngineBuildSettings("fp16"), cache)
    assert not trt.Builder.return_value.build_serialized_network.called and not (tmp_path / "g.engine").exists()


def test_host_sources_of_uploads_stay_alive_until_the_stream_is_synchronised():
    """cudaMemcpyAsync from pageable memory need not have read its source on return (docs/cuda.md):
    CudaRuntime holds each host source until the stream is synchronised, then lets go of it."""
    import gc
    import weakref

    from runtime.backends.cuda import CudaRuntime

    class Lib:  # libcudart's calls that succeed, recording nothing
        def __getattr__(self, name):
            return lambda *args: 0

    cuda = CudaRuntime(Lib())
    source = np.arange(8, dtype=np.float32)
    alive = weakref.ref(source)
    cuda.copy_htod(1234, source, 7)
    del source
    gc.collect()
    assert alive() is not None  # the caller dropped it; the copy may still read it
    cuda.stream_synchronize(7)
    gc.collect()
    assert alive() is None and cuda.in_flight == {}
