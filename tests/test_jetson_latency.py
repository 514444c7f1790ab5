"""jetson/latency.py: the ONNX Runtime report end to end on the tiny bundle, the Jetson plan (--dry-run),
and bad input. Nothing here runs trtexec, tegrastats or TensorRT."""

from __future__ import annotations

import contextlib
import json
import re
import shlex

import numpy as np
import pytest

from jetson import latency
from jetson.plan import answer_cases, generation
from runtime.bundle import read_manifest
from runtime.errors import LladaVError

# every flag the plan uses, as TensorRT 10.3's trtexec spells it (samples/common/sampleOptions.cpp, release/10.3)
TRTEXEC_10_3_FLAGS = {"--loadEngine", "--shapes", "--loadInputs", "--noDataTransfers", "--useCudaGraph", "--useSpinWait",
                      "--warmUp", "--duration", "--iterations", "--percentile", "--exportTimes", "--exportProfile",
                      "--separateProfileRun", "--useProfile"}  # --useProfile: samples/common/sampleOptions.cpp, 10.0+


def test_onnxruntime_report_end_to_end(runtime_bundles, tmp_path):
    out = tmp_path / "report"
    argv = ["--bundle", str(runtime_bundles[15]), "--backend", "onnxruntime", "--p", "0,50", "--iterations", "3",
            "--repeats", "1", "--out", str(out)]
    assert latency.main(argv) == 0
    r = json.loads((out / "report.json").read_text())
    assert (out / "report.png").stat().st_size > 0 and "no trtexec, no tegrastats" in (out / "report.md").read_text()
    g = r["generation"]
    assert (g["tiles"], g["visual"], g["response"], g["steps"]) == (1, 729, 8, 8)  # the bundle's opt response
    median = {c["label"]: c["compute_ms"]["median"] for c in r["cases"]}
    n = g["text"] + 729 + 8
    for a in r["answers"]:
        n_red = n - 729 * int(a["p"]) // 100
        pre_step1 = median[f"decoder_pre seq={n} rows={8 if a['p'] else 1}"]
        post, pre = median[f"decoder_post seq={n_red} rows=8"], median[f"decoder_pre seq={n_red} rows=1"]
        # the bundle's rule (duplicate): step 1 also runs the similarity graph, where tokens are dropped
        pre_step1 += median[f"similarity seq={n} visual=729 pivots=8"] if a["p"] else 0.0
        assert f"similarity seq={n} visual=729 pivots=8" in median
        assert a["predicted_ms"] == pytest.approx(median["vision tiles=1"] + pre_step1 + post + 7 * (pre + post))
        past = n_red - 8  # with a dual cache the later steps run the 8 response rows against the others' K/V
        cached = median[f"decoder_pre seq=8 rows=1 past={past}"] + median[f"decoder_post seq=8 rows=8 past={past}"]
        assert a["predicted_dual_cache_ms"] == pytest.approx(median["vision tiles=1"] + pre_step1 + post + 7 * cached)
        m = a["measured"]
        assert m["steps"] == 8 and m["seq_len"] == n_red and m["total_ms"] >= m["engines_ms"] > 0
        assert len(m["dual_cache_total_ms_runs"]) == 1 and m["dual_cache_total_ms"] > 0  # the same answer, cached
    assert "| measured with dual cache ms |" in (out / "report.md").read_text()
    assert r["answers"][0]["predicted_vs_p0"] == 1.0 and 0 < r["answers"][1]["flops_vs_p0"] < 1


def test_a_failed_report_leaves_the_earlier_one(runtime_bundles, tmp_path, monkeypatch):
    import jetson.report as report

    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("earlier")

    def broken_plot(r, path):
        raise OSError("disk full")

    monkeypatch.setattr(report, "plot", broken_plot)
    with pytest.raises(LladaVError, match=r"--out .*report could not be written there \(disk full\); nor in a "
                                          r"temporary directory; here it is:\n# ") as caught:
        latency.latency_report(latency.LatencyRequest(runtime_bundles[15], "onnxruntime", ps=(0,), iterations=1, repeats=1, out=out))
    assert "predicted" in str(caught.value)  # the report's table itself: the timing runs are not lost
    assert (out / "report.md").read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == ["report"]


