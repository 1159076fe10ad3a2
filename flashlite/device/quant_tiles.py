"""Triton device functions that dequantize a tile of GGUF block-format weights in registers.

`dequant_tile` returns W[rows, elements] as float32 for a [BLOCK_N, BLOCK_K] tile, reading the raw block bytes
(a uint8 tensor, rows of `row_bytes`) and nothing else but a small lookup table per type. Every element finds
its own block, quant bits and scales by address arithmetic, so a tile can start and end anywhere in a row and
one source serves every tile shape of the decode and prefill kernels. The repeated loads of a block's scales
by the elements that share it hit the same cache lines. Plain Triton only (no CUDA intrinsics, no inline
assembly), so that triton-ascend can compile the same source for Ascend.

Layouts (csrc/quants.h, ggml-common.h): element e of a row lives in block e // QK; `i` below is its index in
the block. Type ids are ggml's.
"""
from __future__ import annotations

import triton
import triton.language as tl

Q2_K = tl.constexpr(10)
Q4_K = tl.constexpr(12)
Q5_K = tl.constexpr(13)
Q6_K = tl.constexpr(14)
Q8_0 = tl.constexpr(8)
IQ2_XXS = tl.constexpr(16)
IQ4_XS = tl.constexpr(23)
MXFP4 = tl.constexpr(39)


