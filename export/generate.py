"""Run the PyTorch reference generator with persistent visual-token pruning.

    python export/generate.py --k 15 --p 50 --prompt "What color is the vehicle ahead?"

Without --model it uses the embedded default, the trained miniature LLaDA-V (miniature/): it
answers the questions of its driving-scene task (docs/miniature.md) about scenes of that kind;
without --image, the demo scene (the first held-out scene).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


import torch

from export.checkpoint import load_model, open_checkpoint
from export.reference import generate
from miniature import embedded_checkpoint
from runtime.demo import demo_image
from runtime.anyres import ANYRES, LAYOUTS
from runtime.cameras import named_images, parse_image_args, prepare_images
from runtime.cli_args import (K_HELP, add_cache_args, add_generation_args, add_strategy_args, cache_settings,
                              generation_settings, at_boundary)
from runtime.cli_args import parser as cli_parser
from runtime.cli_args import quiet_on_broken_pipe
from runtime.pruning import DEFAULT_RULE, PruneSettings
from runtime.tokens import TextTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    ap = cli_parser(None, __doc__)
    ap.add_argument("--model", type=Path, help="LLaDA-V checkpoint directory (default: the embedded miniature, miniature/checkpoint)")
    ap.add_argument("--image", action="append", metavar="[CAMERA=]PATH",
                    help="image file (default: the demo driving scene); several cameras: one NAME=PATH each")
    ap.add_argument("--prompt", default="What color is the vehicle ahead?", help="the question about the image")
    ap.add_argument("--layout", choices=LAYOUTS, default=ANYRES, help="AnyRes tiles or one 384x384 tile")
    ap.add_argument("--k", type=int, default=15, help=K_HELP)
    ap.add_argument("--p", type=float, default=50.0, help="percent of visual tokens pruned, in [0, 100); 0 = unpruned")
    add_strategy_args(ap, bundle_p=False)
    add_generation_args(ap)
    add_cache_args(ap)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights on the CPU")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    gen = generation_settings(args)
    cache = cache_settings(args)
    prune = PruneSettings(args.k, args.p, args.query, args.rule or DEFAULT_RULE, args.positions, args.seed, args.pivots,
                          args.budget, args.fill)
    model_dir = args.model if args.model is not None else embedded_checkpoint()
    prune.validate(open_checkpoint(model_dir).config.n_layers)  # refuse bad K/P before loading weights
    model, ckpt = load_model(model_dir, DTYPES[args.dtype])
    tokenizer = TextTokenizer(model_dir)
    views = named_images(parse_image_args(args.image) if args.image else demo_image())
    images = prepare_images(views, ckpt.config.geometry, args.layout)
    prompt = tokenizer.encode_prompt(args.prompt, [name for name, _ in views] if len(views) > 1 else None)
    start = time.perf_counter()
    result = generate(model, tokenizer.ids, prompt, images, gen, prune, cache)
    seconds = time.perf_counter() - start
    lay = result.layout
    return {
        "model": str(model_dir),
        "embedded": args.model is None,
        "layers": ckpt.config.n_layers,
        "image_tiles": sum(im.layout.num_tiles for im in images),
        "visual_tokens": lay.n_visual,
        "text_tokens": prompt.n_text,
        "response_tokens": lay.n_response,
        "k": prune.k,
        "p": prune.p,
        "rule": prune.rule,
        "pruned_visual_tokens": lay.n_visual - result.kept_visual.size,
        "sequence_full": lay.total,
        "sequence_reduced": result.seq_lens[0] if result.seq_lens else lay.total,
        "steps_run": len(result.seq_lens),
        "cache": cache.mode,
        "rows_computed": result.computed_rows,
        "seconds": round(seconds, 3),
        "answer_ids": result.answer_ids,
        "answer": tokenizer.decode(result.answer_ids),
        "kept_visual": result.kept_visual.tolist(),
    }


def report(out: dict) -> str:
    return "\n".join([
        f"model     {out['model']} ({out['layers']} decoder layers)",
        f"image     {out['image_tiles']} tile(s) -> {out['visual_tokens']} visual tokens; "
        f"{out['text_tokens']} text tokens; {out['response_tokens']} response tokens",
        f"pruning   K={out['k']} P={out['p']:g}: {out['pruned_visual_tokens']} visual tokens dropped in step 1; "
        f"sequence {out['sequence_full']} -> {out['sequence_reduced']} from layer {out['k']} of step 1 on",
        f"steps     {out['steps_run']} in {out['seconds']:.2f} s (eager PyTorch, CPU)",
        f"answer    {out['answer']!r}",
    ])


@quiet_on_broken_pipe
def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    status, out = at_boundary(lambda: run(args), ap)
    if status is not None:
        return status
    print(json.dumps(out) if args.json else report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
