"""Matrix products and row dequantization of GGUF block-format weights on a device, in Triton.

The weights stay in their block formats in device memory (a uint8 tensor of rows x row_bytes, the bytes of the
GGUF tensor); each kernel dequantizes the tile it needs in registers (flashlite.device.quant_tiles), so no
dequantized copy of a matrix is ever made. Three kernels, one source for CUDA and Ascend (plain Triton):

- `gemv`: decode, 1 to 8 tokens. One program per BLOCK_N rows walks k, dequantizes a [BLOCK_N, BLOCK_K] tile
  once and multiplies it with every token's activation slice: the weight bytes are read once per call.
- `gemm`: prefill, any number of tokens. Tiles of BLOCK_M tokens x BLOCK_N rows; the dequantized weight tile
  meets the activation tile in `tl.dot` (tensor cores), at the precision asked.
- `dequantize_rows`: whole rows to float32, optionally gathered by row id (embedding lookups, small tensors).

Activations are float (f32, f16 or bf16) and are not quantized: unlike the C core's decode, which rounds them to
Q8_0 / Q8_K for its integer dots, these kernels compute with the activations as given.

With TRITON_INTERPRET=1 set before this module is imported, the kernels run on CPU tensors through Triton's
interpreter (how tests/test_triton_kernels.py checks them against the C core without a GPU).
"""
from __future__ import annotations

import functools
import os

import numpy as np

try:
    import torch
    import triton
    import triton.language as tl
except ImportError as exc:  # the base install is CPU-only; say what the device path needs
    raise ImportError(f"flashlite's device kernels need torch and triton ({exc}); install them with "
                      f"pip install 'flashlite[cuda]' (or torch and triton for your accelerator)") from exc

from flashlite import block_formats
from flashlite.device.quant_tiles import dequant_tile

# ggml type ids of the formats with a device dequantizer
TYPES = {"Q8_0": 8, "Q2_K": 10, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ2_XXS": 16, "IQ4_XS": 23, "MXFP4": 39}
_TYPE_NAMES = {v: k for k, v in TYPES.items()}
GEMV_MAX_TOKENS = 8
# tensor-core input precisions of gemm. No bfloat16: Triton 3.9's interpreter returns garbage for a bf16 tl.dot, so
# it could not be checked here, and fp16's 3 more mantissa bits matter for dequantized weights (d * q).
PRECISIONS = ("ieee", "tf32", "fp16")

# Triton decides at @triton.jit time whether a kernel is interpreted; the interpreter runs numpy on whole tiles,
# slow per element, so the tiles shrink there to keep the CPU checks fast
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def gemv_config(tokens: int) -> dict:
    """Tile sizes and warps of `gemv` for a power-of-two token count. The [tokens, BLOCK_N, BLOCK_K] product
    lives in registers, so k per step shrinks as tokens grow; 8 rows per program keep sm_90 at ~100 registers
    without spills (16 rows took 190 for one token; tools/compile_gpu_kernels.py prints the counts)."""
    if _INTERPRETED:
        return {"BLOCK_N": 16, "BLOCK_K": 64}
    return {"BLOCK_N": 8, "BLOCK_K": max(32, 256 // tokens), "num_warps": 4}


# 64 x 64 x 32 tiles on 8 warps: ~146 registers on sm_90 for every type, no spills (64 x 64 x 64 on 4 warps
# spilled 150-560 bytes: each element of the weight tile carries its own addresses and scales)
GEMM_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64} if _INTERPRETED else \
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8}
# grouped_gemm takes 16-row tiles up to this many rows (a decode step's few tokens per expert), else GEMM_CONFIG's
GROUPED_SMALL = 256
DEQUANTIZE_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 64} if _INTERPRETED else {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 4}

_MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # ggml's kvalues_mxfp4: 2 x e2m1
_IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl


