"""The accuracy harness: every pruning strategy over the held-out driving questions.

    python -m miniature.eval --bundle bundles/miniature-k15-p50-fp32            # the full table
    python -m miniature.eval --bundle bundles/miniature-k15-p50-fp32 --limit 60 # a quick look
    python -m miniature.eval --bundle bundles/miniature-k15-p50-fp32-3cams --cameras  # camera rigs

Runs the runtime (ONNX Runtime) over the held-out set (miniature/scenes.py: 120 scenes, 720
questions) for each strategy and reports, per question type and overall, exact-match accuracy,
the object recall of the kept set (share of the asked-about objects' visual tokens that step-1
pruning kept, over questions about at least one object) and the mean FLOPs remaining
(bench.flops for that sequence). K is a bundle property: strategies at another K run on sibling
bundles built from the same checkpoint into the output directory. Writes table.md, table.json
(per-question answers included) and accuracy_vs_flops.png. With --cameras: the held-out camera
rigs (60 rigs, 210 questions naming a camera or spanning them; a bundle built with --cameras 3),
unpruned and the rules at P50/P70 with a global and a per-camera budget.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from bench.flops import remaining, run_workload, total_flops, trace_flops
from miniature.scenes import RigScene, Scene, camera_answers, held_out_rigs, held_out_set
from runtime.bundle import Manifest, read_manifest
from runtime.cli_args import at_boundary, quiet_on_broken_pipe
from runtime.errors import expect
from runtime.files import check_output_dir, write_json, write_text
from runtime.pruning import PruneSettings
from runtime.pruning_map import object_recall, tokens_covering
from runtime.schedule import GenerationSettings

KINDS = ("light", "count", "pedestrian", "ahead", "limit", "lane")
CHANCE = {"light": 1 / 3, "count": 1 / 5, "pedestrian": 1 / 3, "ahead": 1 / 7, "limit": 1 / 5, "lane": 1 / 2}
RIG_KINDS = ("cam_pedestrian", "cam_light", "all_count")
RIG_CHANCE = {"cam_pedestrian": 1 / 3, "cam_light": 1 / 3, "all_count": 1 / 13}
# LLaDA-V answers multiple choice in 2 steps; our answers are at most 7 tokens with <|eot_id|>.
HARNESS_GEN = GenerationSettings(steps=8, gen_length=8, block_length=8)


@dataclass(frozen=True)
class Strategy:
    """One row of the table; `line` groups rows into one line of the plot."""

    name: str
    line: str
    k: int | None  # None: unpruned
    p: float = 0.0
    query: str = "response"
    rule: str = "saliency"  # runtime.pruning.RULES
    positions: str = "original"
    cache: str = "none"  # runtime.caching: none | prefix | dual
    threshold: float = 0.0  # Fast-dLLM's parallel decoding (0: the fixed schedule)
    budget: str = "global"  # several cameras: runtime.pruning.BUDGETS
    fill: str = "first"  # several cameras: runtime.pruning.FILL_MODES

    def prune(self, bundle_k: int) -> PruneSettings:
        return PruneSettings(self.k or bundle_k, self.p, self.query, self.rule, self.positions, budget=self.budget,
                             fill=self.fill)

    @property
    def accelerated(self) -> bool:
        return self.cache != "none" or self.threshold > 0


def strategies() -> list[Strategy]:
    """The issues' rows: P sweep at K=15, K sweep at P=50, query sets, random, compact positions (saliency);
    cache x threshold; the duplicate-aware rule's P and K sweeps and its cache rows (issue 24)."""
    rows = [Strategy("unpruned", "unpruned", None)]
    rows += [Strategy(f"K15 P{p}", "saliency, K=15", 15, p) for p in (25, 50, 70, 90)]
    rows += [Strategy(f"K{k} P50", "saliency, P=50", k, 50) for k in (3, 8, 24)]
    rows += [Strategy(f"K15 P50 query {q}", f"query {q}, K=15", 15, 50, query=q) for q in ("prompt", "last")]
    rows += [Strategy(f"K15 P{p} random", "random, K=15", 15, p, rule="random") for p in (25, 50, 70, 90)]
    rows += [Strategy("K15 P50 compact", "compact positions, K=15", 15, 50, positions="compact")]
    for base, k, p in (("unpruned", None, 0.0), ("K15 P50", 15, 50.0)):  # issue 13: cache x threshold
        for cache in ("prefix", "dual"):
            for t in (0.0, 0.9, 0.7):
                name = f"{base} {cache}" + (f" T{t:g}" if t else "")
                rows.append(Strategy(name, f"{cache} cache, {base}", k, p, cache=cache, threshold=t))
    rows += [Strategy(f"K15 P{p} duplicate", "duplicate, K=15", 15, p, rule="duplicate") for p in (25, 50, 70, 90)]
    rows += [Strategy(f"K{k} P50 duplicate", "duplicate, P=50", k, 50, rule="duplicate") for k in (3, 8, 24)]
    for p in (50, 70):
        for cache in ("prefix", "dual"):
            rows.append(Strategy(f"K15 P{p} duplicate {cache} T0.9", f"duplicate, {cache} cache T0.9", 15, p,
                                 rule="duplicate", cache=cache, threshold=0.9))
    return rows


