"""Numerical checks shared by the build (export/) and the Jetson profiler (jetson/): the tolerance
rule, validation feeds, and TensorRT vs ONNX Runtime through Polygraphy. No torch here, so the
car can run them; TensorRT is imported only by the engine check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.errors import LladaVError


class EngineCheckError(LladaVError):
    """A TensorRT engine's outputs differ from ONNX Runtime's beyond the bundle's tolerance."""


def scaled_diff(got, ref, atol: float, rtol: float) -> tuple[bool, float, float]:
    """(ok, max|got - ref|, max|ref|): the tolerance rule, relative to the output's scale."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    diff, scale = float(np.max(np.abs(got - ref))), float(np.max(np.abs(ref)))
    return diff <= atol + rtol * scale, diff, scale


def output_check(got, ref, atol: float, rtol: float) -> dict:
    """The tolerance rule's numbers for one output, as the manifest records them."""
    _, diff, scale = scaled_diff(got, ref, atol, rtol)
    return {"max_abs_diff": diff, "allowed": atol + rtol * scale, "rule": f"{atol:g} + {rtol:g} * max|ref| {scale:.3g}"}


def worst_check(checks: dict) -> dict:
    """Of {key: {output: check}}, the check closest to (or furthest past) its bound."""
    flat = [c for per_key in checks.values() for c in per_key.values()]
    return max(flat, key=lambda c: c["max_abs_diff"] / c["allowed"] if c["allowed"] else float("inf"))


def random_feeds(tensors: list[tuple[str, str, tuple[int, ...]]], seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible values for (name, dtype, shape) inputs: activations ~N(0, 1); position ids ascending
    with gaps (a pruned sequence); score/logit/visual rows distinct indices inside the sequence; pivots distinct
    indices into the visual rows."""
    rng = np.random.default_rng(seed)
    seq = next((s[1] for n, _, s in tensors if n in ("position_ids", "inputs_embeds", "hidden_states")), None)
    visual = next((s[0] for n, _, s in tensors if n == "visual_rows"), None)
    feeds = {}
    for name, dtype, shape in tensors:
        if name == "position_ids":
            pos = np.sort(rng.choice(np.arange(shape[1] * 2), size=shape[1], replace=False))
            feeds[name] = np.broadcast_to(pos, shape).astype(np.int64).copy()
        elif name in ("score_rows", "logit_rows", "visual_rows"):
            feeds[name] = np.sort(rng.choice(seq, size=shape[0], replace=False)).astype(np.int64)
        elif name == "pivots":  # indices into visual_rows, in no particular order (most salient first)
            feeds[name] = rng.choice(visual, size=shape[0], replace=False).astype(np.int64)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def compare_engine(engine: Path, onnx: Path, feeds_by_profile: list[list[dict]],
                   tolerances: dict[str, tuple[float, float]], name: str) -> dict:
    """TensorRT vs ONNX Runtime (CPU) on the same feeds with Polygraphy, feeds_by_profile[i] under the
    engine's optimization profile i; every output within its (atol, rtol). Returns {feed index
    (counted across profiles): {output: check}}; raises EngineCheckError past a bound."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator

    report = {}
    for profile, feeds_list in enumerate(feeds_by_profile):
        runners = [TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name="tensorrt", optimization_profile=profile),
                   OnnxrtRunner(SessionFromOnnx(str(onnx), providers=["CPUExecutionProvider"]), name="onnxrt")]
        results = Comparator.run(runners, data_loader=feeds_list)
        for trt_out, ort_out in zip(results[0][1], results[1][1]):
            report[str(len(report))] = checks = {}
            for output in ort_out.keys():
                checks[output] = check = output_check(trt_out[output], ort_out[output], *tolerances[output])
                if check["max_abs_diff"] > check["allowed"]:
                    raise EngineCheckError(f"{name}: {engine.name} (profile {profile}) output {output} differs from "
                                           f"ONNX Runtime by {check['max_abs_diff']:.3g}; expected <= {check['rule']} = "
                                           f"{check['allowed']:.3g}")
    return report
