"""jetson/ parsers and command lines, on fixtures in the documented formats (tests/fixtures/README.md).
Nothing here runs trtexec or tegrastats."""

from __future__ import annotations

from pathlib import Path

import pytest

from jetson import tegrastats, trtexec

FIXTURES = Path(__file__).parent / "fixtures"


def read(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_export_times_use_trtexec_percentiles():
    t = trtexec.parse_times(read("trtexec_times.json"))["compute_ms"]
    assert (t["count"], t["min"], t["max"], t["median"], t["mean"]) == (5, 40, 44, 42, 42)
    # trtexec's findPercentile over [40, 41, 42, 43, 44]: p90 excludes int(0.1 * 5) = 0 -> 44; p50 excludes 2 -> 42
    assert t["p90"] == 44 and t["p99"] == 44 and trtexec.percentile([40, 41, 42, 43, 44], 50) == 42
    assert trtexec.percentile(list(range(100)), 90) == 89


def test_export_profile_ranks_layers_by_average_time():
    p = trtexec.parse_profile(read("trtexec_profile.json"), top=2)
    assert p["count"] == 20
    assert [layer["name"] for layer in p["layers"]] == [
        "Reformatting CopyNode for Input Tensor 0 to /model/norm/Cast", "/model/layers.0/mlp/down_proj/MatMul"]
    assert p["layers"][0] == {"name": p["layers"][0]["name"], "average_ms": 9.0, "median_ms": 9.2, "percent": 45.0}


def test_summary_lines_new_and_old():
    new = trtexec.parse_summary(read("trtexec_summary_10.3.txt"))
    assert new["GPU Compute Time"] == {"min": 41.19, "max": 43.06, "mean": 42.04, "median": 41.96, "p90": 42.71,
                                       "p95": 42.88, "p99": 43.06}
    assert set(new) == {"Latency", "Enqueue Time", "H2D Latency", "GPU Compute Time", "D2H Latency"}
    old = trtexec.parse_summary(read("trtexec_summary_old.txt"))
    assert old["GPU Compute Time"] == {"min": 8.1, "max": 8.9, "mean": 8.26, "median": 8.24, "p99": 8.8}


@pytest.mark.parametrize("name,gpu_load,gpu_mhz,rails", [
    ("tegrastats_jp6.txt", 55.0, 1300.0, {"VDD_GPU_SOC": 10139.0, "VDD_CPU_CV": 3368.0, "VIN_SYS_5V0": 6000.0}),
    ("tegrastats_jp7.txt", 90.0, 1250.0, {"VDD_GPU_SOC": 12000.0, "VDD_CPU_CV": 3000.0}),
])
def test_tegrastats_jetpack_6_and_7(name, gpu_load, gpu_mhz, rails):
    s = tegrastats.summarize(read(name))
    assert s["gpu_load_percent"] == gpu_load and s["gpu_mhz"] == gpu_mhz and s["rails_mw"] == rails
    assert s["samples"] == len([line for line in read(name).splitlines() if line and not line.startswith("#")])
    assert s["ram_peak_mb"] in (20700, 21000)
