"""The 8B's real widths, once: write a checkpoint, build its fp16 bundle, answer one question.

    python -m bench.real_widths --layers 4 [--out DIR] [--keep]

The checkpoint has LLaDA-V-8B's shapes (hidden 4096, MLP 12288, 32 heads, vocabulary 126464 with
the real special-token ids, SigLIP so400m) and `--layers` decoder layers, random weights (bf16
shards). The build and the answer each run in a fresh process; printed (and written to
`real_widths.json` in --out): checkpoint bytes, build seconds, the build's peak RSS and its ratio
to the checkpoint, the answer's wall-clock seconds and what the runtime reports. Not part of the
test suite (minutes, ~10 GB of RAM at 4 layers).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the build in a fresh process; VmHWM (bench.cpu.peak_rss) is that process's peak RSS
BUILD = """
import sys, time
from pathlib import Path
from bench.cpu import peak_rss
from export.build import BuildRequest, build_bundle
before, start = peak_rss(), time.perf_counter()
build_bundle(BuildRequest(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), 50, "fp16"))
print(before, peak_rss(), time.perf_counter() - start)
"""

QUESTION = "Is the left lane free?"


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run(out: Path, layers: int, k: int, root: Path) -> dict:
    from export.tiny import preset_config, write_random

    cfg, ids = preset_config("llada-v-8b", layers)
    ckpt, bundle = out / "checkpoint", out / "bundle"
    start = time.perf_counter()
    if not (ckpt / "config.json").is_file():
        write_random(ckpt, cfg, ids, max_shard_bytes=1 << 30)
    written = time.perf_counter() - start
    nbytes = checkpoint_bytes(ckpt)
    print(f"checkpoint {ckpt}: {nbytes / 2**30:.2f} GiB bf16, {layers} layers ({written:.0f} s to write)", flush=True)
    done = subprocess.run([sys.executable, "-c", BUILD, str(ckpt), str(bundle), str(k)], cwd=root, check=True,
                          stdout=subprocess.PIPE, text=True)
    before, peak, seconds = (float(x) for x in done.stdout.split()[-3:])
    print(f"fp16 build: {seconds:.0f} s, peak RSS {peak / 2**30:.1f} GiB = {peak / nbytes:.2f}x the checkpoint "
          f"({(peak - before) / nbytes:.2f}x above the {before / 2**30:.1f} GiB of imports)", flush=True)
    start = time.perf_counter()
    answer = subprocess.run([sys.executable, "-m", "runtime", "--bundle", str(bundle), "--prompt", QUESTION, "--json",
                             "--quiet"], cwd=root, check=True, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    result = json.loads(answer.stdout)
    print(f"answer (ONNX Runtime, CPU, demo scene, {result.get('visual_tokens', '?')} visual tokens): "
          f"{result['answer']!r} in {wall:.0f} s wall-clock (process start included)", flush=True)
    return {"layers": layers, "k": k, "checkpoint_bytes": nbytes, "build_seconds": seconds, "build_peak_rss": peak,
            "build_peak_over_checkpoint": peak / nbytes, "imports_rss": before, "answer_wall_seconds": wall,
            "answer": result["answer"], "runtime": {key: result[key] for key in result if key != "steps"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the checkpoint")
    ap.add_argument("--k", type=int, default=None, help="pruning layer (default: layers // 2)")
    ap.add_argument("--out", type=Path, default=None, help="where checkpoint, bundle and real_widths.json go "
                                                            "(default: a temporary directory, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    k = args.k if args.k is not None else max(1, args.layers // 2)
    out = args.out or Path(tempfile.mkdtemp(prefix="real-widths-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        report = run(out, args.layers, k, root)
        (out / "real_widths.json").write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps({key: v for key, v in report.items() if key != "runtime"}))
    finally:
        if args.out is None and not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
