"""Measure peak memory of loading a checkpoint in bf16, relative to its size on disk.

    python -m bench.memory [--d-model 1024] [--layers 32] [--export]

Writes a random checkpoint of a mid-size LLaDA-V shape (bf16 shards, as the real one), then
loads it in a fresh process and prints the peak resident memory added by the load divided by
the checkpoint's bytes. Streaming into a meta-device model keeps it near 1x (+ one shard mapped).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path


# Each probe runs in a fresh process and reads VmHWM (bench.cpu.peak_rss): the peak RSS of that
# address space, unlike ru_maxrss, which survives exec from the parent.
PROBE = """
import sys, torch
from bench.cpu import peak_rss
from export.checkpoint import load_model
before = peak_rss()
model, _ = load_model(sys.argv[1], torch.bfloat16)
for p in model.parameters():  # touch every weight: mmap-backed pages count once resident
    p.sum()
print(before, peak_rss())
"""


EXPORT_PROBE = """
import sys
from pathlib import Path
from export.build import BuildRequest, build_bundle
from export.profiles import ProfileSettings
from bench.cpu import peak_rss
before = peak_rss()
prof = ProfileSettings(layout="single", max_text_tokens=128, opt_text_tokens=64, max_response=32, opt_response=16)
build_bundle(BuildRequest(Path(sys.argv[1]), Path(sys.argv[2]), 15, 50, "fp16", prof), log=lambda m: None)
print(before, peak_rss())
"""


def write(path: Path, d_model: int, layers: int, shard_bytes: int) -> int:
    import torch

    from export.checkpoint import config_to_json, write_checkpoint
    from export.model import PRESETS
    from export.tiny import build_tokenizer, random_state, tokenizer_files

    tiny = PRESETS["tiny"]
    dec = replace(tiny.decoder, d_model=d_model, n_heads=d_model // 64, d_mlp=d_model * 11 // 4, n_layers=layers,
                  vocab_size=32000)
    cfg = replace(tiny, decoder=dec, name="bench")
    files, ids = tokenizer_files(build_tokenizer())
    state = {k: v.to(torch.bfloat16) for k, v in random_state(cfg, 0).items()}
    write_checkpoint(path, config_to_json(cfg, ids), state, files, shard_bytes)
    return sum(t.numel() * t.element_size() for t in state.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shard-mb", type=int, default=256)
    ap.add_argument("--export", action="store_true", help="also measure a full fp16 bundle build (export + validation)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        nbytes = write(path, args.d_model, args.layers, args.shard_mb << 20)
        root = str(Path(__file__).resolve().parents[1])
        out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True,
                             cwd=root).stdout.split()
        before, after = int(out[0]), int(out[1])
        print(f"checkpoint    {nbytes / 2**20:.0f} MiB of bf16 tensors in {args.shard_mb} MiB shards")
        print(f"peak RSS      {before / 2**20:.0f} MiB after imports -> {after / 2**20:.0f} MiB after a bf16 load "
              "with every weight touched")
        print(f"load overhead {(after - before) / nbytes:.2f}x the checkpoint size")
        if args.export:
            out = subprocess.run([sys.executable, "-c", EXPORT_PROBE, str(path), str(Path(tmp) / "bundle")],
                                 capture_output=True, text=True, check=True, cwd=root).stdout.split()
            before, after = int(out[-2]), int(out[-1])
            print(f"fp16 bundle build (load, export 3 graphs, validate): peak RSS {after / 2**20:.0f} MiB = "
                  f"{(after - before) / nbytes:.2f}x the fp16 weights above imports; at that ratio the 8B "
                  f"(~16 GB fp16) needs ~{(after - before) / nbytes * 16:.0f} GB + imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
