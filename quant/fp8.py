"""Exact decoding of DeepSeek's stored number formats, and the lossless FP4 -> ggml MXFP4 repack.

- e4m3 (F8_E4M3, "fn": no infinities, 0x7F/0xFF are NaN) weights with one e8m0 scale per 128x128 block.
- e8m0 (F8_E8M0): byte e is 2^(e-127); 255 is NaN.
- e2m1 (FP4) routed experts: int8 bytes holding element 2k in the low nibble and 2k+1 in the high nibble, one
  e8m0 scale per 32 elements along the input dim.
Every decode is a table lookup times a power of two, so float32 holds each value exactly (bar f32 subnormal rounding).
"""
from __future__ import annotations

import numpy as np

FP8_BLOCK = 128
FP4_BLOCK = 32
MXFP4_BLOCK_BYTES = 1 + FP4_BLOCK // 2


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    value = np.where((codes & 0x7F) == 0x7F, np.nan, value)
    return (sign * value).astype(np.float32)


def _e8m0_table() -> np.ndarray:
    return np.append(np.ldexp(np.float64(1.0), np.arange(255) - 127), np.nan).astype(np.float32)


E4M3 = _e4m3_table()
E8M0 = _e8m0_table()
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def dequant_fp8(weight: np.ndarray, scale: np.ndarray, row0: int = 0) -> np.ndarray:
    """float32 values of e4m3 rows `weight` [r, cols] (uint8 bits) that start at row `row0` of a matrix whose
    e8m0 block scales are `scale` [ceil(rows/128), ceil(cols/128)] (uint8 bits)."""
    rows, cols = weight.shape
    out = np.take(E4M3, weight)
    col_scale = np.repeat(np.take(E8M0, scale), FP8_BLOCK, axis=1)[:, :cols]
    for band in range(row0 // FP8_BLOCK, -(-(row0 + rows) // FP8_BLOCK)):
        lo = max(band * FP8_BLOCK, row0) - row0
        hi = min((band + 1) * FP8_BLOCK, row0 + rows) - row0
        out[lo:hi] *= col_scale[band]
    return out


def fp4_codes(packed: np.ndarray) -> np.ndarray:
    """4-bit e2m1 codes [rows, 2*n] of packed bytes [rows, n]: element 2k is the low nibble of byte k."""
    b = packed.view(np.uint8)
    codes = np.empty((*b.shape[:-1], b.shape[-1] * 2), dtype=np.uint8)
    np.bitwise_and(b, 0x0F, out=codes[..., 0::2])
    np.right_shift(b, 4, out=codes[..., 1::2])
    return codes


def dequant_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 values [rows, cols] of FP4 rows `packed` [rows, cols/2] with e8m0 scales `scale` [rows, cols/32]."""
    codes = fp4_codes(packed)
    rows, cols = codes.shape
    values = np.take(E2M1, codes).reshape(rows, cols // FP4_BLOCK, FP4_BLOCK)
    values *= np.take(E8M0, scale)[:, :, None]
    return values.reshape(rows, cols)


def fp4_to_mxfp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """ggml MXFP4 blocks [rows, cols/32 * 17] holding exactly the codes and scales of FP4 rows.

    A ggml block is the e8m0 byte unchanged, then 16 bytes qs[j] = code[j] | code[j+16] << 4. ggml decodes
    kvalues{0,1,2,3,4,6,8,12,...}[code] * 2^(e-128), which equals E2M1[code] * 2^(e-127): the values are identical.
    """
    codes = fp4_codes(packed)
    rows, cols = codes.shape
    groups = codes.reshape(rows, cols // FP4_BLOCK, FP4_BLOCK)
    out = np.empty((rows, cols // FP4_BLOCK, MXFP4_BLOCK_BYTES), dtype=np.uint8)
    out[:, :, 0] = scale
    half = FP4_BLOCK // 2
    np.bitwise_or(groups[:, :, :half], np.left_shift(groups[:, :, half:], 4), out=out[:, :, 1:])
    return out.reshape(rows, -1)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    out = np.empty(bits.shape, dtype=np.uint32)
    np.left_shift(bits, 16, out=out, dtype=np.uint32)
    return out.view(np.float32)
