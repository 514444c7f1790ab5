"""The command line the build-and-time benchmarks share (bench.cache, bench.quant): --quick (a smoke
run at a small width) or the full shape, a work directory for their bundles, a JSON record, a
printed report with ratios from that one run."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def bench_main(argv, doc: str, name: str, shapes: tuple, run, reports: tuple, add_args=None, adapt=None) -> int:
    """shapes: (quick, full); run(shape, workdir, log) -> record; reports: record -> text, each printed;
    add_args(ap): the benchmark's own flags; adapt(shape, args) -> the shape those flags ask for."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run at d=128")
    ap.add_argument("--workdir", type=Path, default=Path(f"bundles/bench-{name}"))
    ap.add_argument("--json", type=Path, default=Path(f"bench_{name}.json"))
    if add_args:
        add_args(ap)
    args = ap.parse_args(argv)
    shape = shapes[0] if args.quick else shapes[1]
    shape = adapt(shape, args) if adapt else shape
    start = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - start:6.1f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    out = run(shape, args.workdir / ("quick" if args.quick else "full"), log)
    out["total_seconds"] = time.perf_counter() - start
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print("\n\n".join(r(out) for r in reports))
    print(f"\nwrote {args.json} in {out['total_seconds']:.0f} s")
    return 0
