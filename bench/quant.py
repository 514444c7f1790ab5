"""CPU speed of INT8 against fp32 on ONNX Runtime, decoder by decoder, in one run.

    python -m bench.quant                  # d=1024, 8 layers: a few minutes on 2 cores
    python -m bench.quant --quick          # a smoke run at d=128

A LLaDA-shaped decoder wide enough that, as on the 8B, the linear layers dominate (d=1024, m=2816:
attention is ~12% of a layer's FLOPs at the step-1 length), random weights, the real 384/14 tile
(729 visual tokens) and a ~70-token prompt. Builds an fp32 bundle and an int8 bundle (the shipped
scheme: fp16 graphs with W8A8 Q/DQ, calibrated and smoothed as `--precision int8` does), and
quantizes the fp32 bundle's decoders with the same scheme but float32 scales ('int8 on fp32',
what ONNX Runtime's CPU kernels fuse best). Times each decoder graph at the step-1 length
(decoder_pre, full sequence) and the reduced length (decoder_post after P=50): medians of
`repeats` runs after a warm-up, ONNX Runtime CPU, its default threads. Prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


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


def build(shape: QuantBenchShape, workdir: Path, log) -> dict[str, Path]:
    from bench.cpu import BenchShape, write_bench_checkpoint
    from calib.data import CalibrationSettings
    from calib.stage import QuantSettings
    from export.build import BuildRequest, build_bundle
    from export.profiles import ProfileSettings

    ckpt = workdir / "checkpoint"
    if not (ckpt / "config.json").is_file():
        log(f"writing a random checkpoint: d={shape.d_model}, m={shape.d_mlp}, {shape.layers} layers")
        write_bench_checkpoint(ckpt, BenchShape(d_model=shape.d_model, heads=shape.heads, d_mlp=shape.d_mlp,
                                                layers=shape.layers))
    profile = ProfileSettings(layout="single", max_text_tokens=128, opt_text_tokens=80, max_response=32, opt_response=32)
    q = QuantSettings.for_mode("int8", calibration=CalibrationSettings(samples=shape.calib_samples),
                               data_root=workdir / "calibration")
    out = {}
    for precision in ("fp32", "int8"):
        log(f"building the {precision} bundle")
        req = BuildRequest(ckpt, workdir / precision, shape.k, 50, precision, profile, engines="skip",
                           quant=q if precision == "int8" else None)
        out[precision] = build_bundle(req, log=lambda m: None).out
    out["int8 on fp32"] = int8_on_fp32(out["fp32"], out["int8"], workdir, q, log)
    return out


def int8_on_fp32(fp32: Path, int8: Path, workdir: Path, q, log) -> Path:
    """The fp32 bundle's decoders quantized by the int8 scheme with float32 scales (opset 18 allows them),
    on the calibration data the int8 bundle was made from."""
    from calib.data import load_calibration
    from calib.quantize import quantize_graph
    from runtime.bundle import read_manifest

    m = read_manifest(fp32)
    key = read_manifest(int8).subgraphs["decoder_pre"].quantization["calibration"]["key"]
    data = load_calibration(q.data_root / key)
    dst = workdir / "int8-on-fp32"
    dst.mkdir(exist_ok=True)
    for name in ("decoder_pre", "decoder_post"):
        log(f"quantizing the fp32 {name} (float32 scales)")
        feeds = [{k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in f.items()} for f in data.feeds(name)]
        quantize_graph(fp32 / "onnx" / f"{name}.onnx", dst / f"{name}.onnx", feeds, replace(q.scheme, min_opset=13),
                       m.model["decoder"]["vocab"])
    return dst


def graph_path(bundle: Path, name: str) -> Path:
    return bundle / "onnx" / f"{name}.onnx" if (bundle / "onnx").is_dir() else bundle / f"{name}.onnx"


def time_graph(path: Path, feeds: dict, repeats: int) -> float:
    from export.onnx_export import ort_session

    sess = ort_session(path)
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


def run(shape: QuantBenchShape, workdir: Path, log) -> dict:
    from runtime.bundle import read_manifest
    from runtime.pruning import pruned_count

    bundles = build(shape, workdir, log)
    visual, text, gen = 729, 70, 32
    n_full = visual + text + gen
    n_reduced = n_full - pruned_count(visual, 50)
    cases = {"decoder_pre": n_full, "decoder_post": n_reduced}
    dtypes = {"fp32": np.float32, "int8": np.float16, "int8 on fp32": np.float32}
    times = {}
    for variant, bundle in bundles.items():
        for name, n in cases.items():
            log(f"timing {variant} {name} at {n} tokens")
            times[f"{variant}/{name}"] = time_graph(graph_path(bundle, name), feeds_for(name, n, shape.d_model, dtypes[variant]),
                                                    shape.repeats)
    weights = {f"{v}/{n}": graph_path(b, n).with_name(f"{n}.onnx.data").stat().st_size for v, b in bundles.items()
               for n in cases}
    return {"shape": asdict(shape), "tokens": {"full": n_full, "reduced": n_reduced},
            "attention_share": attention_share(n_full, shape.d_model, shape.d_mlp), "seconds": times, "weight_bytes": weights,
            "int8_precision": read_manifest(bundles["int8"]).precision}


def report(out: dict) -> str:
    s, t = out["shape"], out["tokens"]
    lines = [f"decoder d={s['d_model']}, m={s['d_mlp']}, {s['layers']} layers (K={s['k']}); decoder_pre at {t['full']} tokens "
             f"(step 1), decoder_post at {t['reduced']} (after P=50); attention {out['attention_share']:.1%} of a layer's "
             f"FLOPs at {t['full']}; ONNX Runtime CPU, medians of {s['repeats']}", "",
             f"{'graph':<14} {'fp32 ms':>8} {'int8 (fp16 graph) ms':>21} {'x fp32':>7} {'int8 on fp32 ms':>16} {'x fp32':>7}"]
    sec = out["seconds"]
    for name in ("decoder_pre", "decoder_post"):
        f32, q16, q32 = (sec[f"{v}/{name}"] for v in ("fp32", "int8", "int8 on fp32"))
        lines.append(f"{name:<14} {1000 * f32:>8.1f} {1000 * q16:>21.1f} {f32 / q16:>6.2f}x {1000 * q32:>16.1f} {f32 / q32:>6.2f}x")
    lines.append("'x fp32': fp32 time / int8 time (above 1: int8 is faster)")
    lines += ["", "weights: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in out["weight_bytes"].items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run at d=128")
    ap.add_argument("--workdir", type=Path, default=Path("bundles/bench-quant"))
    ap.add_argument("--json", type=Path, default=Path("bench_quant.json"))
    args = ap.parse_args(argv)
    shape = QUICK if args.quick else QuantBenchShape()
    start = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - start:6.1f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    out = run(shape, args.workdir / ("quick" if args.quick else "full"), log)
    out["total_seconds"] = time.perf_counter() - start
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(report(out))
    print(f"\nwrote {args.json} in {out['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
