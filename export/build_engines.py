"""Turn an LLaDA-V checkpoint into a deployable bundle for the Jetson.

    python export/build_engines.py --k 15 --p 50

Exports the vision, decoder_pre (layers < K, with saliency) and decoder_post (layers >= K,
response logits) ONNX subgraphs, validates each against PyTorch, writes the manifest and the
trtexec commands for the Jetson, and builds TensorRT engines where TensorRT and a GPU exist.
Without --model it uses the embedded default: the trained miniature LLaDA-V (miniature/checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from export.build import PRECISIONS, QUANTIZED, BuildRequest, build_bundle, summary
from export.profiles import ProfileSettings
from runtime.anyres import ANYRES, LAYOUTS
from runtime.cli_args import K_HELP, at_boundary, image_size
from runtime.cli_args import parser as cli_parser
from runtime.pruning import DEFAULT_RULE, RULE_HELP, RULES


def build_parser() -> argparse.ArgumentParser:
    ap = cli_parser(None, __doc__)
    add_method_args(ap)
    add_profile_args(ap)
    add_build_args(ap)
    add_calibration_args(ap)
    return ap


def add_method_args(ap: argparse.ArgumentParser) -> None:
    """K, P, the rule; which checkpoint, where, at which precision."""
    ap.add_argument("--k", type=int, default=15, help=K_HELP)
    ap.add_argument("--p", type=float, default=50.0,
                    help="percent of visual tokens pruned, in [0, 100): what the runtime uses unless told "
                         "otherwise, and the reduced length the engines are tuned (opt) for")
    ap.add_argument("--rule", choices=RULES, default=DEFAULT_RULE,
                    help="which visual tokens survive step 1, what the runtime uses unless told otherwise: "
                         + "; ".join(f"{r}: {h}" for r, h in RULE_HELP.items()))
    ap.add_argument("--model", type=Path, help="LLaDA-V checkpoint directory (default: the embedded miniature, miniature/checkpoint)")
    ap.add_argument("--out", type=Path, help="bundle directory (default: bundles/<model>-k<K>-p<P>-<precision>)")
    ap.add_argument("--precision", default="fp16", choices=PRECISIONS,
                    help="weights and activations of the exported graphs (norms, softmax, saliency and logits stay "
                         "float32); int8: fp16 graphs whose decoder linear layers are W8A8 Q/DQ, calibrated on the "
                         "pipeline's own activations; int4: their weights INT4 (blocks of 128), activations fp16 (calib/)")


def add_profile_args(ap: argparse.ArgumentParser) -> None:
    """What the engines accept and are tuned for (export.profiles.ProfileSettings)."""
    ap.add_argument("--layout", choices=LAYOUTS, default=ANYRES,
                    help="AnyRes tiles (up to 37 tiles, ~4.3k visual tokens) or one 384x384 tile (729 tokens)")
    ap.add_argument("--max-text-tokens", type=int, default=256, help="longest prompt in tokens, chat template included")
    ap.add_argument("--opt-text-tokens", type=int, default=96, help="prompt length in tokens the engines are tuned for")
    ap.add_argument("--max-response", type=int, default=128, help="longest --gen-length the engines accept, in tokens")
    ap.add_argument("--opt-response", type=int, default=32, help="response length in tokens the engines are tuned for")
    ap.add_argument("--opt-block", type=int, default=None,
                    help="block length the cached-step profile is tuned for (--cache; at most --max-response; "
                         "default: 32, or --max-response when shorter)")
    ap.add_argument("--opt-image", type=image_size, default="1920x1080", metavar="WIDTHxHEIGHT",
                    help="camera frame size in pixels the engines are tuned for")
    ap.add_argument("--max-image", type=image_size, metavar="WIDTHxHEIGHT",
                    help="the largest camera frame (anyres): the engines' tile and token maxima, and their K/V and "
                         "activation buffers, sized from its tile plan instead of the worst AnyRes grid (37 tiles); "
                         "larger plans are refused at run time. On an Orin NX this is what makes the 8B fit "
                         "(python -m bench.orin_fit --max-image ...)")
    ap.add_argument("--cfg", action="store_true", help="allow batch 2 for classifier-free guidance")
    ap.add_argument("--max-pivots", type=int, default=32, help="most pivots the duplicate rule may use at run time")
    ap.add_argument("--cameras", type=int, default=1,
                    help="the most cameras (images) one request may hold: the vision engine and the sequence profiles "
                         "also cover that many views (730 tokens each, LLaDA-V's several-image convention)")


def add_build_args(ap: argparse.ArgumentParser) -> None:
    """Opset, engines, and what happens to an existing bundle at --out."""
    ap.add_argument("--opset", type=int, choices=range(17, 21), metavar="{17..20}",
                    help="ONNX opset of the exported graphs (TensorRT 10.3 parses 17..20; default 18, int8 and int4 19; "
                         "int4 graphs become opset 21 when quantized)")
    ap.add_argument("--engines", choices=("auto", "skip", "require"), default="auto",
                    help="TensorRT engines: build where TensorRT and a GPU exist (auto), never (skip), or fail "
                         "before any export without them (require)")
    ap.add_argument("--force", action="store_true",
                    help="replace a bundle of another model at --out (refused otherwise)")
    ap.add_argument("--clean", action="store_true",
                    help="when rebuilding into an existing bundle, delete its engines that no longer match (stale) "
                         "instead of keeping them; every other file the build did not write is always kept")


def add_calibration_args(ap: argparse.ArgumentParser) -> None:
    """int8 and int4: the calibration data and the schemes' knobs (calib/)."""
    cal = ap.add_argument_group("calibration (--precision int8 or int4)")
    cal.add_argument("--calib-samples", type=int, default=48,
                     help="questions run through the float bundle to record what each graph sees")
    cal.add_argument("--calib-images", type=Path,
                     help="a folder of your camera images (default: the miniature's scene generator)")
    cal.add_argument("--calib-prompts", type=Path, help="a text file of questions, one per line (with --calib-images)")
    cal.add_argument("--calib-method", choices=("minmax", "percentile", "entropy"), default="minmax",
                     help="how activation ranges are taken from the calibration data")
    cal.add_argument("--smooth-alpha", type=float,
                     help="SmoothQuant migration strength in [0, 1) (0: off; default: the scheme's)")
    cal.add_argument("--awq-grid", type=int,
                     help="int4: alphas searched for AWQ's activation-aware scales (0: round to nearest; default: the "
                          "scheme's 20)")
    cal.add_argument("--quantize-vision", action="store_true",
                     help="int8: the vision tower's linear layers W8A8 too (default: fp16; saves ~0.4 GB on the 8B at "
                          "some accuracy cost, docs/quantization.md)")
    cal.add_argument("--quant-float", choices=("fp16", "fp32"), default="fp16",
                     help="the quantized graphs' float type: fp16 for TensorRT on Orin (default); fp32 for ONNX Runtime "
                          "on an x86 CPU, whose integer GEMMs take float32 graphs only")
    cal.add_argument("--calib-dir", type=Path, default=Path("bundles") / "calibration",
                     help="where calibration data is stored and reused (keyed by model, K, P and settings)")