# The kernels call Triton builtins and this package's own @triton.jit functions only, not triton.language's
# jit-decorated helpers (tl.zeros, tl.sum): those are compiled or interpreted as decided when triton itself was
# imported, these when this module is, so TRITON_INTERPRET=1 set before importing this module is enough even
# where something imported triton earlier (torch does, in a test session).
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _gemv_kernel(w_ptr, table_ptr, x_ptr, y_ptr, n_tok, rows, k, row_bytes, stride_x, stride_y,
                 QTYPE: tl.constexpr, TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = r < rows
    row_base = r.to(tl.int64)[:, None] * row_bytes
    t = tl.arange(0, TOKENS)
    tok_ok = t < n_tok
    acc = tl.full((TOKENS, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, k, BLOCK_K):
        e = k0 + tl.arange(0, BLOCK_K)
        k_ok = e < k
        w = dequant_tile(w_ptr, table_ptr, row_base, e[None, :], row_ok[:, None] & k_ok[None, :], QTYPE)
        x = tl.load(x_ptr + t[:, None] * stride_x + e[None, :], mask=tok_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.reduce(x.to(tl.float32)[:, None, :] * w[None, :, :], 2, _add)
    tl.store(y_ptr + t[:, None] * stride_y + r[None, :], acc, mask=tok_ok[:, None] & row_ok[None, :])


@triton.jit
def _tile_product(w_ptr, table_ptr, row_base, row_ok, x_rows, tok_ok, k, QTYPE: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """X W^T of a [BLOCK_M tokens, BLOCK_N rows] tile over all of k, on tensor cores at PRECISION (gemm and
    grouped_gemm: they differ only in where the tile's rows and tokens are)"""
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, k, BLOCK_K):
        e = k0 + tl.arange(0, BLOCK_K)
        k_ok = e < k
        w = dequant_tile(w_ptr, table_ptr, row_base, e[None, :], row_ok[:, None] & k_ok[None, :], QTYPE)
        x = tl.load(x_rows + e[None, :], mask=tok_ok[:, None] & k_ok[None, :], other=0.0)
        if PRECISION == "fp16":
            acc = tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)), acc)
        else:
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _gemm_kernel(w_ptr, table_ptr, x_ptr, y_ptr, n_tok, rows, k, row_bytes, stride_x, stride_y,
                 QTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    # token tiles vary fastest, so the programs that share a weight tile run together and find it in L2
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_ok = m < n_tok
    row_ok = r < rows
    row_base = r.to(tl.int64)[:, None] * row_bytes
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_x
    acc = _tile_product(w_ptr, table_ptr, row_base, row_ok, x_rows, tok_ok, k, QTYPE, PRECISION, BLOCK_M, BLOCK_N,
                        BLOCK_K)
    tl.store(y_ptr + m.to(tl.int64)[:, None] * stride_y + r[None, :], acc, mask=tok_ok[:, None] & row_ok[None, :])


@triton.jit
def _grouped_gemm_kernel(w_ptr, table_ptr, x_ptr, y_ptr, tile_expert_ptr, tile_lo_ptr, tile_hi_ptr, rows, k,
                         row_bytes, expert_bytes, stride_x, stride_y, QTYPE: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # _gemm_kernel on one tile of rows lo..hi of x, all routed to one expert, whose matrix starts expert_bytes
    # into w; a tile past the last (lo == hi) stores nothing
    j = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + j).to(tl.int64)
    lo = tl.load(tile_lo_ptr + j)
    hi = tl.load(tile_hi_ptr + j)
    m = lo + tl.arange(0, BLOCK_M)
    r = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_ok = m < hi
    row_ok = r < rows
    row_base = expert * expert_bytes + r.to(tl.int64)[:, None] * row_bytes
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_x
    acc = _tile_product(w_ptr, table_ptr, row_base, row_ok, x_rows, tok_ok, k, QTYPE, PRECISION, BLOCK_M, BLOCK_N,
                        BLOCK_K)
    tl.store(y_ptr + m.to(tl.int64)[:, None] * stride_y + r[None, :], acc, mask=tok_ok[:, None] & row_ok[None, :])


@triton.jit
def _dequantize_rows_kernel(w_ptr, table_ptr, ids_ptr, out_ptr, n_out, k, row_bytes,
                            QTYPE: tl.constexpr, GATHER: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    o = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = o < n_out
    if GATHER:
        r = tl.load(ids_ptr + o, mask=out_ok, other=0).to(tl.int64)
    else:
        r = o.to(tl.int64)
    e = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = out_ok[:, None] & (e < k)[None, :]
    w = dequant_tile(w_ptr, table_ptr, r[:, None] * row_bytes, e[None, :], mask, QTYPE)
    tl.store(out_ptr + o.to(tl.int64)[:, None] * k + e[None, :], w, mask=mask)


def _type_id(wtype) -> int:
    if isinstance(wtype, str):
        if wtype.strip().upper() not in TYPES:
            raise ValueError(f"wtype: no device kernel for {wtype!r}; device types: {', '.join(TYPES)}")
        return TYPES[wtype.strip().upper()]
    if isinstance(wtype, bool) or not isinstance(wtype, (int, np.integer)):
        raise TypeError(f"wtype: expected a type id, name or gguf.GGMLQuantizationType, got {type(wtype).__name__}")
    if int(wtype) not in _TYPE_NAMES:
        raise ValueError(f"wtype: no device kernel for {block_formats.type_name(int(wtype))}; "
                         f"device types: {', '.join(TYPES)}")
    return int(wtype)


@functools.lru_cache(maxsize=None)
def _table(type_id: int, device: str) -> torch.Tensor:
    """The lookup table a type's dequantizer reads (a one-byte placeholder for types without one)."""
    if type_id == TYPES["MXFP4"]:
        values = np.array(_MXFP4_VALUES, dtype=np.int8)
    elif type_id == TYPES["IQ4_XS"]:
        values = np.array(_IQ4NL_VALUES, dtype=np.int8)
    elif type_id == TYPES["IQ2_XXS"]:
        from gguf.quants import IQ2_XXS  # gguf-py holds ggml's iq2xxs_grid and ksigns_iq2xs
        IQ2_XXS.init_grid()
        grid = np.asarray(IQ2_XXS.grid, dtype=np.float32).reshape(256 * 8).astype(np.uint8)
        values = np.concatenate([grid, np.frombuffer(IQ2_XXS.ksigns, dtype=np.uint8)])
    else:
        values = np.zeros(1, dtype=np.uint8)
    return torch.from_numpy(values).to(device)


def _checked_weight(w, type_id: int, rows: int, k: int) -> int:
    """The row size in bytes after checking that `w` is a contiguous uint8 tensor of rows x k elements."""
    if not isinstance(w, torch.Tensor) or w.dtype != torch.uint8:
        raise TypeError(f"w: expected a torch uint8 tensor of block bytes, got "
                        f"{getattr(w, 'dtype', type(w).__name__)}")
    if not w.is_contiguous():
        raise ValueError("w: tensor must be contiguous")
    for name, value in (("rows", rows), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    elems, size = block_formats.type_sizes(type_id)
    if k % elems:
        raise ValueError(f"k: {k} is not a multiple of the {_TYPE_NAMES[type_id]} block size {elems}")
    row_bytes = k // elems * size
    if w.numel() != rows * row_bytes:
        raise ValueError(f"w: expected {rows} rows x {row_bytes} bytes = {rows * row_bytes} bytes of "
                         f"{_TYPE_NAMES[type_id]}, got {w.numel()}")
    return row_bytes


def _checked_activations(x, k: int, device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x: expected a float32, float16 or bfloat16 torch tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim not in (1, 2) or x.shape[-1] != k:
        raise ValueError(f"x: expected shape ({k},) or (n_tok, {k}), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"x: on {x.device}, the weights on {device}")
    return x.reshape(-1, k).contiguous()


def gemv(w, wtype, rows: int, k: int, x) -> torch.Tensor:
    """y = x @ W.T for 1 to GEMV_MAX_TOKENS tokens (decode): x [k] -> y [rows], x [n_tok, k] -> y [n_tok, rows],
    float32. W is `rows` x `k` elements of `wtype` as raw GGUF block bytes in `w` (uint8, on x's device)."""
    type_id = _type_id(wtype)
    row_bytes = _checked_weight(w, type_id, rows, k)
    xs = _checked_activations(x, k, w.device)
    n_tok = xs.shape[0]
    if n_tok > GEMV_MAX_TOKENS:
        raise ValueError(f"x: gemv takes at most {GEMV_MAX_TOKENS} tokens, got {n_tok} (use gemm)")
    tokens = triton.next_power_of_2(n_tok)
    y = torch.empty((n_tok, rows), dtype=torch.float32, device=w.device)
    config = gemv_config(tokens)
    _gemv_kernel[(triton.cdiv(rows, config["BLOCK_N"]),)](
        w, _table(type_id, str(w.device)), xs, y, n_tok, rows, k, row_bytes, xs.stride(0), y.stride(0),
        QTYPE=type_id, TOKENS=tokens, **config)
    return y[0] if x.ndim == 1 else y


def gemm(w, wtype, rows: int, k: int, x, precision: str = "tf32") -> torch.Tensor:
    """y = x @ W.T for any number of tokens (prefill), float32 [n_tok, rows] (x [k] gives [rows]). `precision` is
    that of the tensor-core products: "ieee" (float32), "tf32" (float32 inputs rounded to 10 mantissa bits) or
    "fp16" (both tiles rounded to float16: activations must stay within +-65504); accumulation is float32."""
    type_id = _type_id(wtype)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    row_bytes = _checked_weight(w, type_id, rows, k)
    xs = _checked_activations(x, k, w.device)
    n_tok = xs.shape[0]
    y = torch.empty((n_tok, rows), dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(n_tok, GEMM_CONFIG["BLOCK_M"]), triton.cdiv(rows, GEMM_CONFIG["BLOCK_N"]))
    _gemm_kernel[grid](w, _table(type_id, str(w.device)), xs, y, n_tok, rows, k, row_bytes, xs.stride(0),
                       y.stride(0), QTYPE=type_id, PRECISION=precision, **GEMM_CONFIG)
    return y[0] if x.ndim == 1 else y


def matmul(w, wtype, rows: int, k: int, x, precision: str = "tf32") -> torch.Tensor:
    """y = x @ W.T, float32: `gemv` for up to GEMV_MAX_TOKENS tokens, `gemm` (at `precision`) above."""
    n_tok = 1 if getattr(x, "ndim", 1) == 1 else x.shape[0]
    if n_tok <= GEMV_MAX_TOKENS:
        return gemv(w, wtype, rows, k, x)
    return gemm(w, wtype, rows, k, x, precision)


def expert_tiles(experts, n_experts: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiles of at most `block` rows over rows grouped by expert: `experts` [P] the expert of each row, ascending
    (n_experts or more: rows left out, after the others). Returns (expert, lo, hi) per tile, int32 tensors of a
    length fixed by P and n_experts alone (min(P, n_experts) + ceil(P / block), so nothing comes to the host); the
    tiles past the last have lo == hi. Torch ops on the device."""
    p = experts.numel()
    n_tiles = min(p, n_experts) + triton.cdiv(p, block)
    counts = torch.bincount(experts.clamp(max=n_experts), minlength=n_experts + 1)[:n_experts]
    ends = torch.cumsum(counts, 0)
    tiles = (counts + block - 1) // block
    tile_ends = torch.cumsum(tiles, 0)
    j = torch.arange(n_tiles, device=experts.device)
    expert = torch.searchsorted(tile_ends, j, right=True)
    valid = expert < n_experts
    e = expert.clamp(max=n_experts - 1)
    lo = ends[e] - counts[e] + (j - (tile_ends[e] - tiles[e])) * block
    hi = torch.minimum(lo + block, ends[e])
    zero = torch.zeros_like(lo)
    return (torch.where(valid, e, 0).to(torch.int32), torch.where(valid, lo, zero).to(torch.int32),
            torch.where(valid, hi, zero).to(torch.int32))


def grouped_gemm(w, wtype, n_experts: int, rows: int, k: int, x, experts, precision: str = "tf32") -> torch.Tensor:
    """y[i] = x[i] @ W[experts[i]].T for rows grouped by expert, in one launch: W a stack of n_experts matrices of
    `rows` x `k` elements of `wtype` (block bytes, uint8 [n_experts, rows, row_bytes]), x [P, k], experts [P]
    ascending on x's device (a row with expert >= n_experts is left out, after the others: its y is not written).
    Nothing comes to the host: the tiles are found on the device (expert_tiles), so a MoE layer's routed experts
    need no synchronisation. float32 [P, rows]."""
    type_id = _type_id(wtype)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    row_bytes = _checked_weight(w, type_id, n_experts * rows, k)
    xs = _checked_activations(x, k, w.device)
    if not isinstance(experts, torch.Tensor) or experts.shape != (xs.shape[0],) or experts.device != w.device:
        raise ValueError(f"experts: expected a tensor of {xs.shape[0]} expert ids on {w.device}")
    y = torch.empty((xs.shape[0], rows), dtype=torch.float32, device=w.device)
    if xs.shape[0]:
        config = dict(GEMM_CONFIG, BLOCK_M=16) if xs.shape[0] <= GROUPED_SMALL else GEMM_CONFIG
        expert, lo, hi = expert_tiles(experts, n_experts, config["BLOCK_M"])
        grid = (expert.numel(), triton.cdiv(rows, config["BLOCK_N"]))
        _grouped_gemm_kernel[grid](w, _table(type_id, str(w.device)), xs, y, expert, lo, hi, rows, k, row_bytes,
                                   rows * row_bytes, xs.stride(0), y.stride(0), QTYPE=type_id, PRECISION=precision,
                                   **config)
    return y


def dequantize_rows(w, wtype, rows: int, k: int, ids=None) -> torch.Tensor:
    """Rows of W as float32: all of them ([rows, k]), or those listed in `ids` (an integer tensor of row indices,
    on w's device; result [len(ids), k]), as an embedding lookup does. Row ids are not range-checked on the
    device; an id outside 0..rows-1 raises here."""
    type_id = _type_id(wtype)
    row_bytes = _checked_weight(w, type_id, rows, k)
    if ids is None:
        n_out, ids_arg = rows, w
    else:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64) or ids.ndim != 1:
            raise TypeError("ids: expected a 1-D int32 or int64 torch tensor of row indices")
        if ids.device != w.device:
            raise ValueError(f"ids: on {ids.device}, the weights on {w.device}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
            raise ValueError(f"ids: row indices must lie in 0..{rows - 1}, got {int(ids.min())}..{int(ids.max())}")
        n_out, ids_arg = ids.numel(), ids.contiguous()
    out = torch.empty((n_out, k), dtype=torch.float32, device=w.device)
    if n_out:
        grid = (triton.cdiv(n_out, DEQUANTIZE_CONFIG["BLOCK_N"]), triton.cdiv(k, DEQUANTIZE_CONFIG["BLOCK_K"]))
        _dequantize_rows_kernel[grid](w, _table(type_id, str(w.device)), ids_arg, out, n_out, k, row_bytes,
                                      QTYPE=type_id, GATHER=ids is not None, **DEQUANTIZE_CONFIG)
    return out


__all__ = ["TYPES", "GEMV_MAX_TOKENS", "PRECISIONS", "gemv", "gemm", "matmul", "grouped_gemm", "expert_tiles",
           "dequantize_rows"]
