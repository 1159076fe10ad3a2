"""GGUF block formats through the C core: row sizes, dequantization and reference quantization.

Byte-compatible with ggml: `dequantize` matches gguf-py bit for bit, `quantize` runs ggml's *_ref algorithms.
A row of n elements is n / block_elems blocks; every call works on whole blocks.
"""
from __future__ import annotations

import numpy as np

from flashlite._native import check, ffi, lib


def _type_id(qtype) -> int:
    """The ggml type id of `qtype` (a gguf.GGMLQuantizationType or an int), checked against the core's table."""
    if isinstance(qtype, bool) or not isinstance(qtype, (int, np.integer)):
        raise TypeError(f"qtype: expected a gguf.GGMLQuantizationType or int, got {type(qtype).__name__}")
    type_id = int(qtype)
    if lib.fl_type_block_elems(type_id) == 0:
        raise ValueError(f"qtype: type {qtype!r} is not a block format of the core")
    return type_id


def _known(type_id) -> bool:
    return 0 <= int(type_id) < lib.FL_TYPE_COUNT


def type_name(type_id: int) -> str:
    """ggml's name of a type in capitals, as GGUF tools print it ("Q4_K", "IQ2_XXS", "I32"), or "type N" for an
    id the core does not know."""
    name = lib.fl_type_name(int(type_id)) if _known(type_id) else ffi.NULL
    return ffi.string(name).decode().upper() if name != ffi.NULL else f"type {int(type_id)}"


def type_id(name: str) -> int:
    """The ggml type id of a name (any case: "q4_k", "Q4_K"); ValueError for a name the core does not know."""
    wanted = name.strip().upper()
    for tid in range(lib.FL_TYPE_COUNT):
        if lib.fl_type_name(tid) != ffi.NULL and type_name(tid) == wanted:
            return tid
    raise ValueError(f"unknown tensor type {name!r}")


def can_dequantize(type_id: int) -> bool:
    return _known(type_id) and bool(lib.fl_type_flags(int(type_id)) & lib.FL_CAN_DEQUANTIZE)


def can_matmul(type_id: int) -> bool:
    return _known(type_id) and bool(lib.fl_type_flags(int(type_id)) & lib.FL_CAN_MATMUL)


def type_sizes(type_id: int) -> tuple[int, int] | None:
    """(elements, bytes) of one block of the type, or None for an id the core does not know."""
    if not _known(type_id):
        return None
    elems = int(lib.fl_type_block_elems(int(type_id)))
    return (elems, int(lib.fl_type_block_bytes(int(type_id)))) if elems else None


def block_elems(qtype) -> int:
    """Elements per block of `qtype`."""
    return int(lib.fl_type_block_elems(_type_id(qtype)))


def block_bytes(qtype) -> int:
    """Bytes per block of `qtype`."""
    return int(lib.fl_type_block_bytes(_type_id(qtype)))


def row_bytes(qtype, n: int) -> int:
    """Bytes of n elements of `qtype`; n must be a non-negative multiple of the block size."""
    type_id = _type_id(qtype)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    size = int(lib.fl_row_bytes(type_id, int(n)))
    if size < 0:
        raise ValueError(f"n: {n} is not a non-negative multiple of the {type_name(type_id)} "
                         f"block size {lib.fl_type_block_elems(type_id)}")
    return size


def _byte_array(data) -> np.ndarray:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    if not isinstance(data, np.ndarray):
        raise TypeError(f"data: expected a uint8 numpy array or bytes, got {type(data).__name__}")
    if data.dtype != np.uint8:
        raise TypeError(f"data: expected dtype uint8, got {data.dtype}")
    if not data.flags.c_contiguous:
        raise ValueError("data: array must be C-contiguous")
    return data


def find_nonfinite(data, qtype) -> int | None:
    """The index of the first block (element, for the float types) of `qtype` in `data` whose values or scales are
    Inf or NaN, or None: llama.cpp's check of tensor data (ggml_validate_row_data). `data` is bytes or a
    C-contiguous uint8 array of whole blocks."""
    type_id = _type_id(qtype)
    buf = _byte_array(data).reshape(-1)
    bsize = int(lib.fl_type_block_bytes(type_id))
    if buf.size % bsize:
        raise ValueError(f"data: {buf.size} bytes is not a whole number of {type_name(type_id)} blocks of "
                         f"{bsize} bytes")
    n = buf.size // bsize
    found = int(lib.fl_find_nonfinite(type_id, ffi.from_buffer(buf), n)) if n else 0
    if found < 0:
        check(found, f"find_nonfinite {type_name(type_id)}")
    return None if found == n else found


