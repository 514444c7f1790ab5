"""Command-line options shared by the entry points that generate (argparse stays in entry points;
this only declares the common options and reads them back into the settings dataclasses)."""

from __future__ import annotations

import argparse

from runtime.pruning import POSITION_MODES, QUERY_SETS
from runtime.schedule import REMASKING, GenerationSettings


def add_strategy_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--query", choices=QUERY_SETS, default="response", help="rows whose attention scores the tokens")
    ap.add_argument("--random-prune", action="store_true", help="ablation: drop at random instead")
    ap.add_argument("--positions", choices=POSITION_MODES, default="original", help="RoPE ids of kept tokens")


def add_generation_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--cfg-scale", type=float, default=0.0)
    ap.add_argument("--remasking", choices=REMASKING, default="low_confidence")
    ap.add_argument("--no-stop-at-eot", action="store_true", help="fill the whole response even after <|eot_id|>")
    ap.add_argument("--seed", type=int, default=0)


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    return GenerationSettings(args.steps, args.gen_length, args.block_length, args.temperature, args.cfg_scale,
                              args.remasking, not args.no_stop_at_eot, args.seed).validate()
