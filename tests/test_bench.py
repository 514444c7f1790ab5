"""Smoke test of the CPU benchmark command (timings are not asserted: benchmarks print them)."""

from __future__ import annotations

import json

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