def dequantize(data, qtype, n: int | None = None) -> np.ndarray:
    """Dequantize whole blocks of `qtype` to float32.

    `data` is bytes or a C-contiguous uint8 array. A 1-D buffer gives a 1-D result; an array of shape
    [..., row_bytes] gives [..., elements per row]. `n`, when given, must equal the total element count.
    """
    type_id = _type_id(qtype)
    buf = _byte_array(data)
    bsize = int(lib.fl_type_block_bytes(type_id))
    belems = int(lib.fl_type_block_elems(type_id))
    name = type_name(type_id)
    last = buf.shape[-1] if buf.ndim else 0
    if buf.ndim == 0 or last % bsize:
        raise ValueError(f"data: {last} bytes per row is not a whole number of {name} blocks of {bsize} bytes")
    out_shape = (*buf.shape[:-1], last // bsize * belems)
    total = buf.size // bsize * belems
    if n is not None and n != total:
        raise ValueError(f"n: {n} elements asked, but data holds {total} elements of {name}")
    out = np.empty(out_shape, dtype=np.float32)
    if total:
        check(lib.fl_dequantize(type_id, ffi.from_buffer(buf), ffi.from_buffer("float[]", out), total),
              f"dequantize {name}")
    return out


def quantize(x: np.ndarray, qtype, importance: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 `x` of shape [..., n] to `qtype` blocks: uint8 of shape [..., row_bytes(qtype, n)].

    Without `importance`, what llama.cpp writes without an importance matrix (ggml_quantize_chunk): ggml's
    reference quantizer, bit-exact with gguf-py where gguf-py has one and with ggml's quantize_row_*_ref elsewhere;
    IQ4_NL's full search rather than its reference; the IQ types ggml only quantizes with an importance matrix
    (IQ2_XXS, IQ2_XS, IQ1_S) weigh every element alike. With `importance` (float32 [n], a tensor's row of an
    importance matrix) each type's search weighs its error by it, as llama.cpp's quantizer does; types without a
    search ignore it, as ggml does.
    """
    type_id = _type_id(qtype)
    name = type_name(type_id)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a float32 numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"x: expected dtype float32, got {x.dtype} (convert with x.astype(np.float32))")
    if not x.flags.c_contiguous:
        raise ValueError("x: array must be C-contiguous")
    if x.ndim == 0:
        raise ValueError("x: expected at least one dimension")
    belems = int(lib.fl_type_block_elems(type_id))
    if x.shape[-1] % belems:
        raise ValueError(f"x: last dimension {x.shape[-1]} is not a multiple of the {name} block size {belems}")
    weights = ffi.NULL
    if importance is not None:
        if not isinstance(importance, np.ndarray) or importance.dtype != np.float32:
            raise TypeError("importance: expected a float32 numpy array")
        if importance.shape != (x.shape[-1],):
            raise ValueError(f"importance: shape {importance.shape}, expected ({x.shape[-1]},), one weight per "
                             f"element of a row")
        if not np.all(np.isfinite(importance)) or np.any(importance < 0):
            raise ValueError("importance: weights must be finite and non-negative")
        importance = np.ascontiguousarray(importance)
        weights = ffi.from_buffer("float[]", importance)
    out = np.empty((*x.shape[:-1], row_bytes(type_id, x.shape[-1])), dtype=np.uint8)
    if x.size:
        n = x.shape[-1]
        check(lib.fl_quantize_rows(type_id, ffi.from_buffer("float[]", x), ffi.from_buffer(out), x.size // n, n,
                                   weights), f"quantize {name}")
    return out


__all__ = ["block_elems", "block_bytes", "row_bytes", "dequantize", "quantize", "type_name", "type_id", "type_sizes", "can_dequantize",
           "can_matmul"]
