"""Matrix products of quantized weights with float32 activations, through the C core's SIMD kernels.

`matmul(w, wtype, rows, k, x)` computes x @ W.T for W stored as `rows` rows of `k` elements of `wtype`
(GGUF layout): the activations quantized to the format's partner type (Q8_0, Q8_1 or Q8_K; float formats keep
f32) and one SIMD dot per row and token, for one token (x of shape [k]) or many, so each token's row of the result
is bitwise what it gets alone. `matmul_batch` computes several products in one parallel run of the
core (bitwise what separate calls give), quantizing an activation that several share once. The SIMD level and the
thread count of the core can be set here.
"""
from __future__ import annotations

import numpy as np

from flashlite import block_formats
from flashlite._native import check, ffi, lib

SIMD_LEVELS = {"scalar": 0, "avx2": 1, "avx512": 2, "neon": 3}
_LEVEL_NAMES = {v: k for k, v in SIMD_LEVELS.items()}


def _type_id(wtype) -> int:
    """A ggml type id from an int, a gguf.GGMLQuantizationType or its name ("Q4_K", case-insensitive)."""
    if isinstance(wtype, str):
        try:
            type_id = block_formats.type_id(wtype)
        except ValueError:
            raise ValueError(f"wtype: unknown type name {wtype!r}") from None
    elif isinstance(wtype, (int, np.integer)) and not isinstance(wtype, bool):
        type_id = int(wtype)
    else:
        raise TypeError(f"wtype: expected a type id, name or gguf.GGMLQuantizationType, got {type(wtype).__name__}")
    if not block_formats.can_matmul(type_id):
        raise ValueError(f"wtype: {wtype!r} is not a weight format of the core")
    return type_id


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: must be positive, got {value}")
    return int(value)


def _weight_buffer(w):
    if isinstance(w, np.ndarray):
        if not w.flags.c_contiguous:
            raise ValueError("w: array must be C-contiguous")
        return w, w.nbytes
    try:
        view = memoryview(w)
    except TypeError:
        raise TypeError(f"w: expected a numpy array or a bytes-like object, got {type(w).__name__}") from None
    if not view.c_contiguous:
        raise ValueError("w: buffer must be C-contiguous")
    return w, view.nbytes


def _checked_weight(w, wtype, rows, k, name: str = "w"):
    """(type id, rows, k, weight buffer) after checking that `w` holds rows x k elements of wtype."""
    type_id = _type_id(wtype)
    rows = _positive_int(rows, "rows")
    k = _positive_int(k, "k")
    row_bytes = int(lib.fl_row_bytes(type_id, k))
    if row_bytes < 0:
        raise ValueError(f"k: {k} is not a multiple of the block size {lib.fl_type_block_elems(type_id)} of wtype")
    buf, nbytes = _weight_buffer(w)
    if nbytes != rows * row_bytes:
        raise ValueError(f"{name}: expected {rows} rows x {row_bytes} bytes = {rows * row_bytes} bytes, got {nbytes}")
    return type_id, rows, k, buf


