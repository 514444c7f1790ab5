"""Answer a question about an image with a bundle from export/build_engines.py.

    python -m runtime --bundle bundles/tiny-k15-p50-fp16 --image road.jpg --prompt "Is the lane free?"

The strategy (P, the rule that picks the kept tokens, query set, positions) is chosen here
without rebuilding;
K is the bundle's. --cache and --threshold add block KV caching and parallel decoding
(docs/caching.md). --json prints a machine-readable result; --trace prints per-step timings;
--map writes a PNG of the image with the kept visual tokens highlighted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from runtime.errors import LladaVError, expect
from runtime.files import check_writable
from runtime.cli_args import (add_backend_args, add_cache_args, add_generation_args, add_strategy_args, at_boundary,
                              cache_settings, generation_settings, prune_settings)
from runtime.cli_args import parser as cli_parser
from runtime.cli_args import quiet_on_broken_pipe
from runtime.pruning import PruneSettings


def build_parser() -> argparse.ArgumentParser:
    # errors and usage name the command the user typed: lladav-run, or python -m runtime
    ap = cli_parser(None if Path(sys.argv[0]).name == "lladav-run" else "python -m runtime", __doc__)
    ap.add_argument("--bundle", type=Path, required=True, help="bundle directory from export/build_engines.py")
    ap.add_argument("--image", action="append", metavar="[CAMERA=]PATH",
                    help="image file (PNG, JPEG, ...); default: the built-in 640x360 demo road scene. Several cameras: "
                         "one NAME=PATH each (--image front=f.jpg --image left=l.jpg); the prompt names them")
    ap.add_argument("--prompt", required=True, help="the question about the image")
    add_backend_args(ap)
    add_strategy_args(ap)
    add_generation_args(ap)
    add_cache_args(ap)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--trace", action="store_true",
                    help="per-step sequence length and timings, and the pruning map (pruning_map.png unless --map)")
    ap.add_argument("--map", type=Path, help="write the pruning map PNG here (with or without --trace)")
    ap.add_argument("--progress", action="store_true",
                    help="show progress on stderr (step, tokens unmasked, ms per step) even when stderr is not a "
                         "terminal; on a terminal it is shown unless --quiet")
    ap.add_argument("--quiet", action="store_true", help="no progress and no warnings on stderr")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> tuple[dict, object, object]:
    """(JSON-able result, RuntimeResult, a function that writes the pruning map or None)."""
    from runtime.pipeline import Pipeline

    check_map_path(args)
    image = load_images(args.image)  # unreadable images: an error before model work
    gen = generation_settings(args)
    cache = cache_settings(args)
    with Pipeline(args.bundle, args.backend, args.model, args.device, expect_k=args.k,
                  verify=args.verify, kv_cache=cache.enabled) as pipe:
        if not args.quiet:
            warn_small(image, args.image, pipe.geometry.image_size)
        prune = prune_settings(args, pipe.manifest)
        progress = StepProgress(sys.stderr) if shows_progress(args) else None
        result = pipe.generate(image, args.prompt, gen, prune, progress, cache)
        if progress:
            progress.close()
        geometry = pipe.geometry
    out = result_dict(result, prune, gen, cache, args.backend)
    if not args.map:
        return out, result, None
    from runtime.pruning_map import camera_pruning_map, pruning_map

    title = (f"K={prune.k} P={prune.p:g}: kept {result.kept_visual.size} of {result.layout.n_visual} "
             f"visual tokens ({prune.rule}, query {args.query})")
    if isinstance(image, list):
        return out, result, lambda: camera_pruning_map(image, result.tile_layouts, result.kept_visual, geometry,
                                                       title).save(args.map)
    return out, result, lambda: pruning_map(image, result.tile_layout, result.kept_visual, geometry.side,
                                            title).save(args.map)


def load_images(values: list[str] | None):
    """--image values -> one PIL image (default: the demo scene), or [(camera, PIL image), ...]."""
    from runtime.cameras import named_images, parse_image_args
    from runtime.demo import demo_image
    from runtime.preprocess import load_image

    if not values:
        return demo_image()
    request = parse_image_args(values)
    if not isinstance(request, list):
        return load_image(request)
    loaded = []
    for name, path in named_images(request):
        try:
            loaded.append((name, load_image(path)))
        except LladaVError as exc:
            raise LladaVError(f"camera {name!r}: {exc}") from None
    return loaded


def warn_small(image, values: list[str] | None, side: int) -> None:
    """A frame smaller than one tile is upscaled: its tokens carry little detail."""
    for name, im in image if isinstance(image, list) else [(values[0] if values else "the demo scene", image)]:
        if min(im.size) < side:
            print(f"warning: image {name} is {im.width}x{im.height}, smaller than one {side}x{side} "
                  "tile: it is upscaled, and its visual tokens carry little detail", file=sys.stderr)


def check_map_path(args: argparse.Namespace) -> None:
    """Where the pruning map goes (--map, or --trace's default), checked before minutes of generation."""
    flag = "--map"
    if args.trace and args.map is None:
        args.map, flag = Path("pruning_map.png"), "--trace's pruning map (default; --map chooses another path)"
    if args.map:
        check_writable(args.map, flag)
        expect(args.map.suffix.lower() in MAP_SUFFIXES, f"{flag} {str(args.map)!r}: the file name must end in one "
                                                        f"of {', '.join(MAP_SUFFIXES)} (the image format)")


def result_dict(result, prune: PruneSettings, gen, cache, backend: str) -> dict:
    """The --json object of one answer."""
    return {
        "answer": result.text,
        "token_ids": result.answer_ids,
        "kept_visual": result.kept_visual.tolist(),
        "visual_tokens": result.layout.n_visual,
        "cameras": {name: size for name, size in zip(result.cameras, result.layout.sizes)} if len(result.cameras) > 1
        else None,
        "k": prune.k,
        "p": prune.p,
        "rule": prune.rule,
        "cache": cache.mode,
        "threshold": gen.threshold,
        "backend": backend,
        "vision_ms": round(result.vision_ms, 3),
        "total_ms": round(result.total_ms, 3),
        "steps": [s.__dict__ for s in result.steps],
        "pruning_map": None,
    }


def shows_progress(args: argparse.Namespace) -> bool:
    return not args.quiet and (args.progress or sys.stderr.isatty())


class StepProgress:
    """'step 3/32: unmasked 2, 24 masked left, 812 ms' per denoising step on a stream: one line rewritten
    in place on a terminal, a line per step elsewhere. The ms are wall time since the previous step
    (step 1 includes vision and the prompt)."""

    def __init__(self, stream):
        self.stream, self.inline = stream, stream.isatty()
        self.last, self.shown = time.perf_counter(), False

    def __call__(self, step: int, steps: int, unmasked: int, masked_left: int) -> None:
        now = time.perf_counter()
        text = f"step {step}/{steps}: unmasked {unmasked}, {masked_left} masked left, {(now - self.last) * 1000:.0f} ms"
        self.last, self.shown = now, True
        print(f"\r{text:<64}" if self.inline else text, end="" if self.inline else "\n", file=self.stream, flush=True)

    def close(self) -> None:
        if self.inline and self.shown:
            print(file=self.stream, flush=True)


MAP_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")  # PIL writes these by name


def write_map(draw, out: dict, path: Path) -> str | None:
    """Write the pruning map; on failure keep the answer and return the error (never a traceback)."""
    try:
        draw()
    except (OSError, ValueError) as exc:
        return f"--map {str(path)!r}: could not write the pruning map ({exc})"
    out["pruning_map"] = str(path)
    return None


def report(out: dict, trace: bool) -> str:
    lines = [out["answer"]]
    if trace:
        lines += ["", f"vision {out['vision_ms']:.1f} ms; K={out['k']} P={out['p']:g}: kept "
                      f"{len(out['kept_visual'])} of {out['visual_tokens']} visual tokens ({out['backend']}); "
                      f"cache {out['cache']}, threshold {out['threshold']:g}",
                  f"{'step':>4} {'seq':>6} {'rows':>6} {'pre ms':>9} {'post ms':>9} {'other ms':>9}"]
        lines += [f"{s['step']:>4} {s['seq_len']:>6} {s['rows']:>6} {s['pre_ms']:>9.2f} {s['post_ms']:>9.2f} "
                  f"{s['other_ms']:>9.2f}" for s in out["steps"]]
        lines.append(f"total {out['total_ms']:.1f} ms; pruning map: {out['pruning_map']}")
    return "\n".join(lines)


@quiet_on_broken_pipe
def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    status, got = at_boundary(lambda: run(args), ap)
    if status is not None:
        return status
    out, _, draw = got
    map_error = write_map(draw, out, args.map) if draw else None
    print(json.dumps(out) if args.json else report(out, args.trace))
    if map_error:
        print(f"error: {map_error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