def test_the_report_directory_keeps_what_it_did_not_write_and_a_file_is_refused_first(runtime_bundles, tmp_path,
                                                                                       monkeypatch):
    """--out is the user's: a file there is refused before any timing run (and left alone); a folder
    keeps its other files; only report.* are written."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"1")
    latency.latency_report(latency.LatencyRequest(runtime_bundles[15], "onnxruntime", ps=(0,), iterations=1, repeats=1, out=out))
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "data.bin").read_bytes() == b"1"
    assert {"report.json", "report.md", "report.png"} <= {p.name for p in out.iterdir()}
    target = tmp_path / "a-file"
    target.write_text("keep me")
    monkeypatch.setattr(latency, "measure", lambda *a, **k: pytest.fail("timed before checking --out"))
    assert latency.main(["--bundle", str(runtime_bundles[15]), "--backend", "onnxruntime", "--out", str(target)]) == 2
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps: got 0; expected an integer >= 1"),
    (["--steps", "-5"], "--steps: got -5; expected an integer >= 1"),
    (["--iterations", "0"], "--iterations: got 0; expected an integer >= 1"),
    (["--repeats", "0"], "--repeats: got 0; expected an integer >= 1"),
])
def test_counts_are_checked_before_the_timing_runs(runtime_bundles, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(latency, "measure", lambda *a, **k: pytest.fail("timed before checking the flags"))
    assert latency.main(["--bundle", str(runtime_bundles[15]), "--backend", "onnxruntime", "--out", str(tmp_path / "r")]
                     + argv) == 2
    assert message in capsys.readouterr().err


def test_dry_run_prints_the_jetson_plan(runtime_bundles, capsys):
    bundle = runtime_bundles[15]
    assert latency.main(["--bundle", str(bundle), "--dry-run", "--lock-clocks", "--p", "0,50,70"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == ["sudo jetson_clocks --store '$WORK/clocks.conf'", "sudo jetson_clocks"]
    assert lines[-1] == "sudo jetson_clocks --restore '$WORK/clocks.conf'"
    assert lines[3] == f"bash {bundle}/jetson/build_engines.sh"  # no engines yet: built with the bundle's commands
    m = read_manifest(bundle)
    text = int(re.search(r"(\d+) text", lines[0]).group(1))  # the prompt's token count, as the plan states it
    g = generation(m, tuple(m.profiles["settings"]["opt_image"]), text, 8, 8)
    want = set()
    for p in (0, 50, 70):
        a = answer_cases(m, g, p)
        want |= {",".join(f"{n}:{'x'.join(map(str, s))}" for n, s in c.shapes) for c in a.cases}
        assert a.pre_cached.label.endswith(f"past={g.reduced(p) - g.response}")  # the cached-step shapes are profiled
    runs = [shlex.split(line) for line in lines if "trtexec" in line]
    assert {a.split("=", 1)[1] for cmd in runs for a in cmd if a.startswith("--shapes=")} == want
    for cmd in runs:
        flags = {a.split("=", 1)[0] for a in cmd[1:]}
        assert flags <= TRTEXEC_10_3_FLAGS, flags - TRTEXEC_10_3_FLAGS
        engine = next(a.split("=", 1)[1] for a in cmd if a.startswith("--loadEngine="))
        shapes = dict(s.split(":") for s in next(a for a in cmd if a.startswith("--shapes=")).split("=", 1)[1].split(","))
        assert set(shapes) == {t.name for t in m.subgraphs[engine.rsplit("/", 1)[1][:-7]].inputs}
        cached = "past_keys" in shapes and shapes["past_keys"].split("x")[3] != "0"
        assert [a for a in cmd if a.startswith("--useProfile")] == (["--useProfile=1"] if cached else [])
        if "vision" not in engine:  # integer inputs come from files, never trtexec's random values
            loads = next(a for a in cmd if a.startswith("--loadInputs=")).split("=", 1)[1]
            # float inputs (embeddings, cached K/V) take trtexec's random values
            floats = {"inputs_embeds", "hidden_states", "past_keys", "past_values"}
            assert {x.split(":")[0] for x in loads.split(",")} == set(shapes) - floats
    assert sum("tegrastats --interval" in line for line in lines) == len(runs) == len(want)
    assert sum(line.startswith("python -m runtime") for line in lines) == 3


@pytest.mark.parametrize("argv,message", [
    (["--p", "0,100"], "--p: got 100; expected percentages in [0, 100)"),
    (["--prompt", "word " * 300, "--backend", "onnxruntime"], "input 'inputs_embeds' would be (1, "),
    (["--dry-run", "--no-build"], "are missing in"),
    (["--backend", "tensorrt"], "the TensorRT Python package is not installed"),
    (["--image-size", "big"], None),
])
def test_bad_input_is_refused_before_any_long_run(runtime_bundles, tmp_path, capsys, argv, message):
    base = ["--bundle", str(runtime_bundles[15]), "--out", str(tmp_path / "r")]
    if message is None:
        with pytest.raises(SystemExit):
            latency.main(base + argv)
        assert "expected WIDTHxHEIGHT" in capsys.readouterr().err
        return
    assert latency.main(base + argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_the_jetson_package_imports_without_tensorrt_or_torch():
    import subprocess
    import sys

    code = ("import sys, jetson.latency, jetson.plan, jetson.trtexec, jetson.tegrastats, jetson.device, jetson.report; "
            "print(sorted(m for m in ('torch', 'tensorrt', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    assert re.search(r"usage: latency.py", subprocess.run([sys.executable, "jetson/latency.py", "--help"],
                                                          capture_output=True, text=True).stdout)


def test_the_engine_check_feeds_and_rule_come_from_the_bundle(runtime_bundles):
    """What the Jetson's engine check feeds (the bundle's validation shapes) runs through ONNX Runtime,
    and the rule it applies is the export's, recorded in the manifest (the car has no export code)."""
    from export.subgraphs import SUBGRAPHS
    from export.yardstick import NOISE_FACTOR
    from runtime.backends import make_runners
    from runtime.bundle import Bundle

    m = read_manifest(runtime_bundles[15])
    runners = make_runners("onnxruntime", Bundle(runtime_bundles[15]))
    for spec in SUBGRAPHS:
        # derived from the export's own validation (export.yardstick.engine_tolerances): twice its bound
        noise = max(c["noise"] for key, per in m.subgraphs[spec.name].validation.items() if key != "visual_tokens"
                    for c in per.values())
        assert set(m.subgraphs[spec.name].tolerances) == set(spec.output_names)
        assert max(a for a, _ in m.subgraphs[spec.name].tolerances.values()) == 2 * NOISE_FACTOR * noise
        with runners[spec.name] as runner:
            per_profile = latency.validation_feeds(m, spec.name)
            assert len(per_profile) == len(m.subgraphs[spec.name].shapes) == (2 if spec.name.startswith("decoder") else 1)
            for profile, feeds in enumerate(per_profile):  # Runner.check: names, dtypes, inside that profile
                for f in feeds:
                    assert set(runner.infer(f, profile=profile)) == {t.name for t in m.subgraphs[spec.name].outputs}
    assert m.subgraphs["decoder_pre"].tolerances["saliency"][1] == 2 * 2.0 ** -24  # twice fp32's unit roundoff


