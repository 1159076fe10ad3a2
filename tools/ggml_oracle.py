"""ggml's own block-format code, called through the libggml that llama-cpp-python ships: the oracle for the C core's
formats (dequantization, the quantizers with and without an importance matrix, and the CPU dot products).

Run it with the Python of a virtual environment that has llama-cpp-python (never the project's: CI does not
compile llama.cpp), for example:

    python -m venv ~/.venvs/llamacpp && ~/.venvs/llamacpp/bin/pip install llama-cpp-python==0.3.36 numpy
    ~/.venvs/llamacpp/bin/python tools/ggml_oracle.py quantize Q4_0 x.npy q.npy [--imatrix w.npy] [--unchecked]
    ~/.venvs/llamacpp/bin/python tools/ggml_oracle.py dequantize Q4_0 q.npy y.npy
    ~/.venvs/llamacpp/bin/python tools/ggml_oracle.py dot Q4_0 q.npy x.npy s.npy

Arrays are .npy files: x float32 [rows, n]; q uint8 [rows, row bytes]; the importance matrix float32 [n] (one per
row length, as llama.cpp's quantizer passes it); the dot writes float32 [rows, tokens] = ggml's vec_dot of each
weight row with each activation row after ggml converts the activations to the type's vec_dot_type. quantize checks
ggml's output with ggml_validate_row_data unless --unchecked (for garbage input, whose blocks may hold NaN scales).
Tests reach it through FLASHLITE_LLAMACPP_PYTHON (the interpreter to run it with); see tests/ggml_oracle.py.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import sys

import numpy as np

# ggml type ids by name (ggml.h of the llama.cpp that llama-cpp-python 0.3.36 vendors)
TYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q8_1": 9, "Q2_K": 10, "Q3_K": 11,
    "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q8_K": 15, "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19,
    "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22, "IQ4_XS": 23, "IQ1_M": 29, "BF16": 30, "TQ1_0": 34, "TQ2_0": 35,
    "MXFP4": 39, "NVFP4": 40, "Q1_0": 41, "Q2_0": 42,
}

_to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_from_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_vec_dot_t = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t, ctypes.c_void_p,
                              ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class _Traits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", _to_float_t), ("from_float_ref", _from_float_t)]


class _CpuTraits(ctypes.Structure):
    _fields_ = [("from_float", _from_float_t), ("vec_dot", _vec_dot_t), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


class Ggml:
    """libggml-base and libggml-cpu of the installed llama_cpp package."""

    def __init__(self):
        import llama_cpp

        libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        found = sorted(glob.glob(os.path.join(libdir, "libggml-base.*")))
        if not found:
            raise SystemExit(f"no libggml-base in {libdir}")
        mode = getattr(os, "RTLD_GLOBAL", 0)
        self.base = ctypes.CDLL(found[0], mode=mode)
        self.cpu = ctypes.CDLL(sorted(glob.glob(os.path.join(libdir, "libggml-cpu.*")))[0], mode=mode)
        self.base.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        self.base.ggml_get_type_traits.argtypes = [ctypes.c_int]
        self.base.ggml_row_size.restype = ctypes.c_size_t
        self.base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        self.base.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                  ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.base.ggml_quantize_init.argtypes = [ctypes.c_int]
        self.base.ggml_validate_row_data.restype = ctypes.c_bool
        self.base.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        self.cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_CpuTraits)
        self.cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        self.cpu.ggml_cpu_init()

    def row_size(self, qtype: int, n: int) -> int:
        return int(self.base.ggml_row_size(qtype, n))

    def quantize(self, qtype: int, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """ggml_quantize_chunk over every row of x [rows, n], as llama.cpp's quantizer calls it."""
        x = np.ascontiguousarray(x, np.float32)
        rows, n = x.shape
        out = np.zeros((rows, self.row_size(qtype, n)), np.uint8)
        im = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, np.float32)
            if imatrix.shape != (n,):
                raise SystemExit(f"imatrix: shape {imatrix.shape}, expected ({n},)")
            im = imatrix.ctypes.data
        self.base.ggml_quantize_init(qtype)
        self.base.ggml_quantize_chunk(qtype, x.ctypes.data, out.ctypes.data, 0, rows, n, im)
        return out

    def dequantize(self, qtype: int, q: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(q, np.uint8)
        traits = self.base.ggml_get_type_traits(qtype).contents
        rows = q.shape[0]
        n = q.shape[1] // traits.type_size * traits.blck_size
        out = np.zeros((rows, n), np.float32)
        for r in range(rows):
            traits.to_float(q[r].ctypes.data, out[r].ctypes.data, n)
        return out

    def valid(self, qtype: int, q: np.ndarray) -> bool:
        q = np.ascontiguousarray(q, np.uint8)
        return bool(self.base.ggml_validate_row_data(qtype, q.ctypes.data, q.nbytes))

    def dot(self, qtype: int, q: np.ndarray, x: np.ndarray) -> np.ndarray:
        """s[r, t] = vec_dot(weight row r, activation row t converted to the type's vec_dot_type)."""
        q = np.ascontiguousarray(q, np.uint8)
        x = np.ascontiguousarray(x, np.float32)
        cpu = self.cpu.ggml_get_type_traits_cpu(qtype).contents
        act = cpu.vec_dot_type
        n = x.shape[1]
        xq = np.zeros((x.shape[0], self.row_size(act, n)), np.uint8)
        conv = self.cpu.ggml_get_type_traits_cpu(act).contents.from_float
        for t in range(x.shape[0]):
            if act == TYPES["F32"]:
                xq[t] = x[t].view(np.uint8)
            else:
                conv(x[t].ctypes.data, xq[t].ctypes.data, n)
        out = np.zeros((q.shape[0], x.shape[0]), np.float32)
        s = ctypes.c_float()
        for r in range(q.shape[0]):
            for t in range(x.shape[0]):
                cpu.vec_dot(n, ctypes.byref(s), 0, q[r].ctypes.data, 0, xq[t].ctypes.data, 0, 1)
                out[r, t] = s.value
        return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("type"), q.add_argument("x"), q.add_argument("out"), q.add_argument("--imatrix")
    q.add_argument("--unchecked", action="store_true")
    d = sub.add_parser("dequantize")
    d.add_argument("type"), d.add_argument("q"), d.add_argument("out")
    v = sub.add_parser("dot")
    v.add_argument("type"), v.add_argument("q"), v.add_argument("x"), v.add_argument("out")
    a = p.parse_args(argv)
    qtype = TYPES[a.type.upper()]
    g = Ggml()
    if a.cmd == "quantize":
        out = g.quantize(qtype, np.load(a.x), None if a.imatrix is None else np.load(a.imatrix))
        if not a.unchecked and not g.valid(qtype, out):
            sys.exit(f"ggml_validate_row_data rejects ggml's own {a.type} output")
    elif a.cmd == "dequantize":
        out = g.dequantize(qtype, np.load(a.q))
    else:
        out = g.dot(qtype, np.load(a.q), np.load(a.x))
    np.save(a.out, out)


if __name__ == "__main__":
    main()
