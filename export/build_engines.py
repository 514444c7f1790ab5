"""Turn an LLaDA-V checkpoint into a deployable bundle for the Jetson.

    python export/build_engines.py --k 15 --p 50

Exports the vision, decoder_pre (layers < K, with saliency) and decoder_post (layers >= K,
response logits) ONNX subgraphs, validates each against PyTorch, writes the manifest and the
trtexec commands for the Jetson, and builds TensorRT engines where TensorRT and a GPU exist.
Without --model it uses the embedded tiny default (written on first use).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.build import LATER_PRECISIONS, PRECISIONS, BuildRequest, build_bundle, summary  # noqa: E402
from export.profiles import ProfileSettings  # noqa: E402
from runtime.anyres import ANYRES, LAYOUTS  # noqa: E402
from runtime.errors import LladaVError  # noqa: E402


def image_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected WIDTHxHEIGHT, e.g. 1920x1080") from None
    return w, h


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=15, help="pruning layer: decoder_pre holds layers < K")
    ap.add_argument("--p", type=float, default=50.0, help="default percent of visual tokens pruned (tunes the profile)")
    ap.add_argument("--model", type=Path, help="LLaDA-V checkpoint directory (default: the embedded tiny model)")
    ap.add_argument("--out", type=Path, help="bundle directory (default: bundles/<model>-k<K>-p<P>-<precision>)")
    ap.add_argument("--precision", default="fp16", choices=PRECISIONS + LATER_PRECISIONS)
    ap.add_argument("--layout", choices=LAYOUTS, default=ANYRES, help="AnyRes tiles or one 384x384 tile (729 tokens)")
    ap.add_argument("--max-text-tokens", type=int, default=256, help="prompt text tokens, template included")
    ap.add_argument("--opt-text-tokens", type=int, default=96)
    ap.add_argument("--max-response", type=int, default=128, help="longest gen_length the engines accept")
    ap.add_argument("--opt-response", type=int, default=32)
    ap.add_argument("--opt-image", type=image_size, default=(1920, 1080), help="image size the profile is tuned for")
    ap.add_argument("--cfg", action="store_true", help="allow batch 2 for classifier-free guidance")
    ap.add_argument("--opset", type=int, default=18, choices=range(17, 21), metavar="{17..20}")
    ap.add_argument("--engines", choices=("auto", "skip", "require"), default="auto",
                    help="auto: build TensorRT engines where TensorRT and a GPU exist")
    return ap.parse_args(argv)


def request(args: argparse.Namespace) -> BuildRequest:
    from export.tiny import ensure_tiny

    model_dir = args.model if args.model is not None else ensure_tiny()
    name = "tiny" if args.model is None else model_dir.name
    out = args.out or Path("bundles") / f"{name}-k{args.k}-p{args.p:g}-{args.precision}"  # P tunes the profile
    profiles = ProfileSettings(args.layout, args.max_text_tokens, args.opt_text_tokens, args.max_response,
                               args.opt_response, args.opt_image, 2 if args.cfg else 1)
    return BuildRequest(model_dir, out, args.k, args.p, args.precision, profiles, args.opset, args.engines)


def main(argv=None) -> int:
    args = parse_args(argv)
    req = None
    try:
        req = request(args)
        result = build_bundle(req)
    except LladaVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the temporary directory is already gone (atomic_directory)
        kept = req is not None and (Path(req.out) / "manifest.json").is_file()
        print("interrupted; nothing was written" + (f", the previous bundle {req.out} is intact" if kept else ""),
              file=sys.stderr)
        return 130
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
