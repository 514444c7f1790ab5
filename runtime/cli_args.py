"""Command-line pieces shared by the entry points (argparse stays in entry points; this declares
the common options, the help format, and turns settings errors into the words a user typed)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from runtime.backends import BACKENDS
from runtime.bundle import VERIFY
from runtime.caching import CACHE_MODES, CacheSettings
from runtime.pruning import BUDGETS, DEFAULT_PIVOTS, FILL_MODES, POSITION_MODES, QUERY_SETS, RULE_HELP, RULES, PruneSettings
from runtime.schedule import REMASKING, GenerationSettings

K_HELP = "pruning layer K: step 1 drops tokens between decoder layers K-1 and K; 1..L-1 (L = 32 for LLaDA-V)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default after its help text (unless the
    help already says what the default is, or there is none: a flag, an option the user must give)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser(prog: str | None, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def image_size(text: str) -> tuple[int, int]:
    """argparse type for WIDTHxHEIGHT."""
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected WIDTHxHEIGHT, e.g. 1920x1080") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected positive WIDTHxHEIGHT")
    return w, h


def percent_list(text: str) -> tuple[float, ...]:
    """argparse type for a comma-separated list of P values, e.g. 0,50,70."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected percentages separated by commas, e.g. 0,50,70") from None


def add_backend_args(ap: argparse.ArgumentParser) -> None:
    """What runs the bundle's graphs, and what is checked when it opens."""
    ap.add_argument("--backend", choices=BACKENDS, default="onnxruntime", help="what runs the graphs")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="onnxruntime's execution provider")
    ap.add_argument("--model", type=Path, help="checkpoint for the pytorch backend (default: the path in the "
                                               "bundle's manifest)")
    ap.add_argument("--k", type=int, help="refuse to run unless the bundle was built for this K (its graphs are "
                                          "split at K)")
    ap.add_argument("--verify", choices=VERIFY, default="sizes",
                    help="check the bundle's files at start: present with their sizes, also sha256 (slow for the "
                         "8B: ~17 GB to hash), or not")


def add_strategy_args(ap: argparse.ArgumentParser, bundle_p: bool = True) -> None:
    """bundle_p: also --p, defaulting to the bundle's P (prune_settings); entry points without a bundle
    declare their own."""
    if bundle_p:
        ap.add_argument("--p", type=float, help="percent of visual tokens pruned, in [0, 100); 0 = unpruned "
                                                "(default: the bundle's P)")
    ap.add_argument("--query", choices=QUERY_SETS, default="response",
                    help="rows whose attention scores the visual tokens: the masked response (RedVTP), the prompt "
                         "text, or the last prompt token (FastV)")
    ap.add_argument("--rule", choices=RULES, default=None,
                    help="which visual tokens survive step 1 (default: the bundle's): "
                         + "; ".join(f"{r}: {h}" for r, h in RULE_HELP.items()))
    ap.add_argument("--pivots", type=int, default=DEFAULT_PIVOTS,
                    help="the duplicate rule's pivots: the most salient visual tokens, each keeping its share of the "
                         "budget among the tokens least similar to it")
    ap.add_argument("--positions", choices=POSITION_MODES, default="original",
                    help="RoPE position ids of kept tokens: their original ones (FastV) or re-packed (RedVTP)")
    ap.add_argument("--budget", choices=BUDGETS, default="global",
                    help="several cameras: rank every camera's tokens together (global), or let each camera keep its "
                         "own share (per_camera: no camera wiped out)")
    ap.add_argument("--fill", choices=FILL_MODES, default="first",
                    help="several cameras: a padded view's fill tokens (no pixel of the frame) go before any frame "
                         "token (first), or the rule ranks them like any token (rule)")