def test_no_gpu_is_a_clear_error():
    """Here libcudart loads (the CUDA toolkit is installed) but there is no driver or GPU."""
    from jetson import device
    from runtime.backends.cuda import CudaError, CudaRuntime
    from runtime.errors import LladaVError

    try:
        CudaRuntime()
    except CudaError as exc:
        pytest.skip(f"no libcudart on this host: {exc}")
    try:
        device.require_gpu()
    except LladaVError as exc:
        assert re.match(r"backend tensorrt: no usable GPU \(cudaMalloc failed: cudaError\w+", str(exc)), str(exc)
    else:
        pytest.skip("this host has a usable GPU")


@pytest.mark.parametrize("failure", [None, RuntimeError("trtexec failed"), KeyboardInterrupt()])
def test_clocks_are_stored_pinned_and_restored_whatever_happens(tmp_path, failure):
    from jetson import device

    ran = []
    store = tmp_path / "clocks.conf"
    with pytest.raises(type(failure)) if failure else contextlib.nullcontext():
        with device.locked_clocks(store, ran.append):
            ran.append(["trtexec"])
            if failure:
                raise failure
    assert ran == [["sudo", "jetson_clocks", "--store", str(store)], ["sudo", "jetson_clocks"], ["trtexec"],
                   ["sudo", "jetson_clocks", "--restore", str(store)]]
    assert device.identity(clocks_locked=False)["clocks_locked"] is False  # never claimed unless this run pinned them


def test_the_engine_check_runs_each_profiles_feeds_under_that_profile(monkeypatch, tmp_path):
    """runtime.checks.compare_engine with Polygraphy's runners replaced (no TensorRT here): one TensorRT
    runner per optimization profile, set to that profile, fed that profile's feeds; indices counted
    across profiles; a difference past the rule names the profile."""
    import polygraphy.backend.trt as poly_trt
    import polygraphy.comparator as poly_cmp

    from runtime.checks import EngineCheckError, compare_engine

    profiles_asked = []

    class FakeTrtRunner:
        def __init__(self, loader, name, optimization_profile):
            profiles_asked.append(optimization_profile)
            self.profile = optimization_profile

    def fake_run(runners, data_loader):
        trt_out = [{"y": f["x"] + (0.5 if runners[0].profile == 1 and f["x"][0] > 9 else 0.0)} for f in data_loader]
        return [("tensorrt", trt_out), ("onnxrt", [{"y": f["x"]} for f in data_loader])]

    monkeypatch.setattr(poly_trt, "TrtRunner", FakeTrtRunner)
    monkeypatch.setattr(poly_cmp.Comparator, "run", staticmethod(fake_run))
    feeds = [[{"x": np.ones(3)}, {"x": np.full(3, 2.0)}], [{"x": np.full(3, 3.0)}]]
    report = compare_engine(tmp_path / "e.engine", tmp_path / "g.onnx", feeds, {"y": (1e-4, 0.0)}, "decoder_pre")
    assert profiles_asked == [0, 1] and sorted(report) == ["0", "1", "2"]
    assert all(c["y"]["max_abs_diff"] == 0.0 for c in report.values())
    with pytest.raises(EngineCheckError, match=r"decoder_pre: e.engine \(profile 1\) output y differs"):
        compare_engine(tmp_path / "e.engine", tmp_path / "g.onnx", [[{"x": np.ones(3)}], [{"x": np.full(3, 10.0)}]],
                       {"y": (1e-4, 0.0)}, "decoder_pre")
