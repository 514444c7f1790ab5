"""The measurement behind export.yardstick.NOISE_FACTOR (docs/export.md), one run:

    python -m tests.measure_validation [--out validation.json] [CHECKPOINT ...]

For each checkpoint (default: tiny, the miniature and the family, written on demand) and each graph,
at fp16 and fp32: max |ORT graph - reference| / max |PyTorch at the graph's precision - reference| over
every output and both validation sizes, for the correct export and for every planted fault
(tests/faults.py, fp16). The factor must lie well above the first and well below the second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

import torch

import export.onnx_export as onnx_export
import export.yardstick as yardstick
from export.checkpoint import load_model
from export.onnx_export import export_and_validate
from export.profiles import VALIDATION_SIZES
from export.subgraphs import SUBGRAPHS
from export.tiny import FAMILY, default_home, ensure_tiny, write_random
from tests.test_family import planted, pruning_layer


def moves(report) -> tuple[int, int]:
    return (sum(c["moved"] for per in report.checks.values() for c in per.values() if "moved" in c),
            sum(c["moved_yardstick"] for per in report.checks.values() for c in per.values() if "moved" in c))


def ratio(report) -> tuple[float, str]:
    return max((c["max_abs_diff"] / c["noise"] if c["noise"] else (float("inf") if c["max_abs_diff"] else 0.0),
                f"{key} {out}")
               for key, per_output in report.checks.items() for out, c in per_output.items())


def export(spec, module, ckpt, precision, k, reference=None):
    with tempfile.TemporaryDirectory() as d:
        return export_and_validate(spec, spec.build(module, k), ckpt.config, precision, Path(d) / "g.onnx",
                                   list(VALIDATION_SIZES), k=k, reference=None if reference is None else spec.build(reference, k))


def measure(path: Path) -> dict:
    rows = {"correct": {}, "faults": {}, "saliency moves (graph, PyTorch at its precision)": {}}
    for precision, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        model, ckpt = load_model(path, dtype)
        k = pruning_layer(ckpt.config.n_layers)
        for spec in SUBGRAPHS:
            report = export(spec, model, ckpt, precision, k)
            rows["correct"][f"{precision} {spec.name}"] = ratio(report)
            if spec.name == "decoder_pre":
                rows["saliency moves (graph, PyTorch at its precision)"][f"{precision} correct"] = moves(report)
        if precision == "fp16":
            for what, spec, bad, patch in planted(model, ckpt.config):
                with patch():
                    report = export(spec, bad, ckpt, precision, k, model)
                rows["faults"][f"{what} ({spec.name})"] = ratio(report)
                if spec.name == "decoder_pre":
                    rows["saliency moves (graph, PyTorch at its precision)"][f"fp16 {what}"] = moves(report)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="*", type=Path, help="checkpoint directories (default: tiny, miniature, family)")
    ap.add_argument("--out", type=Path, default=Path("validation.json"), help="where the ratios are written")
    args = ap.parse_args()
    paths = args.checkpoints or [ensure_tiny(), Path(__file__).resolve().parents[1] / "miniature" / "checkpoint"] + [
        p if (p := default_home() / name).is_dir() else write_random(p, *FAMILY[name]) for name in sorted(FAMILY)]
    yardstick.NOISE_FACTOR = 1e30  # measure, do not judge (nor stop at the later bidirectional check)
    onnx_export.check_bidirectional = lambda *args, **kwargs: 0.0
    decide = yardstick.decision_check

    def decisions(*args):  # recorded in the checks (moved, moved_yardstick), never refusing
        return {**decide(*args), "allowed_moves": float("inf")}

    yardstick.decision_check = decisions
    results = {}
    for path in paths:
        with contextlib.redirect_stderr(None):
            results[path.name] = measure(path)
        for kind, rows in results[path.name].items():
            for what, (r, where) in rows.items():
                print(f"{path.name:20} {kind[:8]:8} {what:44} {r:9.2f}  ({where})", flush=True)
    for kind in ("correct", "faults"):
        values = [r for res in results.values() for what, (r, _) in res[kind].items()]
        for precision in (("fp16", "fp32") if kind == "correct" else ("fp16",)):
            sel = [r for res in results.values() for what, (r, _) in res[kind].items() if kind == "faults" or what.startswith(precision)]
            print(f"{kind} {precision}: ratio min {min(sel):.2f} max {max(sel):.2f} over {len(sel)} exports")
        assert values
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
