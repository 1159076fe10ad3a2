#!/usr/bin/env python3
"""Matmul benchmark of the C core on V4-Flash shapes, next to memory bandwidth and numpy float32.

Per weight format and shape: decode GB/s (one token; weight bytes streamed per second) and prefill GFLOP/s
(512 tokens by default). Decode rotates through copies of the weights spread over an arena larger than the
last-level cache, so each call streams from memory as a 284B-parameter model does. The same run measures
memory bandwidth with a STREAM-like probe (copy and add, numpy, one thread per core; "% mem bw" is decode
against the best of them) plus a read-only pass ("% read": decode only reads, so the copy's write stream is
bandwidth it cannot use), and numpy float32 matmul GFLOP/s on the same shapes. --no-prefill skips the
prefill and numpy columns; --json prints one JSON object instead of the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flashlite import block_formats  # noqa: E402
from flashlite import matmul as fm  # noqa: E402
from flashlite._native import ffi, lib  # noqa: E402

# V4-Flash weights as rows x k (output x input)
SHAPES = {
    "expert_up": (2048, 4096),
    "expert_down": (4096, 2048),
    "wo_b": (4096, 8192),
    "wq_b": (32768, 1024),
    "head": (129280, 4096),
}
# the weight types published V4 files put on the experts and the attention (issue: decode at the memory roof),
# then the rest of what the core multiplies
FORMATS = ["Q8_0", "MXFP4", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q5_0", "Q4_0", "IQ4_XS", "IQ3_S", "IQ3_XXS",
           "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "Q5_1", "Q4_1", "IQ4_NL", "TQ2_0", "TQ1_0", "NVFP4",
           "Q2_0", "Q1_0", "BF16", "F16", "F32"]
FORMATS = [f for f in FORMATS if block_formats.can_matmul(block_formats.type_id(f))]  # as far as the core has them
TARGET_DECODE = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S",
                 "IQ1_M", "IQ4_XS", "Q4_0", "Q5_0", "Q8_0", "MXFP4"}


def llc_bytes() -> int:
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        best = max(best, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return best


def median_time(fn, min_runs: int, min_seconds: float) -> float:
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def stream_probe(n_threads: int, nbytes: int) -> dict:
    """STREAM copy (a = b) and add (a = b + c), bytes counted as STREAM does (reads plus writes), in GB/s,
    best of 5; and a read-only pass (sum of b), the traffic decode makes, which no write stream helps."""
    n = nbytes // 8
    a, b, c = np.zeros(n), np.ones(n), np.full(n, 2.0)
    bounds = np.linspace(0, n, n_threads + 1).astype(int)
    slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def run(kernel):
        with ThreadPoolExecutor(n_threads) as pool:
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                list(pool.map(kernel, slices))
                best = min(best, time.perf_counter() - t0)
        return best

    copy_s = run(lambda s: np.copyto(a[s], b[s]))
    add_s = run(lambda s: np.add(b[s], c[s], out=a[s]))
    read_s = run(lambda s: b[s].sum())
    return {"copy_gbps": 2 * 8 * n / copy_s / 1e9, "add_gbps": 3 * 8 * n / add_s / 1e9,
            "read_gbps": 8 * n / read_s / 1e9}


def fill_arena(arena: np.ndarray, fmt: str, k: int) -> None:
    """Make the arena valid weights of `fmt` with rows of k: real quantized Gaussian rows (a pool of 64, tiled),
    so that every scale is sane and the kernels see the values they see in a model."""
    qtype = block_formats.type_id(fmt)
    rows = np.random.default_rng(1).standard_normal((64, k)).astype(np.float32) * np.float32(0.02)
    pool = np.ascontiguousarray(block_formats.quantize(rows, qtype)).reshape(-1)
    n = min(pool.size, arena.size)
    arena[:n] = pool[:n]
    while n < arena.size:  # double the filled part in place
        m = min(n, arena.size - n)
        arena[n:n + m] = arena[:m]
        n += m


def bench(args) -> dict:
    fm.set_threads(args.threads)
    threads = fm.threads()
    if args.simd:
        fm.set_simd_level(args.simd)
    llc = llc_bytes()
    shapes = {name: SHAPES[name] for name in args.shapes}
    row_bytes = {(f, s): int(lib.fl_row_bytes(block_formats.type_id(f), SHAPES[s][1])) * SHAPES[s][0]
                 for f in args.formats for s in shapes}
    largest = max(row_bytes.values())
    arena_bytes = max(args.arena_mib << 20, largest + (args.arena_mib << 20) // 2)
    rng = np.random.default_rng(0)
    arena = rng.integers(0, 256, arena_bytes, dtype=np.uint8)
    stream = stream_probe(threads, args.stream_mib << 20)
    results = {}
    for fmt in args.formats:
        results[fmt] = {}
        type_id = block_formats.type_id(fmt)
        for shape_name, (rows, k) in shapes.items():
            fill_arena(arena, fmt, k)
            wbytes = row_bytes[(fmt, shape_name)]
            x = rng.standard_normal((args.tokens, k)).astype(np.float32)
            y1 = np.empty(rows, np.float32)
            yp = np.empty((args.tokens, rows), np.float32)
            # rotate the weight slice: each call streams bytes the previous calls did not leave in cache
            n_slots = max(1, arena_bytes // wbytes)
            slots = [ffi.from_buffer(arena[i * wbytes:(i + 1) * wbytes]) for i in range(n_slots)]
            x1 = ffi.from_buffer("float[]", x[0])
            y1p = ffi.from_buffer("float[]", y1, require_writable=True)
            turn = [0]

            def decode():
                turn[0] = (turn[0] + 1) % n_slots
                lib.fl_matmul(type_id, slots[turn[0]], rows, k, x1, 1, y1p)

            decode()
            t_dec = median_time(decode, 5, args.seconds)
            xp, ypp = ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", yp, require_writable=True)

            def prefill():
                status = lib.fl_matmul(type_id, slots[0], rows, k, xp, args.tokens, ypp)
                assert status == 0, status

            t_pre = median_time(prefill, 1 if rows * k > 1 << 26 else 3, 0.0) if args.prefill else None
            results[fmt][shape_name] = {
                "decode_gbps": wbytes / t_dec / 1e9,
                "prefill_gflops": 2.0 * rows * k * args.tokens / t_pre / 1e9 if t_pre else None,
                "weight_bytes": wbytes,
                "exceeds_llc": wbytes > llc if llc else None,
                "decode_rotated_over_bytes": n_slots * wbytes,
            }
            if not args.json:
                r = results[fmt][shape_name]
                prefill_text = f"prefill {r['prefill_gflops']:7.1f} GFLOP/s" if t_pre else ""
                print(f"  {fmt:8s} {shape_name:12s} decode {r['decode_gbps']:7.2f} GB/s {prefill_text}",
                      file=sys.stderr, flush=True)
    del arena, slots
    numpy_gflops = {}
    for shape_name, (rows, k) in (shapes.items() if args.prefill else ()):
        w = rng.standard_normal((rows, k), dtype=np.float32)
        x = rng.standard_normal((args.tokens, k), dtype=np.float32)
        t = median_time(lambda: x @ w.T, 1 if rows * k > 1 << 26 else 3, 0.0)
        numpy_gflops[shape_name] = 2.0 * rows * k * args.tokens / t / 1e9
        del w
    # the best rate the probe reached: with few cores, the cores rather than the DIMMs set it
    mem_bw = max(stream["copy_gbps"], stream["add_gbps"])
    for fmt, per_shape in results.items():
        for shape_name, r in per_shape.items():
            r["decode_vs_mem_bw"] = r["decode_gbps"] / mem_bw
            r["decode_vs_read_bw"] = r["decode_gbps"] / stream["read_gbps"]
            r["prefill_vs_numpy"] = r["prefill_gflops"] / numpy_gflops[shape_name] if args.prefill else None
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                    "simd": fm.simd_level(), "vnni": fm.has_vnni(), "llc_bytes": llc,
                    "cpus": os.cpu_count()},
        "tokens": args.tokens,
        "mem_bw_gbps": mem_bw,
        "stream": stream,
        "numpy_f32_gflops": numpy_gflops,
        "results": results,
    }


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"threads {m['threads']}, simd {m['simd']} (vnni {m['vnni']}), LLC {m['llc_bytes'] >> 20} MiB, "
          f"STREAM copy {report['stream']['copy_gbps']:.1f} GB/s, add {report['stream']['add_gbps']:.1f} GB/s "
          f"(mem_bw_gbps = the best of them), read-only {report['stream']['read_gbps']:.1f} GB/s")
    if report["numpy_f32_gflops"]:
        print("numpy f32 GFLOP/s (" + str(report["tokens"]) + " tokens): "
              + ", ".join(f"{s} {v:.1f}" for s, v in report["numpy_f32_gflops"].items()))
    print(f"{'format':8s} {'shape':12s} {'MiB':>8s} {'>LLC':>5s} {'decode GB/s':>12s} {'% mem bw':>9s} "
          f"{'% read':>7s} {'prefill GFLOP/s':>16s} {'% numpy':>8s}")
    for fmt, per_shape in report["results"].items():
        for shape_name, r in per_shape.items():
            prefill = (f"{r['prefill_gflops']:16.1f} {100 * r['prefill_vs_numpy']:7.0f}%"
                       if r["prefill_gflops"] else f"{'-':>16s} {'-':>8s}")
            print(f"{fmt:8s} {shape_name:12s} {r['weight_bytes'] / 2**20:8.1f} {'yes' if r['exceeds_llc'] else 'no':>5s} "
                  f"{r['decode_gbps']:12.2f} {100 * r['decode_vs_mem_bw']:8.0f}% {100 * r['decode_vs_read_bw']:6.0f}% "
                  f"{prefill}")


def print_roof(report: dict) -> None:
    """The decode target: each roof-target format's worst shape against the read-only probe (>= 85%)."""
    worst = {fmt: min(r["decode_vs_read_bw"] for r in per_shape.values())
             for fmt, per_shape in report["results"].items() if fmt in TARGET_DECODE}
    if worst:
        print("decode, worst shape / read-only probe (target >= 85%): "
              + ", ".join(f"{fmt} {100 * w:.0f}%{'' if w >= 0.85 else ' (below)'}" for fmt, w in worst.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS, metavar="FMT",
                        help=f"weight types (default: all the core multiplies; those of the roof target: "
                             f"{' '.join(sorted(TARGET_DECODE))})")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), metavar="SHAPE")
    parser.add_argument("--tokens", type=int, default=512, help="prefill tokens (default 512)")
    parser.add_argument("--threads", type=int, default=0, help="core threads (default: one per CPU)")
    parser.add_argument("--simd", choices=list(fm.SIMD_LEVELS), help="force a SIMD level")
    parser.add_argument("--seconds", type=float, default=0.5, help="minimum time per decode measurement")
    parser.add_argument("--arena-mib", type=int, default=1024, help="decode rotates over at least this much")
    parser.add_argument("--stream-mib", type=int, default=512, help="bytes per STREAM array")
    parser.add_argument("--no-prefill", dest="prefill", action="store_false", help="measure decode only")
    args = parser.parse_args(argv)
    if args.tokens < 2:
        parser.error("--tokens: prefill needs at least 2 tokens")
    report = bench(args)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report)
        print_roof(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
