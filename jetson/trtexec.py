"""trtexec: the profiling command for one engine at one set of shapes, and parsers for what it writes.

Flags as TensorRT 10.3's trtexec spells them (`samples/common/sampleOptions.cpp`, branch
release/10.3): --loadEngine, --shapes=name:AxB,..., --loadInputs=name:file,..., --noDataTransfers,
--useCudaGraph, --useSpinWait, --warmUp=ms (default 200), --duration=s (3), --iterations=N (10),
--percentile=P1,P2 (90,95,99), --exportTimes=f.json, --exportProfile=f.json, --separateProfileRun.
Output formats (`samples/common/sampleReporting.cpp`): see the parsers; fixtures in tests/fixtures.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jetson.plan import Case, feeds

TRTEXEC_ON_JETPACK = "/usr/src/tensorrt/bin/trtexec"


@dataclass(frozen=True)
class Timing:
    warmup_ms: int = 200
    duration_s: float = 3.0
    iterations: int = 10
    cuda_graph: bool = True
    spin_wait: bool = True


def shapes_arg(case: Case) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in case.shapes)


INDEX_INPUTS = ("position_ids", "score_rows", "logit_rows", "visual_rows", "pivots")  # int64: trtexec would fill them with random values


def index_input_files(case: Case, directory: Path) -> dict[str, Path]:
    """Where the raw int64 values of a case's integer inputs go (for --loadInputs)."""
    return {name: directory / f"{case.subgraph}-{name}-{'x'.join(map(str, shape))}.bin"
            for name, shape in case.shapes if name in INDEX_INPUTS}


def write_index_inputs(case: Case, directory: Path) -> None:
    """The integer inputs' values (positions, row indices inside the sequence) in those files:
    random row indices would read outside the sequence."""
    directory.mkdir(parents=True, exist_ok=True)
    values = feeds(case, np.dtype(np.float32))
    for name, path in index_input_files(case, directory).items():
        values[name].tofile(path)


def profile_command(trtexec: str, engine: Path, case: Case, inputs: dict[str, Path], times: Path, profile: Path,
                    timing: Timing) -> list[str]:
    """Timed run (CUDA graph, no host transfers) exporting per-iteration times, then a separate run
    with the layer profiler exporting per-layer times."""
    cmd = [trtexec, f"--loadEngine={engine}", f"--shapes={shapes_arg(case)}"]
    cmd += [f"--useProfile={case.profile}"] if case.profile else []  # the cached-step profile (trtexec 10.0+)
    if inputs:
        cmd.append("--loadInputs=" + ",".join(f"{n}:{p}" for n, p in inputs.items()))
    cmd.append("--noDataTransfers")
    cmd += ["--useCudaGraph"] if timing.cuda_graph else []
    cmd += ["--useSpinWait"] if timing.spin_wait else []
    return cmd + [f"--warmUp={timing.warmup_ms}", f"--duration={timing.duration_s:g}", f"--iterations={timing.iterations}",
                  "--percentile=50,90,99", f"--exportTimes={times}", f"--exportProfile={profile}",
                  "--separateProfileRun"]


# ---------------------------------------------------------------- parsers


def percentile(sorted_ms: list[float], p: float) -> float:
    """trtexec's rule (sampleReporting.cpp findPercentile): of n ascending values, exclude
    int((1 - p/100) * n) from the top and take the largest remaining. trtexec computes it in
    32-bit float, where 1 - 0.9 rounds up (p90 of 100 values excludes 10): so do we."""
    n = len(sorted_ms)
    f32 = np.float32
    exclude = int((f32(1) - f32(p) / f32(100)) * f32(n))
    return sorted_ms[max(n - 1 - exclude, 0)]


def stats(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    n = len(s)
    median = (s[n // 2] + s[(n - 1) // 2]) / 2
    return {"count": n, "min": s[0], "max": s[-1], "mean": float(np.mean(s)), "median": median,
            "p90": percentile(s, 90), "p99": percentile(s, 99)}


def parse_times(text: str) -> dict[str, dict]:
    """--exportTimes: a JSON array, one object per timed iteration (startEnqMs, ..., h2dMs,
    computeMs, d2hMs, latencyMs). Returns stats of computeMs and latencyMs."""
    rows = json.loads(text)
    if not rows:
        raise ValueError("trtexec --exportTimes: no timed iterations")
    return {"compute_ms": stats([r["computeMs"] for r in rows]), "latency_ms": stats([r["latencyMs"] for r in rows])}


def parse_profile(text: str, top: int = 10) -> dict:
    """--exportProfile: [{"count": N}, {"name", "timeMs", "averageMs", "medianMs", "percentage"}, ...].
    Returns the run count and the `top` layers by average time."""
    rows = json.loads(text)
    count = rows[0]["count"]
    layers = sorted(rows[1:], key=lambda r: -r["averageMs"])
    return {"count": count, "layers": [{"name": r["name"], "average_ms": r["averageMs"], "median_ms": r["medianMs"],
                                        "percent": r["percentage"]} for r in layers[:top]]}


_SUMMARY = re.compile(r"(Latency|Enqueue Time|H2D Latency|GPU Compute Time|D2H Latency): (min = .*)$")
_VALUE = re.compile(r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\)) = ([-\d.e+]+) ms")


def parse_summary(text: str) -> dict[str, dict[str, float]]:
    """The '=== Performance summary ===' lines: 'GPU Compute Time: min = 41.19 ms, max = ..., mean = ...,
    median = ..., percentile(90%) = ..., percentile(99%) = ...' (older builds print only percentile(99%)).
    Keys: min, max, mean, median, p<P> for each percentile printed."""
    out = {}
    for line in text.splitlines():
        m = _SUMMARY.search(line)
        if not m:
            continue
        values = {}
        for key, pct, value in _VALUE.findall(m.group(2)):
            values[f"p{float(pct):g}" if pct else key] = float(value)
        out[m.group(1)] = values
    return out
