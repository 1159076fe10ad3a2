#!/usr/bin/env python3
"""Single-thread, in-cache decode rate of each weight format's dot kernel (weight GB/s).

tools/bench_matmul.py measures decode as a model sees it, streaming from memory on every core; this one
isolates the kernels: one thread, one weight matrix small enough to stay in L2 (default 384 x 4096), called
over and over through fl_matmul with one token, so the figure is what the dot costs in instructions. Each
call also pays a fixed cost (quantizing the activation, the call itself), so it is timed at --rows and at
an eighth of them: the difference gives the dot's own rate ("dot GB/s") and the fixed cost per call. It
repeats the whole set of formats --rounds times and reports medians, since the machine may be shared. To
compare two builds, run it from a copy of the package holding the other build, alternating.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flashlite import matmul as fm  # noqa: E402
from flashlite._native import ffi, lib  # noqa: E402
from flashlite import block_formats  # noqa: E402
from tools.bench_matmul import FORMATS, fill_arena  # noqa: E402


def call_seconds(fmt: str, rows: int, k: int, seconds: float) -> float:
    wbytes = int(lib.fl_row_bytes(block_formats.type_id(fmt), k)) * rows
    arena = np.empty(wbytes, dtype=np.uint8)
    fill_arena(arena, fmt, k)
    x = np.random.default_rng(1).standard_normal(k).astype(np.float32)
    y = np.empty(rows, np.float32)
    w, xp, yp = ffi.from_buffer(arena), ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y, require_writable=True)
    tid = block_formats.type_id(fmt)
    for _ in range(20):
        lib.fl_matmul(tid, w, rows, k, xp, 1, yp)
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(10):
            lib.fl_matmul(tid, w, rows, k, xp, 1, yp)
        times.append((time.perf_counter() - t0) / 10)
    return min(times)


def measure(fmt: str, rows: int, k: int, seconds: float) -> dict:
    few = max(1, rows // 8)
    t_many, t_few = call_seconds(fmt, rows, k, seconds), call_seconds(fmt, few, k, seconds)
    row_bytes = int(lib.fl_row_bytes(block_formats.type_id(fmt), k))
    per_row = (t_many - t_few) / (rows - few)
    return {"gbps": row_bytes * rows / t_many / 1e9, "dot_gbps": row_bytes / per_row / 1e9,
            "fixed_us": (t_few - few * per_row) * 1e6}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS, metavar="FMT")
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.3, help="per format and round (best batch of 10 calls)")
    parser.add_argument("--simd", choices=list(fm.SIMD_LEVELS), help="force a SIMD level")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    fm.set_threads(1)
    if args.simd:
        fm.set_simd_level(args.simd)
    runs = {f: [] for f in args.formats}
    for _ in range(args.rounds):
        for fmt in args.formats:
            runs[fmt].append(measure(fmt, args.rows, args.k, args.seconds))
    medians = {f: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for f, rs in runs.items()}
    if args.json:
        print(json.dumps({"simd": fm.simd_level(), "rows": args.rows, "k": args.k, "medians": medians,
                          "runs": runs}))
    else:
        print(f"1 thread, simd {fm.simd_level()}, {args.rows} x {args.k}, median of {args.rounds} rounds")
        print(f"{'format':8s} {'GB/s':>7s} {'dot GB/s':>9s} {'fixed us':>9s}   dot GB/s per round")
        for fmt, m in medians.items():
            print(f"{fmt:8s} {m['gbps']:7.2f} {m['dot_gbps']:9.2f} {m['fixed_us']:9.1f}   "
                  + " ".join(f"{r['dot_gbps']:.1f}" for r in runs[fmt]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