def add_generation_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--steps", type=int, default=None,
                    help="denoising steps: a multiple of the number of blocks (gen-length / block-length), "
                         "at most --gen-length (default: --gen-length)")
    ap.add_argument("--gen-length", type=int, default=32, help="response length in tokens")
    ap.add_argument("--block-length", type=int, default=None,
                    help="tokens per semi-autoregressive block; must divide --gen-length (default: --gen-length, "
                         "one block)")
    ap.add_argument("--temperature", type=float, default=0.0, help="Gumbel sampling temperature; 0 = greedy")
    ap.add_argument("--cfg-scale", type=float, default=0.0,
                    help="classifier-free guidance scale; 0 = off (> 0 needs a --cfg bundle: batch 2)")
    ap.add_argument("--remasking", choices=REMASKING, default="low_confidence",
                    help="which masked positions each step unmasks: the most confident, or random ones")
    ap.add_argument("--no-stop-at-eot", action="store_true", help="fill the whole response even after <|eot_id|>")
    ap.add_argument("--seed", type=int, default=0, help="seed for sampling and random pruning")
    ap.add_argument("--threshold", type=float, default=0.0,
                    help="Fast-dLLM's parallel decoding: in the current block, unmask every masked position whose "
                         "probability exceeds this, at least one per step (0 = off: --steps sets the pace)")


def add_cache_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--cache", choices=CACHE_MODES, default="none",
                    help="block KV cache (docs/caching.md): reuse the K/V of the rows before the current block "
                         "(prefix) or before and after it (dual) between refreshes at each block's first step")
    ap.add_argument("--cache-refresh", dest="refresh_every", type=int, default=0,
                    help="also refresh the cache every N steps inside a block (0: only at block starts; 1: every "
                         "step, the uncached tokens exactly)")


def prune_settings(args: argparse.Namespace, manifest) -> PruneSettings:
    """The strategy flags over the bundle's defaults (its K; its P and rule unless given)."""
    p = manifest.p if args.p is None else args.p
    rule = manifest.rule if args.rule is None else args.rule
    return PruneSettings(manifest.k, p, args.query, rule, args.positions, args.seed, args.pivots, args.budget,
                         args.fill)


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    steps = args.steps if args.steps is not None else args.gen_length  # defaults follow the length the user typed
    block = args.block_length if args.block_length is not None else args.gen_length
    return GenerationSettings(steps, args.gen_length, block, args.temperature, args.cfg_scale,
                              args.remasking, not args.no_stop_at_eot, args.seed, args.threshold).validate()


def cache_settings(args: argparse.Namespace) -> CacheSettings:
    return CacheSettings(args.cache, args.refresh_every).validate()


def name_flags(message: str, ap: argparse.ArgumentParser) -> str:
    """A settings error in a command-line user's words: multi-word field names (gen_length, cfg_scale,
    max_text_tokens, ...) become the flags that set them (--gen-length, ...)."""
    for action in ap._actions:  # argparse keeps its options here; the mapping cannot drift from the parser
        if "_" in action.dest and action.option_strings:
            message = re.sub(rf"(?<![\w-]){re.escape(action.dest)}\b", action.option_strings[0], message)
    return message


def at_boundary(work, ap: argparse.ArgumentParser | None = None, interrupted="interrupted"):
    """An entry point's boundary: (None, work()) when it succeeds; else the exit status and None after
    one line on stderr: the project error (LladaVError) in the words the user typed (name_flags, with
    `ap`) -> 2, Ctrl-C -> 130 with `interrupted` (a string, or a function returning one, for messages
    that depend on how far the work got)."""
    import sys

    from runtime.errors import LladaVError

    try:
        return None, work()
    except LladaVError as exc:
        print(f"error: {name_flags(str(exc), ap) if ap is not None else exc}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print(interrupted() if callable(interrupted) else interrupted, file=sys.stderr)
        return 130, None


SIGPIPE_STATUS = 141  # what a shell reports for a program killed by SIGPIPE (128 + 13)


def quiet_on_broken_pipe(main):
    """An entry point's main whose output is piped into a reader that stops early (`| head -1`) ends
    quietly with SIGPIPE's status, as Unix tools do, instead of a BrokenPipeError traceback."""
    import functools
    import os
    import sys

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)  # the interpreter's last flush must not fail again
            os.dup2(devnull, sys.stdout.fileno())
            return SIGPIPE_STATUS

    return wrapped
