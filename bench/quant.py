"""CPU speed of INT8 against fp32 on ONNX Runtime, decoder by decoder, in one run.

    python -m bench.quant                  # d=1024, 8 layers: a few minutes on 2 cores
    python -m bench.quant --quick          # a smoke run at d=128

A LLaDA-shaped decoder wide enough that, as on the 8B, the linear layers dominate (d=1024, m=2816:
attention is ~12% of a layer's FLOPs at the step-1 length), random weights, the real 384/14 tile
(729 visual tokens) and a ~70-token prompt. Builds four bundles: fp32, fp16, int8 fp16-based (the
default scheme, what TensorRT on Orin takes: fp16 graphs with W8A8 Q/DQ) and int8 fp32-based
(`--quant-float fp32`, the same scheme on float32 graphs: what ONNX Runtime's x86 integer GEMMs
take), the int8 ones calibrated and smoothed as `--precision int8` does. Times each decoder graph
at the step-1 length (decoder_pre, full sequence) and the reduced length (decoder_post after
P=50): medians of `repeats` runs after a warm-up, ONNX Runtime CPU, its default threads, quantized
graphs with the runtime's session settings. Prints the ratios to fp32.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


import numpy as np


@dataclass(frozen=True)
class QuantBenchShape:
    d_model: int = 1024
    heads: int = 8
    d_mlp: int = 2816
    layers: int = 8
    k: int = 4
    repeats: int = 5
    calib_samples: int = 4


QUICK = QuantBenchShape(d_model=128, heads=2, d_mlp=352, layers=4, k=2, repeats=2, calib_samples=2)


def attention_share(n: int, d: int, m: int) -> float:
    """Share of one decoder layer's multiply-adds in q.k and p.v (docs/flops.md's C(n))."""
    from bench.flops import attention_macs, layer_macs

    return attention_macs(n, d) / layer_macs(n, d, m)


VARIANTS = {  # name: (precision, quantized graphs' float type)
    "fp32": ("fp32", None), "fp16": ("fp16", None), "int8 fp16-based": ("int8", "fp16"), "int8 fp32-based": ("int8", "fp32"),
}


def build(shape: QuantBenchShape, workdir: Path, log) -> dict[str, Path]:
    """One bundle per variant, from one random checkpoint; the int8 ones calibrated and smoothed as
    `--precision int8` does (each on its own float bundle's feeds)."""
    from bench.cpu import BenchShape, bench_checkpoint
    from calib.data import CalibrationSettings
    from calib.stage import QuantSettings
    from export.build import BuildRequest, build_bundle
    from export.profiles import ProfileSettings

    ckpt = bench_checkpoint(workdir / "checkpoint", BenchShape(d_model=shape.d_model, heads=shape.heads,
                                                               d_mlp=shape.d_mlp, layers=shape.layers), log)
    profile = ProfileSettings(layout="single", max_text_tokens=128, opt_text_tokens=80, max_response=32, opt_response=32)
    out = {}
    for variant, (precision, base) in VARIANTS.items():
        log(f"building the {variant} bundle")
        q = None if base is None else QuantSettings.for_mode(
            precision, calibration=CalibrationSettings(samples=shape.calib_samples), data_root=workdir / "calibration",
            float_precision=base)
        req = BuildRequest(ckpt, workdir / variant.replace(" ", "-"), shape.k, 50, precision, profile, engines="skip", quant=q)
        out[variant] = build_bundle(req, log=lambda m: None).out
    return out


def graph_path(bundle: Path, name: str) -> Path:
    return bundle / "onnx" / f"{name}.onnx" if (bundle / "onnx").is_dir() else bundle / f"{name}.onnx"


def time_graph(path: Path, feeds: dict, repeats: int, quantized: bool) -> float:
    from runtime.backends.ort import ort_session

    sess = ort_session(path, quantized=quantized)  # the runtime's session settings
    sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def feeds_for(name: str, n: int, d: int, dtype, rows: int = 32) -> dict:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, n, d)) * (0.05 if name == "decoder_pre" else 1.0)).astype(dtype)
    first = "inputs_embeds" if name == "decoder_pre" else "hidden_states"
    last = {"decoder_pre": ("score_rows", np.arange(n - rows, n)), "decoder_post": ("logit_rows", np.arange(n - rows, n))}[name]
    return {first: x, "position_ids": np.arange(n, dtype=np.int64)[None], last[0]: last[1].astype(np.int64)}


def with_empty_past(feeds: dict, manifest, name: str) -> dict:
    from runtime.pipeline import empty_past

    return {**feeds, **empty_past(manifest, name, 1, next(iter(feeds.values())).dtype)}


def run(shape: QuantBenchShape, workdir: Path, log) -> dict:
    from runtime.bundle import read_manifest
    from runtime.pruning import pruned_count

    bundles = build(shape, workdir, log)
    visual, text, gen = 729, 70, 32
    n_full = visual + text + gen
    n_reduced = n_full - pruned_count(visual, 50)
    cases = {"decoder_pre": n_full, "decoder_post": n_reduced}
    times = {}
    for variant, bundle in bundles.items():
        m = read_manifest(bundle)
        dtype = m.float_dtype
        for name, n in cases.items():
            log(f"timing {variant} {name} at {n} tokens")
            feeds = with_empty_past(feeds_for(name, n, shape.d_model, dtype), m, name)
            times[f"{variant}/{name}"] = time_graph(graph_path(bundle, name), feeds,
                                                    shape.repeats, bool(m.subgraphs[name].quantization))
    weights = {f"{v}/{n}": graph_path(b, n).with_name(f"{n}.onnx.data").stat().st_size for v, b in bundles.items()
               for n in cases}
    return {"shape": asdict(shape), "tokens": {"full": n_full, "reduced": n_reduced},
            "attention_share": attention_share(n_full, shape.d_model, shape.d_mlp), "seconds": times, "weight_bytes": weights}


def report(out: dict) -> str:
    s, t = out["shape"], out["tokens"]
    lines = [f"decoder d={s['d_model']}, m={s['d_mlp']}, {s['layers']} layers (K={s['k']}); decoder_pre at {t['full']} tokens "
             f"(step 1), decoder_post at {t['reduced']} (after P=50); attention {out['attention_share']:.1%} of a layer's "
             f"FLOPs at {t['full']}; ONNX Runtime CPU, medians of {s['repeats']}", "",
             f"{'graph':<14} " + " ".join(f"{v + ' ms':>17} {'x fp32':>7}" for v in VARIANTS)]
    sec = out["seconds"]
    for name in ("decoder_pre", "decoder_post"):
        f32 = sec[f"fp32/{name}"]
        lines.append(f"{name:<14} " + " ".join(f"{1000 * sec[f'{v}/{name}']:>17.1f} {f32 / sec[f'{v}/{name}']:>6.2f}x"
                                               for v in VARIANTS))
    lines.append("'x fp32': fp32 time / the variant's time (above 1: faster than fp32)")
    lines += ["", "weights: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in out["weight_bytes"].items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench.cli import bench_main

    return bench_main(argv, __doc__, "quant", (QUICK, QuantBenchShape()), run, (report,))


if __name__ == "__main__":
    sys.exit(main())