def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def request(args: argparse.Namespace) -> BuildRequest:
    from miniature import embedded_checkpoint

    model_dir = args.model if args.model is not None else embedded_checkpoint()
    name = "miniature" if args.model is None else model_dir.name
    out = args.out or Path("bundles") / f"{name}-k{args.k}-p{args.p:g}-{args.precision}"  # P tunes the profile
    profiles = ProfileSettings(args.layout, args.max_text_tokens, args.opt_text_tokens, args.max_response,
                               args.opt_response, args.opt_image, 2 if args.cfg else 1, args.opt_block,
                               args.max_image, args.max_pivots, args.cameras)
    return BuildRequest(model_dir, out, args.k, args.p, args.precision, profiles, args.opset, args.engines, args.clean,
                        quant_settings(args) if args.precision in QUANTIZED else None, args.force, args.rule)


def quant_settings(args: argparse.Namespace):
    from dataclasses import replace

    from calib.data import CalibrationSettings
    from calib.stage import QuantSettings

    q = QuantSettings.for_mode(args.precision)
    images = None if args.calib_images is None else str(args.calib_images)
    prompts = None if args.calib_prompts is None else str(args.calib_prompts)
    alpha = q.scheme.smooth_alpha if args.smooth_alpha is None else args.smooth_alpha
    grid = q.scheme.awq_grid if args.awq_grid is None else args.awq_grid
    method = args.calib_method if q.scheme.mode == "int8" else q.scheme.calibration  # int4 takes no activation ranges
    return replace(q, scheme=replace(q.scheme, calibration=method, smooth_alpha=alpha, awq_grid=grid), data_root=args.calib_dir,
                   float_precision=args.quant_float, quantize_vision=args.quantize_vision,
                   calibration=CalibrationSettings(samples=args.calib_samples, images=images, prompts=prompts))


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    reqs = []

    def build():
        reqs.append(request(args))
        return build_bundle(reqs[0])

    def interrupted() -> str:  # the temporary directory is already gone (atomic_directory)
        kept = reqs and (Path(reqs[0].out) / "manifest.json").is_file()
        return "interrupted; nothing was written" + (f", the previous bundle {reqs[0].out} is intact" if kept else "")

    status, result = at_boundary(build, ap, interrupted)
    if status is not None:
        return status
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
