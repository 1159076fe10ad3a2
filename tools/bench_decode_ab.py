#!/usr/bin/env python3
"""Decode GB/s (or prefill GFLOP/s) of two or more builds of the C core, interleaved in one process.

On a shared machine, separate benchmark runs of two builds meet different loads (a run beside another job's
compile reads half the bandwidth of a quiet one), so their difference is mostly noise. Here each build's
extension (a flashlite/_core*.so, e.g. a copy saved before a change) is loaded side by side with ctypes, and
the builds take turns on the same weights in batches of calls, so any load falls on all of them alike. Each
call streams a different slice of a >= 1 GiB arena, as tools/bench_matmul.py's decode does; the figure is
the median batch. With --tokens N (2 or more) the calls are prefills of N tokens instead, in GFLOP/s.

    python tools/bench_decode_ab.py before=/tmp/old/_core.abi3.so after=flashlite/_core.abi3.so \\
        --formats Q8_0 Q4_K MXFP4
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flashlite._native import lib  # noqa: E402
from flashlite import block_formats  # noqa: E402
from tools.bench_matmul import FORMATS, SHAPES, fill_arena  # noqa: E402


def load_build(path: str, threads: int):
    core = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    core.fl_matmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_int64, ctypes.c_void_p]
    core.fl_matmul.restype = ctypes.c_int
    if core.fl_threads_set(threads) != 0:
        raise SystemExit(f"{path}: fl_threads_set({threads}) failed")
    return core


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+", metavar="NAME=SO", help="a name and the path of a built extension")
    parser.add_argument("--formats", nargs="+", default=["Q8_0", "Q4_K", "MXFP4"], choices=FORMATS)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--turns", type=int, default=15, help="batches per build and shape")
    parser.add_argument("--arena-mib", type=int, default=1100)
    parser.add_argument("--tokens", type=int, default=1, help="1: decode (default); more: prefill")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error("--tokens: 1 for decode, or more for prefill")
    builds = {}
    for spec in args.builds:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"build {spec!r}: want NAME=PATH to an existing .so")
        builds[name] = load_build(path, args.threads)
    arena_bytes = args.arena_mib << 20
    arena = np.random.default_rng(0).integers(0, 256, arena_bytes, dtype=np.uint8)
    results = {}
    for fmt in args.formats:
        type_id = block_formats.type_id(fmt)
        for shape in args.shapes:
            rows, k = SHAPES[shape]
            fill_arena(arena, fmt, k)
            wbytes = int(lib.fl_row_bytes(type_id, k)) * rows
            n_slots = max(1, arena_bytes // wbytes)
            x = np.random.default_rng(1).standard_normal((args.tokens, k)).astype(np.float32)
            y = np.empty((args.tokens, rows), np.float32)
            flops = 2.0 * rows * k * args.tokens
            # batches of about 20 ms
            calls = 1 if args.tokens > 1 else max(2, min(20, int(0.02 / (wbytes / 20e9))))
            times = {name: [] for name in builds}
            slot = 0
            for _ in range(args.turns):
                for name, core in builds.items():
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        slot = (slot + 1) % n_slots
                        core.fl_matmul(type_id, arena.ctypes.data + slot * wbytes, rows, k, x.ctypes.data,
                                       args.tokens, y.ctypes.data)
                    times[name].append((time.perf_counter() - t0) / calls)
            work = wbytes if args.tokens == 1 else flops
            results.setdefault(fmt, {})[shape] = {name: work / statistics.median(t) / 1e9
                                                  for name, t in times.items()}
            if not args.json:
                print(f"{fmt:8s} {shape:12s} " + "  ".join(f"{name} {gbps:6.2f}" for name, gbps
                                                          in results[fmt][shape].items()), flush=True)
    if args.json:
        unit = "decode_gbps" if args.tokens == 1 else "prefill_gflops"
        print(json.dumps({"threads": args.threads, "tokens": args.tokens, unit: results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
