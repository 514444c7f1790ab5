"""Block KV caching and parallel decoding on top of step-1 pruning, on ONNX Runtime's CPU, in one run.

    python -m bench.cache                  # d=1024, 8 layers, gen 64, block 32: a few minutes on 2 cores
    python -m bench.cache --quick          # a smoke run at d=128
    python -m bench.cache --cameras 3      # a 3-camera rig: three padded views (730 tokens each)

A LLaDA-shaped decoder wide enough that, as on the 8B, the linear layers dominate (d=1024, m=2816),
random weights, 8 layers split at K=4 (the 8B's K=15 of 32 keeps the same share of layers on the
full sequence at step 1), one 384-px tile (729 visual tokens), a ~40-token prompt, 64 response
tokens in blocks of 32, 64 steps, no stop at <|eot_id|> (every setting runs its whole schedule).
One fp32 bundle; the same question under each setting:

    unpruned uncached | K4 P50 uncached | K4 P50 + dual cache | + threshold 0.9 | K4 P70 + dual + T0.9

(pruned settings with the default rule, the duplicate-aware one: its similarity run is in step 1's time)

Per setting: wall time of the denoising loop (vision excluded), steps taken, rows computed, and the
FLOPs bench.flops predicts from the run's trace; ratios against unpruned uncached, measured next to
predicted. The cached-step cost against an uncached reduced step is measured from the same runs
(mean decoder ms of cached steps vs of uncached later steps). Random weights are rarely confident:
the threshold's step savings are a trained model's (the miniature's are in docs/caching.md).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path


import numpy as np

from runtime.errors import expect


@dataclass(frozen=True)
class CacheBenchShape:
    d_model: int = 1024
    heads: int = 8
    d_mlp: int = 2816
    layers: int = 8
    k: int = 4
    gen: int = 64
    block: int = 32
    cameras: int = 1  # > 1: a rig, each camera one padded view of the demo scene (docs/cameras.md)


QUICK = CacheBenchShape(d_model=128, heads=2, d_mlp=352, layers=4, k=2, gen=16, block=8)
QUESTION = "Is there a pedestrian in front of the vehicle?"


@dataclass(frozen=True)
class Setting:
    name: str
    p: float
    cache: str = "none"
    threshold: float = 0.0
    rule: str = "duplicate"


def settings(k: int) -> list[Setting]:
    return [Setting("unpruned uncached", 0), Setting(f"K{k} P50 uncached", 50), Setting(f"K{k} P50 dual", 50, "dual"),
            Setting(f"K{k} P50 dual T0.9", 50, "dual", 0.9), Setting(f"K{k} P70 dual T0.9", 70, "dual", 0.9)]


def build(shape: CacheBenchShape, workdir: Path, log) -> Path:
    from bench.cpu import BenchShape, bench_checkpoint
    from export.build import BuildRequest, build_bundle
    from export.profiles import ProfileSettings

    ckpt = bench_checkpoint(workdir / "checkpoint", BenchShape(d_model=shape.d_model, heads=shape.heads,
                                                               d_mlp=shape.d_mlp, layers=shape.layers), log)
    profile = ProfileSettings(layout="single", max_text_tokens=96 + 16 * shape.cameras, opt_text_tokens=48,
                              max_response=shape.gen, opt_response=shape.gen, cameras=shape.cameras)
    log("building the fp32 bundle")
    return build_bundle(BuildRequest(ckpt, workdir / "fp32", shape.k, 50, "fp32", profile, engines="skip"),
                        log=lambda m: None).out


def run_setting(pipe, s: Setting, shape: CacheBenchShape, image) -> dict:
    from bench.flops import run_workload, trace_flops
    from runtime.caching import CacheSettings
    from runtime.pruning import PruneSettings
    from runtime.schedule import GenerationSettings

    gen = GenerationSettings(steps=shape.gen, gen_length=shape.gen, block_length=shape.block, stop_at_eot=False,
                             threshold=s.threshold)
    prune = PruneSettings(shape.k, s.p, rule=s.rule)
    res = pipe.generate(image, QUESTION, gen, prune, cache=CacheSettings(s.cache))
    w = run_workload(pipe.manifest, res.layout, gen)
    rows = [st.rows for st in res.steps]
    decoder = [st.pre_ms + st.post_ms for st in res.steps]
    n_red = res.steps[-1].seq_len
    cached = [ms for st, ms in zip(res.steps[1:], decoder[1:]) if st.rows < n_red]
    uncached_later = [ms for st, ms in zip(res.steps[1:], decoder[1:]) if st.rows == n_red]
    return {"name": s.name, "setting": asdict(s), "steps": len(res.steps), "rows": rows,
            "loop_ms": res.total_ms - res.vision_ms, "decoder_ms": float(np.sum(decoder)),
            "cached_step_ms": float(np.mean(cached)) if cached else None,
            "uncached_later_step_ms": float(np.mean(uncached_later)) if uncached_later else None,
            "flops": trace_flops(w, shape.k if s.p else None, s.p, rows, s.rule), "answer_ids": res.answer_ids}


def run(shape: CacheBenchShape, workdir: Path, log) -> dict:
    from runtime.demo import demo_image
    from runtime.pipeline import Pipeline
    from runtime.pruning import PruneSettings
    from runtime.schedule import GenerationSettings

    from runtime.cameras import rig_names

    bundle = build(shape, workdir, log)
    image = demo_image() if shape.cameras == 1 else {name: demo_image() for name in rig_names(shape.cameras)}
    out = []
    with Pipeline(bundle) as pipe:
        warm = GenerationSettings(steps=2, gen_length=8, block_length=8, stop_at_eot=False)
        pipe.generate(image, QUESTION, warm, PruneSettings(shape.k, 50))  # sessions warm
        for s in settings(shape.k):
            log(f"running {s.name}")
            out.append(run_setting(pipe, s, shape, image))
    return {"shape": asdict(shape), "results": out}


def report(out: dict) -> str:
    s, res = out["shape"], out["results"]
    base = res[0]
    views = "one 384-px tile" if s.get("cameras", 1) == 1 else f"{s['cameras']} cameras (one padded view each)"
    lines = [f"decoder d={s['d_model']}, m={s['d_mlp']}, {s['layers']} layers split at K={s['k']}; {views}; "
             f"gen {s['gen']} in blocks of {s['block']}; ONNX Runtime CPU; one run each", "",
             f"{'setting':<22} {'steps':>5} {'loop s':>8} {'speedup':>8} {'FLOPs pred.':>11} {'cached step ms':>15}"]
    for r in res:
        speed = base["loop_ms"] / r["loop_ms"]
        pred = base["flops"] / r["flops"]
        step = "-" if r["cached_step_ms"] is None else f"{r['cached_step_ms']:.1f}"
        lines.append(f"{r['name']:<22} {r['steps']:>5} {r['loop_ms'] / 1000:>8.2f} {speed:>7.2f}x {pred:>10.2f}x "
                     f"{step:>15}")
    dual = next(r for r in res if r["setting"]["cache"] == "dual" and not r["setting"]["threshold"])
    plain = res[1]
    if dual["cached_step_ms"] and plain["uncached_later_step_ms"]:
        lines.append("")
        lines.append(f"cached step vs uncached reduced step: {dual['cached_step_ms']:.1f} ms vs "
                     f"{plain['uncached_later_step_ms']:.1f} ms = {plain['uncached_later_step_ms'] / dual['cached_step_ms']:.1f}x "
                     "cheaper (decoder time)")
    lines.append("speedup: unpruned uncached loop time / the setting's; FLOPs pred.: bench.flops.trace_flops of the "
                 "same runs' traces, unpruned / the setting's")
    return "\n".join(lines)


BANDWIDTH = {"AGX Orin 64GB": 204.8e9, "Orin NX 16GB": 102.4e9}  # docs/orin.md, bytes/s
DECODER_BYTES_8B_FP16 = 14.99e9  # bench.orin_fit: decoder_pre 6.54 + decoder_post 8.45 GB, read once per step
INT4_BYTES_VS_FP16 = 0.309  # bench.orin_fit: the int4 decoders (fp16 LM head) against fp16


def orin_projection(visual: int = 3649, text: int = 50, gen: int = 64, block: int = 32, k: int = 15) -> str:
    """The 8B at 1920x1080 (AnyRes: 3649 visual tokens), gen 64 in blocks of 32, 64 steps. Per step the
    FP16 compute floor (bench.flops at dense peak) and the weight-bandwidth floor (the decoder's fp16
    weights read once); a step takes at least the larger, the answer at least their sum."""
    from bench.flops import ORIN, SHORT, Workload, trace_flops
    from runtime.pruning import pruned_count

    w = Workload(text=text, visual=visual, gen=gen, steps=gen)
    n = w.n
    per_block = gen // block
    reduced = {p: w.n - pruned_count(visual, p) for p in (50, 70)}
    cached = {p: ([n2] + [block] * (block - 1)) * per_block for p, n2 in reduced.items()}
    plans = {"unpruned uncached": (None, 0, [n] * gen, 1.0)}
    for p in (50, 70):  # the default rule (duplicate-aware): its similarities counted in step 1
        plans.update({f"K{k} P{p} uncached": (k, p, [reduced[p]] * gen, 1.0), f"K{k} P{p} dual": (k, p, cached[p], 1.0),
                      f"K{k} P{p} dual int4": (k, p, cached[p], INT4_BYTES_VS_FP16)})
    lines = [f"LLaDA-V-8B on Orin (a projection, not a measurement): {visual} visual + {text} text + {gen} response "
             f"tokens, {gen} steps in blocks of {block}; seconds per answer: compute at dense FP16 peak, fp16 "
             "weights read once per step, and the floor (per step the larger of the two, summed)", "",
             f"{'setting':<20} " + " ".join(f"{SHORT[d] + ' compute':>12} {'weights':>8} {'floor':>7}" for d in BANDWIDTH)]
    for name, (kk, p, rows, weights) in plans.items():
        rule = "duplicate" if kk is not None else None
        steps = [trace_flops(w, kk, p, rows[: i + 1], rule) - (trace_flops(w, kk, p, rows[:i], rule) if i else 0)
                 for i in range(len(rows))]
        cells = []
        for dev, bw in BANDWIDTH.items():
            compute = [f / ORIN[dev]["fp16"] for f in steps]
            read = weights * DECODER_BYTES_8B_FP16 / bw
            cells.append(f"{sum(compute):>12.1f} {read * len(rows):>8.1f} {sum(max(c, read) for c in compute):>7.1f}")
        lines.append(f"{name:<20} " + " ".join(cells))
    lines.append("cached steps are weight-bound on Orin; int4: the decoders' INT4 weights (0.309x fp16's bytes, "
                 "docs/quantization.md) with fp16 compute, if TensorRT runs W4A16 GEMMs at that bandwidth (unverified); "
                 "the threshold rule lowers the number of steps")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench.cli import bench_main

    def add_args(ap):
        ap.add_argument("--cameras", type=int, default=1, help="a rig of this many cameras (one padded view each)")

    def adapt(shape, args):
        expect(args.cameras >= 1, f"--cameras: got {args.cameras}; expected an integer >= 1")
        return replace(shape, cameras=args.cameras)

    return bench_main(argv, __doc__, "cache", (QUICK, CacheBenchShape()), run, (report, projection), add_args, adapt)


def projection(out: dict) -> str:
    """The 8B's Orin projection for what the run asked: one 1920x1080 frame, or the rig's views."""
    cameras = out["shape"].get("cameras", 1)
    return orin_projection() if cameras == 1 else orin_projection(visual=730 * cameras)


if __name__ == "__main__":
    sys.exit(main())
