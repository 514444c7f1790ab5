"""CPU benchmark: eager PyTorch vs our runtime over ONNX Runtime, unpruned vs pruned, in one run.

    python -m bench.cpu                 # a few minutes on 2 cores
    python -m bench.cpu --quick         # a smoke run

A LLaDA-V-shaped model (32 layers, real 384/14 tiles so 729 visual tokens, its own tokenizer so
the prompt is ~70 text tokens, 32-64 response tokens) with a width small enough for a CPU. Times
end-to-end generation (vision, denoising loop, detokenizing; not loading) for
(a) the eager PyTorch reference generator, unpruned, (b) the runtime over ONNX Runtime, unpruned,
(c) K=15 P=50, (d) K=15 P=70, (e) K=3 P=50. Prints medians, the ratios next to the FLOPs model's
prediction for this very shape, the pruned/unpruned speedup at several step counts, peak memory
and weight bytes per subgraph. Writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class BenchShape:
    d_model: int = 128
    heads: int = 2
    d_mlp: int = 352
    layers: int = 32
    gen: int = 32  # response tokens = steps = block length for the main table
    steps_sweep: tuple = (4, 16, 64)
    repeats: int = 3


QUICK = BenchShape(d_model=64, heads=2, d_mlp=128, gen=8, steps_sweep=(2, 8), repeats=1)
QUESTION = "Is there a pedestrian in front of the vehicle?"
CASES = [("a", "eager PyTorch, unpruned", None, 0), ("b", "ONNX Runtime, unpruned", 15, 0),
         ("c", "ONNX Runtime, K=15 P=50", 15, 50), ("d", "ONNX Runtime, K=15 P=70", 15, 70),
         ("e", "ONNX Runtime, K=3 P=50", 3, 50)]


def peak_rss() -> int:
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def bench_checkpoint(path: Path, shape: BenchShape, log) -> Path:
    """The random checkpoint of `shape`'s dims at `path`, written unless it is already there."""
    if not (path / "config.json").is_file():
        log(f"writing a random checkpoint: d={shape.d_model}, m={shape.d_mlp}, {shape.layers} layers")
        write_bench_checkpoint(path, shape)
    return path


def write_bench_checkpoint(path: Path, shape: BenchShape) -> Path:
    from export.checkpoint import config_to_json, write_checkpoint
    from export.model import PRESETS, DecoderDims
    from export.tiny import build_tokenizer, random_state, tokenizer_files

    tok = build_tokenizer(2000)
    files, ids = tokenizer_files(tok)
    dec = DecoderDims(shape.layers, shape.d_model, shape.heads, shape.d_mlp, tok.get_vocab_size())
    cfg = replace(PRESETS["tiny"], decoder=dec, name="bench")
    return write_checkpoint(path, config_to_json(cfg, ids, torch_dtype="float32"), random_state(cfg, 1), files,
                            max_shard_bytes=16 << 20)