def rig_strategies() -> list[Strategy]:
    """The camera rows (issue 26): unpruned; the duplicate and saliency rules at P50 and P70 (K=15),
    each with a global and a per-camera budget, the padded views' fill dropped first; the ablation: the
    duplicate rule ranking the fill like any token."""
    rows = [Strategy("unpruned", "unpruned", None)]
    for rule in ("duplicate", "saliency"):
        for budget in ("global", "per_camera"):
            rows += [Strategy(f"K15 P{p} {rule} {budget}", f"{rule}, {budget} budget", 15, p, rule=rule, budget=budget)
                     for p in (50, 70)]
    rows += [Strategy(f"K15 P50 duplicate {budget} fill ranked", "duplicate, fill ranked", 15, 50, rule="duplicate",
                      budget=budget, fill="rule") for budget in ("global", "per_camera")]
    return rows


# ---------------------------------------------------------------- running


def sibling_bundle(manifest: Manifest, k: int, work: Path, log) -> Path:
    """A bundle like `manifest`'s at another K, built (or reused) under `work`."""
    from export.build import BuildRequest, build_bundle  # torch: only when another K is asked for
    from export.profiles import ProfileSettings

    req = BuildRequest(Path(manifest.model["source"]), work / f"k{k}", k, manifest.p, manifest.precision,
                       ProfileSettings.from_dict(manifest.profiles["settings"]), manifest.opset, engines="skip")
    log(f"bundle for K={k}: {req.out}")
    return build_bundle(req).out


def covered_tokens(res, item, q, side: int) -> np.ndarray:
    """The visual indices of the objects q asks about (a rig: each camera's, offset to its segment)."""
    if isinstance(item, RigScene):
        scenes, starts = list(item.cameras.values()), np.cumsum([0, *res.layout.sizes])
        found = [starts[c] + tokens_covering(res.tile_layouts[c], side, scenes[c].objects[j].box.xyxy) for c, j in q.about]
    else:
        found = [tokens_covering(res.tile_layout, side, item.objects[i].box.xyxy) for i in q.about]
    return np.unique(np.concatenate(found or [np.zeros(0, int)]))


