#!/usr/bin/env python3
"""Benchmark of the Triton device kernels (flashlite.device.triton_kernels) on V4-Flash shapes, on a CUDA device.

Per weight type and shape (tools/bench_matmul.py's SHAPES, rows x k): decode (`gemv`, 1 token) in GB/s of weight
bytes and as a share of the device's read bandwidth (a float32 sum over 2 GiB, the only traffic decode makes),
and prefill (`gemm`, --tokens tokens) in TFLOP/s at each --precision, next to torch's float16 matmul of the
dequantized weights (cuBLAS) on the same shape. Timings are medians of triton.testing.do_bench, which clears the
L2 cache before every run, so weights come from HBM as in a model larger than the cache. Each result is also
checked against torch's float32 product of the dequantized weights (max error / max |y|), so a kernel that is
fast because it is wrong shows. Without a CUDA device (or without torch and triton) it says so and exits 0.

    python tools/bench_gpu_kernels.py [--types Q8_0 Q4_K] [--shapes expert_up wq_b] [--tokens 512] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_matmul import SHAPES  # noqa: E402

from flashlite import block_formats  # noqa: E402

DEVICE_TYPES = ["Q8_0", "MXFP4", "Q6_K", "Q5_K", "Q4_K", "Q2_K", "IQ4_XS", "IQ2_XXS"]
SEED_ROWS = 64  # rows quantized on the CPU (IQ2_XXS's search is slow), tiled to the full shape: speed does not
                # depend on the values


def device_or_exit():
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as exc:
        print(f"no torch/triton ({exc}): pip install 'flashlite[cuda]' on a CUDA machine; nothing to measure")
        sys.exit(0)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (the kernels' CPU checks are tests/test_triton_kernels.py)")
        sys.exit(0)
    return torch


def weights(torch, qtype: str, rows: int, k: int, device: str):
    rng = np.random.default_rng(0)
    seed = block_formats.quantize(rng.standard_normal((SEED_ROWS, k)).astype(np.float32), block_formats.type_id(qtype))
    full = np.tile(seed, (-(-rows // SEED_ROWS), 1))[:rows]
    return torch.from_numpy(np.ascontiguousarray(full).reshape(-1)).to(device)


def read_bandwidth(torch, do_bench) -> float:
    """GB/s of a float32 sum over 2 GiB: what a kernel that only reads can reach."""
    x = torch.ones(2 << 28, dtype=torch.float32, device="cuda")
    ms = do_bench(lambda: x.sum(), return_mode="median")
    return x.numel() * 4 / ms / 1e6


def rel_err(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def bench_one(torch, do_bench, tk, qtype: str, rows: int, k: int, tokens: int, precisions, device: str) -> dict:
    """Decode and prefill timings and errors of one type on one rows x k shape."""
    w = weights(torch, qtype, rows, k, device)
    w_f32 = tk.dequantize_rows(w, qtype, rows, k)
    x1 = torch.randn(k, device=device)
    xp = torch.randn(tokens, k, device=device)
    ms = do_bench(lambda: tk.gemv(w, qtype, rows, k, x1), return_mode="median")
    r = {"type": qtype, "rows": rows, "k": k, "weight_mib": w.numel() / 2**20, "decode_us": ms * 1e3,
         "decode_gbps": w.numel() / ms / 1e6, "decode_err": rel_err(tk.gemv(w, qtype, rows, k, x1), w_f32 @ x1)}
    ref = xp @ w_f32.T
    flop = 2.0 * rows * k * tokens
    for precision in precisions:
        ms = do_bench(lambda: tk.gemm(w, qtype, rows, k, xp, precision), return_mode="median")
        r[f"prefill_{precision}_tflops"] = flop / ms / 1e9
        r[f"prefill_{precision}_err"] = rel_err(tk.gemm(w, qtype, rows, k, xp, precision), ref)
    w_f16, xp_f16 = w_f32.to(torch.float16), xp.to(torch.float16)
    ms = do_bench(lambda: xp_f16 @ w_f16.T, return_mode="median")
    r["torch_fp16_tflops"] = flop / ms / 1e9
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", default=DEVICE_TYPES, choices=DEVICE_TYPES, metavar="TYPE")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), metavar="SHAPE")
    parser.add_argument("--tokens", type=int, default=512, help="prefill tokens (default 512)")
    parser.add_argument("--precision", nargs="+", default=["tf32", "fp16"], choices=["ieee", "tf32", "fp16"])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    torch = device_or_exit()
    from triton.testing import do_bench

    from flashlite.device import triton_kernels as tk

    read_gbps = read_bandwidth(torch, do_bench)
    report = {"device": torch.cuda.get_device_name(), "read_gbps": read_gbps, "tokens": args.tokens, "results": []}
    if not args.json:
        print(f"{report['device']}: read bandwidth {read_gbps:.0f} GB/s; prefill {args.tokens} tokens")
    for qtype in args.types:
        for shape in args.shapes:
            r = bench_one(torch, do_bench, tk, qtype, *SHAPES[shape], args.tokens, args.precision, "cuda")
            r["shape"], r["decode_vs_read"] = shape, r["decode_gbps"] / read_gbps
            report["results"].append(r)
            if not args.json:
                prefill = "  ".join(f"{p} {r[f'prefill_{p}_tflops']:6.1f} TFLOP/s (err {r[f'prefill_{p}_err']:.1e})"
                                    for p in args.precision)
                print(f"{qtype:8s} {shape:12s} {r['weight_mib']:8.1f} MiB  decode {r['decode_us']:8.1f} us "
                      f"{r['decode_gbps']:7.0f} GB/s {100 * r['decode_vs_read']:5.1f}% read (err "
                      f"{r['decode_err']:.1e})  prefill {prefill}  torch fp16 {r['torch_fp16_tflops']:6.1f}",
                      flush=True)
            torch.cuda.empty_cache()
    if args.json:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