def timed(fn, repeats: int) -> tuple[float, list[float], int, object]:
    """(median seconds, all runs, peak RSS, the result of the median run)."""
    reset_peak_rss()
    times, results = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - start)
    median_run = sorted(range(repeats), key=times.__getitem__)[(repeats - 1) // 2]
    return times[median_run], times, peak_rss(), results[median_run]


def predicted(shape: BenchShape, n_text: int, n_visual: int, gen: int, k, p) -> float:
    from bench.flops import Workload, remaining

    w = Workload(d=shape.d_model, m=shape.d_mlp, layers=shape.layers, vocab=0, text=n_text, visual=n_visual,
                 gen=gen, steps=gen, head="none")
    return remaining(w, k, p)


def steps_sweep(shape: BenchShape, case_fn, n_text: int, n_visual: int, log) -> list[dict]:
    """K=15 P=50 against unpruned at each step count of the sweep, next to the FLOPs prediction."""
    from runtime.schedule import GenerationSettings

    sweep = []
    for steps in shape.steps_sweep:
        settings = GenerationSettings(steps, steps, steps, stop_at_eot=False)
        log(f"steps sweep: {steps} steps")
        unpruned = timed(case_fn(15, 0, settings), shape.repeats)[0]
        pruned = timed(case_fn(15, 50, settings), shape.repeats)[0]
        sweep.append({"steps": steps, "unpruned_s": unpruned, "pruned_s": pruned, "speedup": unpruned / pruned,
                      "predicted_speedup": 1 / predicted(shape, n_text, n_visual, steps, 15, 50)})
    return sweep


def build_bundles(ckpt: Path, shape: BenchShape, workdir: Path, log) -> dict:
    """{K: manifest} of the fp32 bundles at K=15 and K=3, one 384-px tile."""
    from export.build import BuildRequest, build_bundle
    from export.profiles import ProfileSettings

    profiles = ProfileSettings(layout="single", max_text_tokens=128, opt_text_tokens=80,
                               max_response=max(64, *shape.steps_sweep), opt_response=shape.gen)
    bundles = {}
    for k in (15, 3):
        log(f"building the K={k} bundle (fp32, ONNX Runtime)")
        bundles[k] = build_bundle(BuildRequest(ckpt, workdir / f"bundle-k{k}", k, 50, "fp32", profiles),
                                  log=lambda m: None).manifest
    return bundles


def run(shape: BenchShape, workdir: Path, log) -> dict:
    from export.checkpoint import load_model
    from export.reference import generate
    from runtime.demo import demo_image
    from runtime.pipeline import Pipeline
    from runtime.preprocess import prepare_image
    from runtime.pruning import PruneSettings
    from runtime.schedule import GenerationSettings
    from runtime.tokens import TextTokenizer

    ckpt = bench_checkpoint(workdir / "checkpoint", shape, log)
    bundles = build_bundles(ckpt, shape, workdir, log)
    model, cfg_ckpt = load_model(ckpt)
    tok = TextTokenizer(ckpt)
    image = demo_image()
    img = prepare_image(image, cfg_ckpt.config.geometry, "single")
    prompt = tok.encode_prompt(QUESTION)
    n_text, n_visual = len(prompt.prefix) + len(prompt.suffix), img.layout.num_visual_tokens
    gen = GenerationSettings(shape.gen, shape.gen, shape.gen, stop_at_eot=False)
    pipes = {k: Pipeline(workdir / f"bundle-k{k}").__enter__() for k in (15, 3)}

    def case_fn(k, p, settings):
        if k is None:
            return lambda: generate(model, tok.ids, prompt, img, settings, None)
        return lambda: pipes[k].generate(image, QUESTION, settings, PruneSettings(k=k, p=p))

    results = {}
    for key, label, k, p in CASES:
        log(f"({key}) {label}: {shape.repeats} run(s)")
        median, times, rss, res = timed(case_fn(k, p, gen), shape.repeats)
        entry = {"label": label, "median_s": median, "runs_s": times, "peak_rss_bytes": rss}
        if k is not None:
            entry["where_ms"] = {"vision": res.vision_ms, "decoder_pre": sum(s.pre_ms for s in res.steps),
                                 "decoder_post": sum(s.post_ms for s in res.steps),
                                 "outside_backends": sum(s.other_ms for s in res.steps)}
            entry["predicted_vs_b"] = predicted(shape, n_text, n_visual, shape.gen, k, p)
        results[key] = entry
    base = results["b"]["median_s"]
    for key in results:
        results[key]["ratio_vs_b"] = results[key]["median_s"] / base
    sweep = steps_sweep(shape, case_fn, n_text, n_visual, log)
    for pipe in pipes.values():
        pipe.__exit__(None, None, None)
    return {"shape": asdict(shape), "tokens": {"text": n_text, "visual": n_visual, "response": shape.gen},
            "cases": results, "steps_sweep": sweep, "weight_bytes": weight_bytes(bundles)}


def weight_bytes(bundles: dict) -> dict[str, int]:
    """Each graph's weight file at K=15, and the K=3 decoders' (the vision graph is the same)."""
    weights = {name: e.data.bytes for name, e in bundles[15].subgraphs.items()}
    weights.update({f"k3/{name}": e.data.bytes for name, e in bundles[3].subgraphs.items() if name != "vision"})
    return weights


def report(out: dict) -> str:
    t = out["tokens"]
    s = out["shape"]
    lines = [f"LLaDA-V-shaped model: {s['layers']} layers, d={s['d_model']}, mlp={s['d_mlp']}; {t['text']} text + "
             f"{t['visual']} visual + {t['response']} response tokens, {t['response']} steps; CPU, medians of "
             f"{s['repeats']}", "",
             f"{'case':<32} {'median s':>9} {'vs (b)':>7} {'backends':>9} {'FLOPs pred.':>11} {'peak RSS':>9}  "
             "where (ms): vision / pre / post / outside"]
    b_backend = backend_ms(out["cases"]["b"])
    for key, c in out["cases"].items():
        pred = f"{c['predicted_vs_b']:.2f}" if "predicted_vs_b" in c else "-"
        backends = f"{backend_ms(c) / b_backend:.2f}" if "where_ms" in c else "-"
        where = " / ".join(f"{v:.0f}" for v in c["where_ms"].values()) if "where_ms" in c else "-"
        lines.append(f"({key}) {c['label']:<28} {c['median_s']:>9.2f} {c['ratio_vs_b']:>7.2f} {backends:>9} {pred:>11} "
                     f"{c['peak_rss_bytes'] / 2**20:>7.0f}MB  {where}")
    lines.append("'vs (b)': end-to-end ratio of medians; 'backends': decoder_pre + decoder_post time of the median runs")
    lines += ["", f"{'steps':>5} {'unpruned s':>10} {'K15 P50 s':>10} {'speedup':>8} {'FLOPs pred.':>11}"]
    lines += [f"{r['steps']:>5} {r['unpruned_s']:>10.2f} {r['pruned_s']:>10.2f} {r['speedup']:>8.2f} "
              f"{r['predicted_speedup']:>11.2f}" for r in out["steps_sweep"]]
    lines += ["", "weights per subgraph: " + ", ".join(f"{n} {b / 2**20:.2f} MiB" for n, b in out["weight_bytes"].items())]
    return "\n".join(lines)


def backend_ms(case: dict) -> float:
    return case["where_ms"]["decoder_pre"] + case["where_ms"]["decoder_post"]


def plot(out: dict, path: Path) -> None:
    """Bars of the medians and the speedup-vs-steps curve, drawn with PIL."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (900, 380), "white")
    d = ImageDraw.Draw(img)
    cases = out["cases"]
    top = max(c["median_s"] for c in cases.values())
    d.text((20, 10), "end-to-end generation time (s, median)", fill="black")
    for i, (key, c) in enumerate(cases.items()):
        x, h = 30 + i * 80, int(280 * c["median_s"] / top)
        d.rectangle([x, 330 - h, x + 50, 330], fill=(70, 110, 200) if key != "a" else (200, 120, 60))
        d.text((x, 335), f"({key})", fill="black")
        d.text((x, 318 - h), f"{c['median_s']:.1f}", fill="black")
    sweep = out["steps_sweep"]
    x0, y0, w, hgt = 480, 330, 380, 280
    top = max(max(r["speedup"], r["predicted_speedup"]) for r in sweep) * 1.1
    d.text((x0, 10), "K=15 P=50 speedup vs steps (blue measured, gray FLOPs)", fill="black")
    d.line([x0, y0, x0 + w, y0], fill="black")
    d.line([x0, y0, x0, y0 - hgt], fill="black")
    for series, color in (("speedup", (70, 110, 200)), ("predicted_speedup", (150, 150, 150))):
        pts = [(x0 + 20 + i * (w - 40) // max(1, len(sweep) - 1), y0 - int(hgt * r[series] / top))
               for i, r in enumerate(sweep)]
        d.line(pts, fill=color, width=3)
        for (px, py), r in zip(pts, sweep):
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
            if series == "speedup":
                d.text((px - 10, y0 + 5), f"{r['steps']}", fill="black")
                d.text((px + 6, py - 14), f"{r[series]:.2f}x", fill="black")
    img.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run on a tiny shape")
    ap.add_argument("--workdir", type=Path, default=Path("bundles/bench"))
    ap.add_argument("--json", type=Path, default=Path("bench_cpu.json"))
    ap.add_argument("--png", type=Path, default=Path("bench_cpu.png"))
    ap.add_argument("--repeats", type=int)
    args = ap.parse_args(argv)
    shape = QUICK if args.quick else BenchShape()
    if args.repeats:
        shape = replace(shape, repeats=args.repeats)
    workdir = args.workdir / ("quick" if args.quick else "full")
    start = time.perf_counter()
    out = run(shape, workdir, lambda m: print(f"[{time.perf_counter() - start:6.1f}s] {m}", file=sys.stderr, flush=True))
    out["seconds"] = time.perf_counter() - start
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    plot(out, args.png)
    print(report(out))
    print(f"\nwrote {args.json} and {args.png} in {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
