"""ggml itself as the oracle of the block formats, where a llama-cpp-python environment is at hand.

Set FLASHLITE_LLAMACPP_PYTHON to the interpreter of a virtual environment with llama-cpp-python installed
(tools/ggml_oracle.py says how); without it the tests that need ggml skip. CI never has it: what it checks there
is pinned by the hashes the tests commit.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "ggml_oracle.py"
PYTHON = os.environ.get("FLASHLITE_LLAMACPP_PYTHON")

needs_ggml = pytest.mark.skipif(not PYTHON, reason="FLASHLITE_LLAMACPP_PYTHON (a llama-cpp-python venv) is not set")


def _run(*args: str) -> None:
    result = subprocess.run([PYTHON, str(TOOL), *args], capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise RuntimeError(f"ggml_oracle {' '.join(args[:2])}: {result.stderr[-2000:]}")


def quantize(qtype: str, x: np.ndarray, imatrix: np.ndarray | None = None, checked: bool = True) -> np.ndarray:
    """ggml_quantize_chunk of each row of x [rows, n] (with the importance matrix [n] where given); checked: fail
    where ggml_validate_row_data rejects the blocks (off for garbage input, whose scales may be NaN)."""
    with tempfile.TemporaryDirectory() as d:
        np.save(f"{d}/x.npy", np.ascontiguousarray(x, np.float32))
        extra = [] if checked else ["--unchecked"]
        if imatrix is not None:
            np.save(f"{d}/w.npy", np.ascontiguousarray(imatrix, np.float32))
            extra += ["--imatrix", f"{d}/w.npy"]
        _run("quantize", qtype, f"{d}/x.npy", f"{d}/q.npy", *extra)
        return np.load(f"{d}/q.npy")


def dequantize(qtype: str, q: np.ndarray) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        np.save(f"{d}/q.npy", np.ascontiguousarray(q, np.uint8))
        _run("dequantize", qtype, f"{d}/q.npy", f"{d}/y.npy")
        return np.load(f"{d}/y.npy")


def dot(qtype: str, q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """ggml's CPU vec_dot: [rows of q, rows of x]."""
    with tempfile.TemporaryDirectory() as d:
        np.save(f"{d}/q.npy", np.ascontiguousarray(q, np.uint8))
        np.save(f"{d}/x.npy", np.ascontiguousarray(x, np.float32))
        _run("dot", qtype, f"{d}/q.npy", f"{d}/x.npy", f"{d}/s.npy")
        return np.load(f"{d}/s.npy")
