#!/usr/bin/env python3
"""Compile the Triton device kernels for a CUDA architecture without a GPU, with the configurations the wrappers
launch (flashlite.device.triton_kernels: gemv_config, GEMM_CONFIG, grouped_gemm's 16-row tiles, DEQUANTIZE_CONFIG),
and print each kernel's registers and spills as ptxas reports them.

Triton's interpreter (the tests' CPU path) accepts some code the compiler rejects, and says nothing of register
pressure; this closes both gaps on a machine without a GPU: triton's wheel carries ptxas. Exit status 1 when a
kernel does not compile.

    python tools/compile_gpu_kernels.py [--arch 90] [--types Q8_0 Q4_K] [--quick]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # must be gone before triton is imported: compile, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def ptxas_counts(triton, ptx: str, arch: int) -> str:
    """'R registers, S bytes spilled' from the newest ptxas in triton's wheel, or '' when it has none."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next((p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists()), None)
    if ptxas is None:
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-v", f"-arch=sm_{arch}a", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True).stderr
    regs, spills = re.search(r"Used (\d+) registers", out), re.search(r"(\d+) bytes spill stores", out)
    return f"{regs.group(1)} registers, {spills.group(1)} bytes spilled" if regs and spills else out.strip()[-200:]


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flashlite.device import triton_kernels as tk

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--types", nargs="+", default=list(tk.TYPES), choices=list(tk.TYPES), metavar="TYPE")
    parser.add_argument("--quick", action="store_true", help="one token count and one precision per kernel")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    sizes = {"n_tok": "i32", "rows": "i32", "k": "i32", "row_bytes": "i32", "stride_x": "i32", "stride_y": "i32"}
    failed = 0
    for name in args.types:
        type_id = tk.TYPES[name]
        table = "*i8" if name in ("MXFP4", "IQ4_XS") else "*u8"  # the dtype of the wrappers' lookup table
        operands = {"w_ptr": "*u8", "table_ptr": table, "x_ptr": "*fp32", "y_ptr": "*fp32", **sizes}
        kernels = []
        for tokens in (1,) if args.quick else (1, 2, 4, 8):
            config = tk.gemv_config(tokens)
            consts = {"QTYPE": type_id, "TOKENS": tokens, **{k: v for k, v in config.items() if k != "num_warps"}}
            kernels.append((f"gemv {tokens} tok", tk._gemv_kernel, operands, consts, config["num_warps"]))
        for precision in ("tf32",) if args.quick else tk.PRECISIONS:
            consts = {"QTYPE": type_id, "PRECISION": precision,
                      **{k: v for k, v in tk.GEMM_CONFIG.items() if k != "num_warps"}}
            kernels.append((f"gemm {precision}", tk._gemm_kernel, operands, consts, tk.GEMM_CONFIG["num_warps"]))
        grouped = {"w_ptr": "*u8", "table_ptr": table, "x_ptr": "*fp32", "y_ptr": "*fp32", "tile_expert_ptr": "*i32",
                   "tile_lo_ptr": "*i32", "tile_hi_ptr": "*i32", "rows": "i32", "k": "i32", "row_bytes": "i32",
                   "expert_bytes": "i32", "stride_x": "i32", "stride_y": "i32"}
        for block_m in (16, tk.GEMM_CONFIG["BLOCK_M"]):
            consts = {"QTYPE": type_id, "PRECISION": "tf32",
                      **{k: v for k, v in tk.GEMM_CONFIG.items() if k != "num_warps"}, "BLOCK_M": block_m}
            kernels.append((f"grouped {block_m} rows", tk._grouped_gemm_kernel, grouped, consts,
                            tk.GEMM_CONFIG["num_warps"]))
        for gather in (True,) if args.quick else (False, True):
            consts = {"QTYPE": type_id, "GATHER": gather,
                      **{k: v for k, v in tk.DEQUANTIZE_CONFIG.items() if k != "num_warps"}}
            signature = {"w_ptr": "*u8", "table_ptr": table, "ids_ptr": "*i64" if gather else "*u8",
                         "out_ptr": "*fp32", "n_out": "i32", "k": "i32", "row_bytes": "i32"}
            kernels.append((f"dequantize{' gather' if gather else ''}", tk._dequantize_rows_kernel, signature,
                            consts, tk.DEQUANTIZE_CONFIG["num_warps"]))
        for label, fn, signature, consts, warps in kernels:
            try:
                compiled = triton.compile(ASTSource(fn, {**signature, **{c: "constexpr" for c in consts}}, consts),
                                          target=target, options={"num_warps": warps})
            except Exception as exc:  # report every kernel that fails, not only the first
                print(f"{name:8s} {label:18s} FAILED: {exc}", flush=True)
                failed += 1
                continue
            print(f"{name:8s} {label:18s} sm_{args.arch}: {ptxas_counts(triton, compiled.asm['ptx'], args.arch)}",
                  flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