@triton.jit
def _u8(p, mask):
    return tl.load(p, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(p, mask):
    """The little-endian fp16 at byte pointer p (blocks are an even number of bytes, fp16 fields 2-aligned, but
    two byte loads make no alignment assumption at all)."""
    bits = tl.load(p, mask=mask, other=0).to(tl.uint16) | (tl.load(p + 1, mask=mask, other=0).to(tl.uint16) << 8)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _q8_0(w_ptr, row_base, e, mask):
    # 34-byte blocks of 32: fp16 d, int8 qs[32]; x = d * q
    blk = w_ptr + row_base + (e // 32) * 34
    q = tl.load(blk + 2 + e % 32, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return _f16(blk, mask) * q


@triton.jit
def _k_scale_min(sc_ptr, j, mask):
    """The 6-bit scale and min of sub-block j (0..7) from Q4_K / Q5_K's 12 packed bytes (ggml's
    get_scale_min_k4): j < 4 in the low 6 bits of bytes j and j + 4; j >= 4 split between the nibbles of byte
    j + 4 and the top 2 bits of bytes j - 4 and j."""
    a = _u8(sc_ptr + j, mask)
    b = _u8(sc_ptr + j + 4, mask)
    c = _u8(sc_ptr + (j & 3), mask)
    low = j < 4
    scale = tl.where(low, a & 63, (b & 0xF) | ((c >> 6) << 4))
    minimum = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _q4_k(w_ptr, row_base, e, mask):
    # 144-byte blocks of 256: fp16 d, fp16 dmin, scales[12], qs[128]; sub-block j of 32 takes the low (j even)
    # or high (j odd) nibbles of qs[32 * (j // 2) ...]; x = d * sc * q - dmin * m
    blk = w_ptr + row_base + (e // 256) * 144
    i = e % 256
    j = i // 32
    byte = _u8(blk + 16 + 32 * (j // 2) + i % 32, mask)
    q = ((byte >> (4 * (j & 1))) & 0xF).to(tl.float32)
    scale, minimum = _k_scale_min(blk + 4, j, mask)
    return _f16(blk, mask) * scale * q - _f16(blk + 2, mask) * minimum


@triton.jit
def _q5_k(w_ptr, row_base, e, mask):
    # 176-byte blocks: as Q4_K with qh[32] before qs[128]; bit j of qh[i % 32] is the fifth bit of sub-block j
    blk = w_ptr + row_base + (e // 256) * 176
    i = e % 256
    j = i // 32
    byte = _u8(blk + 48 + 32 * (j // 2) + i % 32, mask)
    high = (_u8(blk + 16 + i % 32, mask) >> j) & 1
    q = (((byte >> (4 * (j & 1))) & 0xF) | (high << 4)).to(tl.float32)
    scale, minimum = _k_scale_min(blk + 4, j, mask)
    return _f16(blk, mask) * scale * q - _f16(blk + 2, mask) * minimum


@triton.jit
def _q6_k(w_ptr, row_base, e, mask):
    # 210-byte blocks: ql[128], qh[64], int8 scales[16], fp16 d. Each half h of 128 elements is 4 quarters g of
    # 32: low 4 bits from ql[64h + 32 (g & 1) + l] (low nibble for g < 2, high above), 2 high bits from
    # qh[32h + l] >> 2g; scale scales[8h + l // 16 + 2g]; x = d * sc * (q - 32)
    blk = w_ptr + row_base + (e // 256) * 210
    i = e % 256
    h = i // 128
    g = (i % 128) // 32
    l = i % 32
    low = (_u8(blk + 64 * h + 32 * (g & 1) + l, mask) >> (4 * (g // 2))) & 0xF
    high = (_u8(blk + 128 + 32 * h + l, mask) >> (2 * g)) & 3
    scale = tl.load(blk + 192 + 8 * h + l // 16 + 2 * g, mask=mask, other=0).to(tl.int8, bitcast=True)
    return _f16(blk + 208, mask) * scale.to(tl.float32) * ((low | (high << 4)) - 32).to(tl.float32)


@triton.jit
def _q2_k(w_ptr, row_base, e, mask):
    # 84-byte blocks: scales[16] (low nibble scale, high nibble min), qs[64], fp16 d, fp16 dmin. Element
    # 128h + 32s + 16u + l takes bits 2s of qs[32h + 16u + l] and scale byte 8h + 2s + u; x = d * sc * q - dmin * m
    blk = w_ptr + row_base + (e // 256) * 84
    i = e % 256
    h = i // 128
    s = (i % 128) // 32
    u = (i % 32) // 16
    q = ((_u8(blk + 16 + 32 * h + 16 * u + i % 16, mask) >> (2 * s)) & 3).to(tl.float32)
    sc = _u8(blk + 8 * h + 2 * s + u, mask)
    return _f16(blk + 80, mask) * (sc & 0xF).to(tl.float32) * q - _f16(blk + 82, mask) * (sc >> 4).to(tl.float32)


@triton.jit
def _mxfp4(w_ptr, table_ptr, row_base, e, mask):
    # 17-byte blocks of 32: e8m0 exponent, qs[16] (element i: low nibble of qs[i] below 16, high of qs[i - 16]);
    # x = kvalues_mxfp4[q] * 2^(e - 128), the table holding twice the e2m1 values. 2^(e - 128) is built in the
    # exponent field (a denormal for e < 2, as ggml's GGML_E8M0_TO_FP32_HALF), so it is exact everywhere.
    blk = w_ptr + row_base + (e // 32) * 17
    i = e % 32
    q = (_u8(blk + 1 + i % 16, mask) >> (4 * (i // 16))) & 0xF
    x = _u8(blk, mask)
    bits = tl.where(x < 2, 0x00200000 << (x & 1), (x - 1) << 23)  # x & 1: no shift past 31 bits
    value = tl.load(table_ptr + q).to(tl.float32)
    return value * bits.to(tl.float32, bitcast=True)


@triton.jit
def _iq4_xs(w_ptr, table_ptr, row_base, e, mask):
    # 136-byte blocks: fp16 d, u16 scales_h, scales_l[4], qs[128]. Sub-block b of 32: 6-bit scale from nibble
    # b % 2 of scales_l[b // 2] and bits 2b of scales_h; element i takes the low (i % 32 < 16) or high nibble
    # of qs[16b + i % 16]; x = d * (ls - 32) * kvalues_iq4nl[q]
    blk = w_ptr + row_base + (e // 256) * 136
    i = e % 256
    b = i // 32
    r = i % 32
    q = (_u8(blk + 8 + 16 * b + r % 16, mask) >> (4 * (r // 16))) & 0xF
    scales_h = _u8(blk + 2, mask) | (_u8(blk + 3, mask) << 8)
    ls = ((_u8(blk + 4 + b // 2, mask) >> (4 * (b & 1))) & 0xF) | (((scales_h >> (2 * b)) & 3) << 4)
    value = tl.load(table_ptr + q).to(tl.float32)
    return _f16(blk, mask) * (ls - 32).to(tl.float32) * value


@triton.jit
def _iq2_xxs(w_ptr, table_ptr, row_base, e, mask):
    # 66-byte blocks: fp16 d, then 8 groups of 8 bytes, one per 32 elements: 4 grid indices (bytes 0-3, one per
    # 8 elements) and a u32 (bytes 4-7) holding 4 x 7 sign-pattern indices and a 4-bit scale in its top bits.
    # x = d * (0.5 + scale) / 4 * grid[index][j] * (bit j of ksigns[pattern] ? -1 : 1). The table holds
    # iq2xxs_grid as 256 x 8 bytes, then ksigns_iq2xs (128 bytes).
    blk = w_ptr + row_base + (e // 256) * 66
    i = e % 256
    group = blk + 2 + 8 * (i // 32)
    l = (i % 32) // 8
    j = i % 8
    word = (tl.load(group + 4, mask=mask, other=0).to(tl.uint32)
            | (tl.load(group + 5, mask=mask, other=0).to(tl.uint32) << 8)
            | (tl.load(group + 6, mask=mask, other=0).to(tl.uint32) << 16)
            | (tl.load(group + 7, mask=mask, other=0).to(tl.uint32) << 24))
    scale = (word >> 28).to(tl.float32)
    pattern = ((word >> (7 * l).to(tl.uint32)) & 127).to(tl.int32)
    signs = tl.load(table_ptr + 2048 + pattern).to(tl.int32)
    level = tl.load(table_ptr + 8 * _u8(group + l, mask) + j).to(tl.float32)
    sign = 1.0 - 2.0 * ((signs >> j) & 1).to(tl.float32)
    return _f16(blk, mask) * (0.5 + scale) * 0.25 * level * sign


@triton.jit
def dequant_tile(w_ptr, table_ptr, row_base, e, mask, QTYPE: tl.constexpr):
    """W[row, e] as float32 for byte offsets `row_base` ([BLOCK_N, 1], int64: row * row_bytes) and element
    indices `e` ([1, BLOCK_K]); elements outside `mask` read nothing and come out as 0, so that a product over a
    partial tile adds nothing for them whatever the activation holds there."""
    if QTYPE == Q8_0:
        out = _q8_0(w_ptr, row_base, e, mask)
    elif QTYPE == Q4_K:
        out = _q4_k(w_ptr, row_base, e, mask)
    elif QTYPE == Q5_K:
        out = _q5_k(w_ptr, row_base, e, mask)
    elif QTYPE == Q6_K:
        out = _q6_k(w_ptr, row_base, e, mask)
    elif QTYPE == Q2_K:
        out = _q2_k(w_ptr, row_base, e, mask)
    elif QTYPE == MXFP4:
        out = _mxfp4(w_ptr, table_ptr, row_base, e, mask)
    elif QTYPE == IQ4_XS:
        out = _iq4_xs(w_ptr, table_ptr, row_base, e, mask)
    else:
        tl.static_assert(QTYPE == IQ2_XXS, "dequant_tile: no device dequantizer for this type")
        out = _iq2_xxs(w_ptr, table_ptr, row_base, e, mask)
    return tl.where(mask, out, 0.0)
