#!/usr/bin/env python3
"""What a product of n tokens costs against one token's, per weight format and shape: the price of verifying n - 1
drafted tokens in one batch (docs/speculative.md).

    python tools/bench_batch_cost.py [--formats Q8_0 MXFP4 Q4_K Q6_K] [--shapes square expert_up small_dim]
        [--n 1 2 3 4 8] [--threads 1] [--rounds 9] [--json]

The sizes take turns within each round (1, 2, 3, ... then again), so that a load coming and going on a shared
machine falls on all of them alike; a size's cost is the median over rounds of its time over the same round's
one-token time, each time the fastest of a few calls. Full-width shapes rotate over copies of the weights spread over more than the last-level cache, so
that each call reads its weights from memory as a V4-Flash layer does; the small model's shapes (dim 256) stay in
cache, as its whole 6.5 MB does.
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
from flashlite import block_formats  # noqa: E402
from flashlite import matmul as fm  # noqa: E402
from flashlite._native import ffi, lib  # noqa: E402

# rows x k, and whether the weights come from memory (V4-Flash widths) or stay in cache (small_v4)
SHAPES = {
    "square": (4096, 4096, True),       # wo_b-like, 4096 x 4096 (issue 14's figure)
    "expert_up": (2048, 4096, True),
    "small_dim": (256, 256, False),     # small_v4's projections of dim 256
    "small_head": (4096, 256, False),   # small_v4's head (vocab 4096)
}
FORMATS = [f for f in ["Q8_0", "MXFP4", "Q4_K", "Q6_K", "Q5_K", "Q2_K", "Q3_K", "IQ4_XS", "BF16", "F16"]
           if block_formats.can_matmul(block_formats.type_id(f))]


def weights(fmt: str, rows: int, k: int, copies: int) -> list:
    """`copies` copies of one quantized Gaussian matrix, each in its own buffer."""
    w = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32) * np.float32(0.02)
    q = np.ascontiguousarray(block_formats.quantize(w, block_formats.type_id(fmt))).reshape(-1).view(np.uint8)
    return [q.copy() for _ in range(copies)]


def measure(fmt: str, shape: str, sizes: list[int], rounds: int, arena_mib: int) -> dict:
    rows, k, from_memory = SHAPES[shape]
    type_id = block_formats.type_id(fmt)
    row_bytes = int(lib.fl_row_bytes(type_id, k)) * rows
    copies = max(1, (arena_mib << 20) // row_bytes) if from_memory else 1
    bufs = weights(fmt, rows, k, copies)
    slots = [ffi.from_buffer(b) for b in bufs]
    x = np.random.default_rng(2).standard_normal((max(sizes), k)).astype(np.float32)
    y = np.empty((max(sizes), rows), np.float32)
    xp, yp = ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y, require_writable=True)
    turn = [0]
    calls = max(3, int(2e-3 * 20e9 / row_bytes)) if not from_memory else 5  # about 2 ms of work per sample

    def run(n: int) -> float:
        """the fastest of `calls` calls: another process's time slice lengthens some calls, never shortens one"""
        best = float("inf")
        for _ in range(calls):
            turn[0] = (turn[0] + 1) % len(slots)
            t0 = time.perf_counter()
            status = lib.fl_matmul(type_id, slots[turn[0]], rows, k, xp, n, yp)
            best = min(best, time.perf_counter() - t0)
            assert status == 0, status
        return best

    for n in sizes:  # warm up
        run(n)
    ratios: dict[int, list[float]] = {n: [] for n in sizes}
    one_token = []
    for _ in range(rounds):
        times = {n: run(n) for n in sizes}
        base = times[1] if 1 in times else times[min(sizes)]
        one_token.append(base)
        for n in sizes:
            ratios[n].append(times[n] / base)
    return {"one_token_us": 1e6 * statistics.median(one_token),
            "cost": {n: statistics.median(r) for n, r in ratios.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS, metavar="FMT")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--n", nargs="+", type=int, default=[1, 2, 3, 4, 8], help="token counts (1 is the base)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--arena-mib", type=int, default=768, help="full-width shapes rotate over this much")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sizes = sorted(set([1] + args.n))
    if min(sizes) < 1:
        parser.error("--n: token counts start at 1")
    fm.set_threads(args.threads)
    report = {}
    if not args.json:
        print(f"threads {fm.threads()}, simd {fm.simd_level()}; cost of n tokens / one token (median of "
              f"{args.rounds} alternated rounds)")
        print(f"{'format':8s} {'shape':11s} {'1 tok us':>9s} " + " ".join(f"{'n=' + str(n):>6s}" for n in sizes))
    for fmt in args.formats:
        for shape in args.shapes:
            r = measure(fmt, shape, sizes, args.rounds, args.arena_mib)
            report.setdefault(fmt, {})[shape] = r
            if not args.json:
                print(f"{fmt:8s} {shape:11s} {r['one_token_us']:9.1f} "
                      + " ".join(f"{r['cost'][n]:6.2f}" for n in sizes), flush=True)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