def _checked_activations(x, k: int, name: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a float array, got dtype {x.dtype}")
    if x.ndim not in (1, 2) or x.shape[-1] != k:
        raise ValueError(f"{name}: expected shape ({k},) or (n_tok, {k}), got {x.shape}")
    return x


def matmul(w, wtype, rows: int, k: int, x) -> np.ndarray:
    """y = x @ W.T with W = `rows` x `k` elements of `wtype` in `w` (bytes or a C-contiguous array).

    x is float32-convertible of shape [k] (one token, result [rows]) or [n_tok, k] (result [n_tok, rows]).
    """
    type_id, rows, k, buf = _checked_weight(w, wtype, rows, k)
    x = _checked_activations(x, k)
    xs = np.ascontiguousarray(x, dtype=np.float32)
    n_tok = 1 if x.ndim == 1 else xs.shape[0]
    y = np.empty((n_tok, rows), dtype=np.float32)
    status = lib.fl_matmul(type_id, ffi.from_buffer(buf), rows, k, ffi.from_buffer("float[]", xs), n_tok,
                           ffi.from_buffer("float[]", y, require_writable=True))
    check(status, f"fl_matmul(wtype={type_id}, rows={rows}, k={k}, n_tok={n_tok})")
    return y[0] if x.ndim == 1 else y


def matmul_batch(products) -> list[np.ndarray]:
    """[matmul(w, wtype, rows, k, x) for (w, wtype, rows, k, x) in products], computed in one parallel run of the
    core: small decode products then stream like one large one, and an activation that several products share
    (the same array object) is quantized once. The results are bitwise those of separate matmul calls."""
    products = list(products)
    items = ffi.new("struct fl_matmul_item[]", max(len(products), 1))
    keep, results, prepared = [], [], {}
    for i, product in enumerate(products):
        if len(product) != 5:
            raise ValueError(f"products[{i}]: expected (w, wtype, rows, k, x), got {len(product)} fields")
        w, wtype, rows, k, x = product
        type_id, rows, k, buf = _checked_weight(w, wtype, rows, k, f"products[{i}].w")
        x = _checked_activations(x, k, f"products[{i}].x")
        if id(x) not in prepared:  # one f32 copy per shared activation, so the core sees one pointer
            xs = np.ascontiguousarray(x, dtype=np.float32)
            prepared[id(x)] = (x, xs, ffi.from_buffer("float[]", xs))
        xs, x_ptr = prepared[id(x)][1:]
        n_tok = 1 if x.ndim == 1 else xs.shape[0]
        y = np.empty((n_tok, rows), dtype=np.float32)
        w_ptr, y_ptr = ffi.from_buffer(buf), ffi.from_buffer("float[]", y, require_writable=True)
        keep += [w_ptr, y_ptr]
        items[i] = {"wtype": type_id, "w": w_ptr, "rows": rows, "k": k, "x": x_ptr, "n_tok": n_tok, "y": y_ptr}
        results.append(y[0] if x.ndim == 1 else y)
    check(lib.fl_matmul_batch(len(products), items), f"fl_matmul_batch({len(products)} products)")
    return results


def simd_level() -> str:
    """The SIMD level the kernels use now: scalar, avx2, avx512 or neon."""
    return _LEVEL_NAMES[lib.fl_simd_level()]


def simd_best() -> str:
    """The best SIMD level this CPU supports."""
    return _LEVEL_NAMES[lib.fl_simd_best()]


def simd_levels() -> list[str]:
    """Every level this CPU can run, scalar first."""
    best = lib.fl_simd_best()
    if best == SIMD_LEVELS["neon"]:
        return ["scalar", "neon"]
    return [name for name, level in SIMD_LEVELS.items() if level <= best and name != "neon"]


def set_simd_level(name: str) -> None:
    """Use the kernels of level `name` from now on (ValueError when this CPU lacks it)."""
    if name not in SIMD_LEVELS:
        raise ValueError(f"name: unknown SIMD level {name!r}; expected one of {', '.join(SIMD_LEVELS)}")
    if lib.fl_simd_set(SIMD_LEVELS[name]) != lib.FL_OK:
        raise ValueError(f"name: this CPU does not support SIMD level {name!r} (best: {simd_best()})")


def has_vnni() -> bool:
    """Whether the AVX-512 kernels use VNNI on this CPU."""
    return bool(lib.fl_simd_has_vnni())


def has_amx() -> bool:
    """Whether the prefill kernels of Q4_K, Q5_K and Q6_K run on AMX-INT8 tiles now (the same bits either way)."""
    return bool(lib.fl_simd_has_amx())


def set_amx(on: bool) -> None:
    """Turn the AMX prefill kernels on or off (ValueError to turn them on where the CPU or the OS lacks them)."""
    if lib.fl_amx_set(1 if on else 0) != lib.FL_OK:
        raise ValueError("on: this CPU or OS does not offer AMX-INT8 tiles")


def set_threads(n: int) -> None:
    """Size the core's thread pool; n <= 0 means default_threads()."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    check(lib.fl_threads_set(int(n)), f"fl_threads_set({n})")


def default_threads() -> int:
    """The pool's width when none is asked for: one thread per physical performance core this process may run on
    (no SMT siblings, no E-cores), one fewer from 8 cores up, left to the caller."""
    return int(lib.fl_threads_default())


def threads() -> int:
    """Threads of the core's pool."""
    return int(lib.fl_threads_get())


__all__ = ["matmul", "matmul_batch", "simd_level", "simd_best", "simd_levels", "set_simd_level", "has_vnni", "has_amx", "set_amx",
           "set_threads", "default_threads", "threads", "SIMD_LEVELS"]
