"""Requantize a GGUF with llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize` binding), once per
file type: the files users download are made this way, and the interop tests load them.

Runs with the Python of a virtual environment that has llama-cpp-python (never the project's; see
tools/ggml_oracle.py):

    ~/.venvs/llamacpp/bin/python tools/make_llamacpp_quants.py OUT_DIR [--src IN.gguf] [--ftype Q4_K_M ...]
        [--imatrix FILE] [--threads N]

--src defaults to tests/fixtures/llamacpp/tiny_v4-mxfp4_moe.gguf (llama.cpp's own conversion of the oracle
checkpoint). Each file type is written to OUT_DIR/<stem>-<FTYPE>.gguf through a temporary name, so an interrupted
run leaves no partial file. Without --ftype every file type of llama.cpp's quantizer is made.

Importance matrix: llama.cpp refuses the types whose search needs one (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S,
IQ3_XXS, and Q2_K in a Q2_K_S file) without one. --imatrix FILE passes a llama.cpp imatrix (GGUF, as
`llama-imatrix` and `flashlite imatrix` write it: `<tensor>.in_sum2` / `<tensor>.counts`); without it those file
types get a flat one (every weight 1 for every tensor), and the file name says `-flat`.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SRC = REPO / "tests" / "fixtures" / "llamacpp" / "tiny_v4-mxfp4_moe.gguf"

# llama.cpp's llama_ftype values by the names llama-quantize takes (include/llama.h)
FTYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26,
    "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
    "MXFP4_MOE": 38, "Q1_0": 40, "Q2_0": 41,  # NVFP4 (39) is no output type of its quantizer yet
}
# file types some of whose tensors llama.cpp only quantizes with an importance matrix
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"}


def read_imatrix(path: str) -> dict[str, np.ndarray]:
    """tensor name -> mean squared activations (in_sum2 / counts, per expert for 3-D tensors, flattened)."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        sums = np.array(t.data, np.float32).reshape(-1, int(t.shape[0]))
        counts = np.array(tensors[base + ".counts"].data, np.float32).reshape(-1, 1)
        out[base] = (sums / np.maximum(counts, 1)).reshape(-1).astype(np.float32)
    return out


def flat_imatrix(src: str) -> dict[str, np.ndarray]:
    """Weight 1 for every input column of every matrix (per expert for 3-D tensors)."""
    import gguf

    reader = gguf.GGUFReader(src)
    out = {}
    for t in reader.tensors:
        shape = [int(n) for n in t.shape]
        if len(shape) >= 2 and t.name.endswith(".weight"):
            experts = shape[2] if len(shape) == 3 else 1
            out[t.name] = np.ones(shape[0] * experts, np.float32)
    return out


def quantize(src: str, out: str, ftype: str, imatrix: dict | None, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    params.allow_requantize = True
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            buf = np.ascontiguousarray(values, np.float32)
            keep.append(buf)
            entries[i].name = name.encode()
            entries[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = buf.size
        entries[len(imatrix)].name = None
        params.imatrix = entries
        keep.append(entries)
    tmp = f"{out}.partial"
    try:
        status = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
        if status != 0:
            raise SystemExit(f"llama_model_quantize {ftype}: status {status}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--src", default=str(DEFAULT_SRC))
    p.add_argument("--ftype", action="append", choices=sorted(FTYPES), help="repeat for several (default: all)")
    p.add_argument("--imatrix", help="a llama.cpp imatrix GGUF for the types that need one")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    stem = Path(a.src).name.removesuffix(".gguf")
    given = read_imatrix(a.imatrix) if a.imatrix else None
    for ftype in a.ftype or list(FTYPES):
        imatrix, tag = given, ""
        if ftype in NEEDS_IMATRIX and imatrix is None:
            imatrix, tag = flat_imatrix(a.src), "-flat"
        out = os.path.join(a.out_dir, f"{stem}-{ftype}{tag}.gguf")
        t0 = time.perf_counter()
        quantize(a.src, out, ftype, imatrix, a.threads)
        print(f"{ftype:10s} {os.path.getsize(out):>12,d} bytes  {time.perf_counter() - t0:6.1f} s  {out}",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
