"""What quantization costs: bundles of several precisions against a reference, on the held-out set.

    python -m calib.compare --bundles bundles/miniature-k15-p50-fp32 bundles/miniature-k15-p50-int8 --limit 120

For each bundle (the first is the reference, normally fp32) and each of unpruned and K=15 P=50,
the runtime (ONNX Runtime) answers the miniature's held-out questions. Per bundle and strategy:
the harness's accuracy (overall and per kind), answer agreement with the reference (same text),
the step-1 kept-token overlap with the reference (|kept ∩ kept_ref| / |kept_ref|: does the
quantized saliency keep the same tokens?), and the step-1 logits error against the reference
(max |logits - logits_ref| over the response rows, relative to max |logits_ref|; same inputs,
since step 1 starts from the same all-masked response). Writes precision.md and precision.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from runtime.errors import expect
from runtime.files import write_json, write_text

STRATEGIES = ("unpruned", "K15 P50")


class FirstLogits:
    """Wraps decoder_post's runner: keeps the logits of the first call (step 1) of each generation."""

    def __init__(self, runner):
        self.runner, self.first = runner, None

    def infer(self, feeds, keep_on_device=False, **kw):
        out = self.runner.infer(feeds, keep_on_device, **kw)
        if self.first is None:
            self.first = np.asarray(self.runner.to_host(out["logits"]), dtype=np.float64)
        return out

    def __getattr__(self, name):
        return getattr(self.runner, name)


def run_bundle(bundle: Path, items, gen, log) -> dict[str, list[dict]]:
    """{strategy: [per question: harness record + kept set + step-1 logits]}."""
    from miniature.eval import record, strategies
    from runtime.pipeline import Pipeline
    from runtime.backends import make_runners

    rows = [s for s in strategies() if s.name in STRATEGIES]
    taps = {}

    def factory(opened):
        runners = make_runners("onnxruntime", opened)
        taps["post"] = runners["decoder_post"] = FirstLogits(runners["decoder_post"])
        return runners

    out = {s.name: [] for s in rows}
    with Pipeline(bundle, runner_factory=factory) as pipe:
        expect(pipe.manifest.k == 15, f"bundle {str(bundle)!r}: K={pipe.manifest.k}; the comparison runs K=15 P=50")
        generate, kept = pipe.generate, {}
        pipe.generate = lambda *a, **kw: kept.setdefault("res", generate(*a, **kw))
        t0 = time.time()
        for n, (scene_, q) in enumerate(items):
            for s in rows:
                taps["post"].first = None
                kept.clear()
                rec = record(pipe, s, scene_, q, gen)
                rec["kept_set"] = kept["res"].kept_visual.tolist()
                rec["logits"] = taps["post"].first
                out[s.name].append(rec)
            if (n + 1) % 60 == 0 or n + 1 == len(items):
                log(f"{bundle.name}: {n + 1}/{len(items)} questions, {time.time() - t0:.0f} s")
    return out


def compare(runs: dict[str, dict], reference: str) -> list[dict]:
    """One row per (bundle, strategy): accuracy, and agreement, overlap and logits error against the reference."""
    from miniature.eval import KINDS

    rows = []
    for name, run in runs.items():
        for strategy, recs in run.items():
            ref = runs[reference][strategy]
            overlap = [len(set(a["kept_set"]) & set(b["kept_set"])) / len(b["kept_set"]) for a, b in zip(recs, ref)]
            err = [float(np.max(np.abs(a["logits"] - b["logits"])) / np.max(np.abs(b["logits"]))) for a, b in zip(recs, ref)]
            rows.append({
                "bundle": name, "strategy": strategy, "questions": len(recs),
                "accuracy": float(np.mean([r["correct"] for r in recs])),
                "by_kind": {k: float(np.mean([r["correct"] for r in recs if r["kind"] == k] or [np.nan])) for k in KINDS},
                "agreement": float(np.mean([a["got"] == b["got"] for a, b in zip(recs, ref)])),
                "kept_overlap_mean": float(np.mean(overlap)), "kept_overlap_min": float(np.min(overlap)),
                "logits_rel_error_mean": float(np.mean(err)), "logits_rel_error_max": float(np.max(err)),
            })
    return rows


def markdown(rows: list[dict], header: str) -> str:
    from miniature.eval import KINDS

    cols = ["bundle", "strategy", "accuracy", *KINDS, "agreement", "kept overlap (mean / min)", "step-1 logits error (mean / max)"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["bundle"], r["strategy"], f"{100 * r['accuracy']:.1f}", *(f"{100 * r['by_kind'][k]:.1f}" for k in KINDS),
            f"{100 * r['agreement']:.1f}", f"{100 * r['kept_overlap_mean']:.1f} / {100 * r['kept_overlap_min']:.1f}",
            f"{100 * r['logits_rel_error_mean']:.2f}% / {100 * r['logits_rel_error_max']:.2f}%"]) + " |")
    lines += ["", "Accuracy, agreement (same answer as the reference) and kept overlap (|kept ∩ kept_ref| / |kept_ref| "
              "at step 1) in %; logits error: max |logits - logits_ref| at step 1 relative to max |logits_ref|."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from runtime.cli_args import parser

    ap = parser("python -m calib.compare", __doc__)
    ap.add_argument("--bundles", type=Path, nargs="+", required=True,
                    help="bundles of one model at K=15; the first is the reference (normally fp32)")
    ap.add_argument("--limit", type=int, help="only the first N held-out questions")
    ap.add_argument("--out", type=Path, default=Path("runs") / "precision", help="where precision.md and .json go")
    return ap


def main(argv=None) -> int:
    from miniature.eval import HARNESS_GEN
    from miniature.scenes import held_out_set
    from runtime.bundle import read_manifest
    from runtime.cli_args import at_boundary

    args = build_parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    def run_all():
        expect(args.limit is None or args.limit >= 1, f"--limit: got {args.limit}; expected >= 1")
        manifests = {b: read_manifest(b) for b in args.bundles}
        model = {m.model["content_hash"] for m in manifests.values()}
        expect(len(model) == 1, f"--bundles: built from different models ({sorted(h[:12] for h in model)}); "
                                "expected one model in several precisions")
        names = [f"{b.name} ({manifests[b].precision})" for b in args.bundles]
        expect(len(set(names)) == len(names), f"--bundles: names repeat ({names}); expected distinct bundles")
        items = held_out_set()[: args.limit]
        t0 = time.time()
        runs = {n: run_bundle(b, items, HARNESS_GEN, log) for n, b in zip(names, args.bundles)}
        return model, names, items, runs, (time.time() - t0) / 60

    status, got = at_boundary(run_all, interrupted="interrupted; nothing was written")
    if status is not None:
        return status
    model, names, items, runs, minutes = got
    rows = compare(runs, names[0])
    header = (f"Precision comparison: model {next(iter(model))[:12]}, {len(items)} held-out questions, reference "
              f"{names[0]}, ONNX Runtime CPU, {minutes:.1f} min")
    md = markdown(rows, header)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "precision.json", {"header": header, "rows": rows})
    write_text(args.out / "precision.md", md)
    print(f"written: {args.out / 'precision.md'}, {args.out / 'precision.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