def record(pipe, s: Strategy, item: Scene | RigScene, q, gen: GenerationSettings) -> dict:
    """Run one question (of a scene or a camera rig) under one strategy: the answer and what pruning kept."""
    from runtime.caching import CacheSettings

    image = {name: sc.image for name, sc in item.cameras.items()} if isinstance(item, RigScene) else item.image
    res = pipe.generate(image, q.text, replace(gen, threshold=s.threshold), s.prune(pipe.manifest.k),
                        cache=CacheSettings(s.cache))
    covering = covered_tokens(res, item, q, pipe.geometry.side)
    w = run_workload(pipe.manifest, res.layout, gen)
    steps_w = replace(w, steps=len(res.steps))
    return {
        "seed": item.seed, "kind": q.report_kind, "question": q.text, "answer": q.answer, "got": res.text.strip(),
        "correct": res.text.strip() == q.answer,
        "recall": object_recall(covering, res.kept_visual) if covering.size else None,
        # the paper's FLOPs Rem.: against an unpruned run of as many steps as this one took (with a cache: from
        # the rows each step computed); summarize() puts cache and threshold rows against the unpruned row's runs
        "flops_remaining": (trace_flops(w, s.k, s.p, [st.rows for st in res.steps], s.rule)
                            / total_flops(steps_w, None, 0) if s.accelerated else
                            remaining(steps_w, s.k, s.p, s.rule) if s.k is not None else 1.0),
        "flops": trace_flops(steps_w, s.k, s.p, [st.rows for st in res.steps], s.rule),  # unpruned: no rule counted
        "steps": len(res.steps), "visual": res.layout.n_visual, "kept": int(res.kept_visual.size),
        "other_camera": other_camera_answer(item, q, res.text.strip()),
        "fill": len(res.layout.fill), "fill_kept": int(np.isin(res.layout.fill, res.kept_visual).sum()),
    }


def other_camera_answer(item, q, got: str) -> bool | None:
    """A question naming a camera, answered wrong: is the answer what another camera would answer (the
    question routed to the wrong camera)? None for every other question."""
    if not isinstance(item, RigScene) or q.camera is None or got == q.answer:
        return None
    others = [a for name, a in zip(item.cameras, camera_answers(item, q.kind)) if name != q.camera]
    return got in others


def run_all(bundle: Path, rows: list[Strategy], items, gen: GenerationSettings, work: Path, log) -> dict:
    """{strategy name: [record per question]}, one Pipeline per K."""
    from runtime.pipeline import Pipeline

    manifest = read_manifest(bundle)
    by_k: dict[int, list[Strategy]] = {}
    for s in rows:
        by_k.setdefault(s.k if s.k is not None else manifest.k, []).append(s)
    out: dict[str, list[dict]] = {s.name: [] for s in rows}
    for k, group in sorted(by_k.items()):
        path = bundle if k == manifest.k else sibling_bundle(manifest, k, work, log)
        with Pipeline(path, "onnxruntime", expect_k=k) as pipe:
            t0 = time.time()
            for n, (scene_, q) in enumerate(items):
                for s in group:
                    out[s.name].append(record(pipe, s, scene_, q, gen))
                if (n + 1) % 60 == 0 or n + 1 == len(items):
                    log(f"K={k}: {n + 1}/{len(items)} questions x {len(group)} strategies, {time.time() - t0:.0f} s")
    return out


# ---------------------------------------------------------------- the table


def summarize(rows: list[Strategy], records: dict[str, list[dict]], kinds=KINDS) -> list[dict]:
    """Per row: accuracy (overall, per kind), object recall, FLOPs remaining, mean steps. Cache and
    threshold rows take fewer steps than the fixed schedule: their FLOPs are put against the unpruned
    row's on the same questions where that row ran (else against as many unpruned steps as they took)."""
    base = records.get("unpruned")
    table = []
    for s in rows:
        recs = records[s.name]
        if s.accelerated and base and len(base) == len(recs):
            recs = [{**r, "flops_remaining": r["flops"] / b["flops"]} for r, b in zip(recs, base)]
        acc = {kind: _mean([r["correct"] for r in recs if r["kind"] == kind]) for kind in kinds}
        recalls = [r["recall"] for r in recs if r["recall"] is not None]
        table.append({
            **asdict(s), "questions": len(recs), "accuracy": _mean([r["correct"] for r in recs]),
            "by_kind": acc, "object_recall": _mean(recalls), "flops_remaining": _mean([r["flops_remaining"] for r in recs]),
            "mean_steps": _mean([r["steps"] for r in recs]),
            # camera questions answered wrong: the share that were another camera's answer (routing errors)
            "wrong_were_other_camera": _mean([r["other_camera"] for r in recs if r.get("other_camera") is not None]),
            # padded views: the share of their fill tokens kept at step 1
            "fill_kept": _mean([r["fill_kept"] / r["fill"] for r in recs if r.get("fill")]),
        })
    return table


