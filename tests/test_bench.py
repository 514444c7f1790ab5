"""Smoke test of the CPU benchmark command (timings are not asserted: benchmarks print them)."""

from __future__ import annotations

import json

import onnx
from PIL import Image

from bench.cpu import main


def test_quick_benchmark_writes_json_and_png(tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["--quick", "--workdir", str(tmp_path / "w"), "--json", str(out), "--png", str(png)]) == 0
    data = json.loads(out.read_text())
    assert set(data["cases"]) == {"a", "b", "c", "d", "e"}
    assert data["tokens"]["visual"] == 729 and data["cases"]["b"]["ratio_vs_b"] == 1.0
    assert all(0 < c["predicted_vs_b"] <= 1 for k, c in data["cases"].items() if k != "a")
    assert [r["steps"] for r in data["steps_sweep"]] == [2, 8]
    assert set(data["weight_bytes"]) >= {"vision", "decoder_pre", "decoder_post"}
    assert Image.open(png).size == (900, 380)
    assert "FLOPs pred." in capsys.readouterr().out


def test_quant_bench_times_every_decoder_in_every_variant(tmp_path, capsys):
    """bench.quant --quick: fp32, fp16, int8 on fp16 graphs (TensorRT's) and int8 on fp32 graphs (ONNX Runtime
    CPU's), each decoder timed once built; int8 weights are about a quarter of fp32's (fp16-based), under half (fp32-based, float32 LM head); the fp32-based
    int8 bundle's graphs take float32; the attention share is docs/flops.md's."""
    from bench.quant import VARIANTS, attention_share, main
    from runtime.bundle import read_manifest

    assert abs(attention_share(831, 1024, 2816) - 2 * 831 / (4 * 1024 + 2 * 831 + 3 * 2816)) < 1e-12
    assert 0.11 < attention_share(831, 1024, 2816) < 0.13  # d=1024: the linear layers dominate, as on the 8B
    assert main(["--quick", "--workdir", str(tmp_path), "--json", str(tmp_path / "q.json")]) == 0
    out = json.loads((tmp_path / "q.json").read_text())
    assert set(out["seconds"]) == {f"{v}/{g}" for v in VARIANTS for g in ("decoder_pre", "decoder_post")}
    assert all(t > 0 for t in out["seconds"].values())
    for g in ("decoder_pre", "decoder_post"):
        assert out["weight_bytes"][f"int8 fp16-based/{g}"] < 0.35 * out["weight_bytes"][f"fp32/{g}"]
        # fp32-based: the linears int8 too, but the LM head stays float32 (at d=128 a large share of decoder_post)
        assert out["weight_bytes"][f"int8 fp32-based/{g}"] < 0.45 * out["weight_bytes"][f"fp32/{g}"]
    m = read_manifest(tmp_path / "quick" / "int8-fp32-based")
    assert (m.precision, m.float_precision) == ("int8", "fp32")
    pre = onnx.load(str(tmp_path / "quick" / "int8-fp32-based" / "onnx" / "decoder_pre.onnx"), load_external_data=False)
    assert pre.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    text = capsys.readouterr().out
    assert "decoder_pre" in text and "x fp32" in text


def test_cache_bench_runs_every_setting_and_predicts_from_the_traces(tmp_path, capsys):
    """bench.cache --quick: the four settings each ran their whole schedule; the dual cache computed only
    the block's rows between refreshes (one per block and step 1); the predicted FLOPs ratio comes from
    each run's own trace and orders the settings as the rows computed do."""
    from bench.cache import QUICK, main

    assert main(["--quick", "--workdir", str(tmp_path), "--json", str(tmp_path / "c.json")]) == 0
    out = json.loads((tmp_path / "c.json").read_text())
    res = {r["name"]: r for r in out["results"]}
    plain, dual = res[f"K{QUICK.k} P50 uncached"], res[f"K{QUICK.k} P50 dual"]
    assert [r["steps"] for r in res.values()][:3] == [QUICK.gen] * 3
    n_red = plain["rows"][-1]
    blocks = QUICK.gen // QUICK.block
    assert sorted(set(dual["rows"])) == [QUICK.block, n_red] and dual["rows"].count(n_red) == blocks
    assert res["unpruned uncached"]["flops"] > plain["flops"] > dual["flops"]
    assert dual["cached_step_ms"] > 0 and plain["uncached_later_step_ms"] > 0
    assert "cached step vs uncached reduced step" in capsys.readouterr().out