def _mean(xs) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(table: list[dict], header: str, chance: dict = CHANCE) -> str:
    kinds = tuple(chance)
    fill = any(row.get("fill_kept") is not None for row in table)  # padded views (several cameras)
    cols = ["strategy", "overall", *kinds, "object recall", *(["fill kept"] * fill), "FLOPs rem.", "steps"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    base = table[0]["accuracy"] if table and table[0]["k"] is None else None
    for row in table:
        rel = f" ({100 * row['accuracy'] / base:.0f}% of unpruned)" if base and row["k"] is not None else ""
        cells = [row["name"], _pct(row["accuracy"]) + rel, *(_pct(row["by_kind"][k]) for k in kinds),
                 _pct(row["object_recall"]), *([_pct(row.get("fill_kept"))] * fill), _pct(row["flops_remaining"]),
                 f"{row['mean_steps']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    odds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in chance.items())
    lines += ["", f"Accuracy in %, exact match. Chance: {odds}. Object recall: share of the asked-about "
              "objects' visual tokens kept at step 1 (questions about at least one object)." + (
                  " Fill kept: share of the padded views' fill tokens (no pixel of the frame) kept at step 1."
                  if fill else "") + " FLOPs remaining: "
              "bench.flops for each question's sequence, relative to unpruned (cache and threshold rows: from "
              "the rows each step computed, against the unpruned row's run of the same question). Steps: mean "
              "denoising steps taken (a block ends once everything before <|eot_id|> is unmasked)."]
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    lines: dict[str, list[dict]] = {}
    for row in table:
        lines.setdefault(row["line"], []).append(row)
    for name, rows in lines.items():
        rows = sorted(rows, key=lambda r: r["flops_remaining"])
        style = "*" if name == "unpruned" else "o-"
        ax.plot([r["flops_remaining"] for r in rows], [100 * r["accuracy"] for r in rows], style, label=name, ms=6)
        for r in rows:
            if name != "unpruned":
                ax.annotate(r["name"].split(" ")[0 if name.endswith("P=50") else 1],
                            (r["flops_remaining"], 100 * r["accuracy"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xlabel("FLOPs remaining (fraction of unpruned)")
    ax.set_ylabel("accuracy on held-out questions (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    from runtime.cli_args import parser

    ap = parser("python -m miniature.eval", __doc__)
    ap.add_argument("--bundle", type=Path, required=True, help="bundle of the miniature (its K is one of the rows')")
    ap.add_argument("--limit", type=int, help="only the first N held-out questions (scene by scene, six per scene)")
    ap.add_argument("--strategies", nargs="+", metavar="NAME",
                    help="only these rows (names as in the table, e.g. 'unpruned' 'K15 P50')")
    ap.add_argument("--out", type=Path, help="where table.md, table.json, the PNG and sibling bundles go "
                                             "(default: runs/eval/<bundle name>)")
    ap.add_argument("--steps", type=int, default=HARNESS_GEN.steps, help="denoising steps")
    ap.add_argument("--gen-length", type=int, default=HARNESS_GEN.gen_length, help="response length in tokens")
    ap.add_argument("--candidate", type=Path, help="the bundle holds this miniature checkpoint, not the shipped one (a "
                                                   "fine-tune being evaluated, e.g. miniature.rig_finetune's)")
    ap.add_argument("--cameras", action="store_true",
                    help="the held-out camera rigs and their rows (a bundle built with --cameras 3)")
    ap.add_argument("--block-length", type=int,
                    help="response block length (default: the whole response in one block; with several blocks "
                         "the prefix and dual caches differ)")
    return ap


def select(rows: list[Strategy], names) -> list[Strategy]:
    if not names:
        return rows
    known = {s.name: s for s in rows}
    unknown = [n for n in names if n not in known]
    expect(not unknown, f"--strategies: {unknown} unknown; expected names from {list(known)}")
    return [known[n] for n in names]


def check_miniature_bundle(bundle: Path, manifest: Manifest, candidate: Path | None = None) -> None:
    """The held-out questions are the miniature's: another model's bundle would score near 0% and say
    nothing about pruning. Refused by name (the content hash says which weights the bundle holds).
    candidate: a miniature checkpoint other than the shipped one (a fine-tune being evaluated)."""
    from export.checkpoint import open_checkpoint
    from miniature import embedded_checkpoint

    source = candidate or embedded_checkpoint()
    want = open_checkpoint(source).content_hash()
    got = manifest.model.get("content_hash")
    expect(got == want, f"--bundle {str(bundle)!r}: a bundle of model {manifest.model.get('name')!r} (weights "
                        f"{str(got)[:12]}); expected one of the miniature ({source}, weights {want[:12]}), "
                        "whose held-out questions this harness asks")


@quiet_on_broken_pipe
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    def evaluate():
        expect(args.limit is None or args.limit >= 1, f"--limit: got {args.limit}; expected >= 1")
        manifest = read_manifest(args.bundle)
        check_miniature_bundle(args.bundle, manifest, args.candidate)
        rows = select(rig_strategies() if args.cameras else strategies(), args.strategies)
        gen = replace(HARNESS_GEN, steps=args.steps, gen_length=args.gen_length,
                      block_length=args.block_length or args.gen_length).validate()
        items = (held_out_rigs() if args.cameras else held_out_set())[: args.limit]
        out = check_output_dir(args.out or Path("runs") / "eval" / args.bundle.name, "--out")  # before the evaluation
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        records = run_all(args.bundle, rows, items, gen, out / "bundles", log)
        return manifest, rows, gen, items, out, records, (time.time() - t0) / 60

    status, got = at_boundary(evaluate, interrupted="interrupted; nothing was written")
    if status is not None:
        return status
    manifest, rows, gen, items, out, records, minutes = got
    table = summarize(rows, records, RIG_KINDS if args.cameras else KINDS)
    header = (f"Miniature LLaDA-V ({manifest.precision}, model {manifest.model['content_hash'][:12]}), "
              f"{len(items)} held-out {'camera-rig ' if args.cameras else ''}questions, gen_length {gen.gen_length}, "
              f"{gen.steps} steps"
              f"{'' if gen.block_length == gen.gen_length else f', blocks of {gen.block_length}'}, "
              f"ONNX Runtime CPU, {minutes:.1f} min")
    md = markdown(table, header, RIG_CHANCE if args.cameras else CHANCE)
    # written before printed: a reader that closes the pipe early must not cost the results
    try:
        write_json(out / "table.json", {"header": header, "generation": asdict(gen), "rows": table, "records": records})
        write_text(out / "table.md", md)
        plot(table, out / "accuracy_vs_flops.png", header.split(", ONNX")[0])
    except OSError as exc:  # the evaluation is not lost: the table is printed, and the error says what was not written
        print(md)
        print(f"error: --out {str(out)!r}: the results could not be written there ({exc}); the table is above",
              file=sys.stderr)
        return 2
    print(md)
    print(f"written: {out / 'table.md'}, {out / 'table.json'}, {out / 'accuracy_vs_flops.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
