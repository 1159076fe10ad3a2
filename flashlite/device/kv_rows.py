"""The KV cache's packed row formats (csrc/kv_pack.c) in torch, so that a device's cache holds its rows packed as
the CPU's does, byte for byte: FP8 rows (the last rope_dim dims as bf16, then the rest as e4m3 with one ue8m0 scale
per 64) and FP4 rows (e2m1 pairs, element 2i in the low nibble, one e8m0 scale per 32).

Written with integer ops on the float32 bits, as the C core writes them, rather than through torch's float8
dtypes: the rounding, saturation and scale choice are then the C core's by construction (tests/test_device_kv.py
compares the bytes), and nothing here needs a dtype an accelerator's torch may lack.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

FP8_BLOCK, FP4_BLOCK = 64, 32
E4M3_MAX, E2M1_MAX = 448.0, 6.0
FP8_SCALE_FLOOR = 1e-4  # the reference's floor under a block's amax
FP4_SCALE_FLOOR = 6.0 * 2.0 ** -126
# e2m1's magnitudes in code order, and the bounds between them: a magnitude takes the code of the bounds it is past
# (<= at the bounds whose halfway case rounds down to an even code, < where it rounds up to one)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_PAST = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


# Bit patterns are handled as int64 holding the unsigned 32 bits, so that no shift or sum overflows a signed type.
def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _float(bits: torch.Tensor) -> torch.Tensor:
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).contiguous().view(torch.float32)


def _f32(v: float) -> float:
    """v rounded to float32, as the C core's float constants are (1.0f / 448.0f, 1e-4f): a product or maximum of a
    float32 tensor with it is then the C core's whether torch computes it in float32 or double (the exact product of
    two float32 values fits a double), and no tensor is made per call."""
    return float(np.float32(v))


def _scale_exp(amax: torch.Tensor, floor: float, recip: float) -> torch.Tensor:
    """e of the block scale 2^e: ceil(log2(max(amax, floor) * recip)), read off the float32 bits, in [-127, 127]."""
    u = _bits(torch.clamp(amax, min=_f32(floor)) * _f32(recip))
    e = ((u >> 23) & 0xFF) - 127 + ((u & 0x7FFFFF) != 0).to(torch.int64)
    return torch.clamp(e, -127, 127)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as float32 for -127 <= e <= 127 (2^-127 a subnormal)."""
    return torch.where(e > -127, _float((e + 127) << 23), _float(torch.full_like(e, 1 << 22)))


def _e4m3(v: torch.Tensor) -> torch.Tensor:
    """e4m3 codes (bias 7, no infinities, saturated at 448) of v, rounded to nearest even, as int64."""
    sign = torch.signbit(v).to(torch.int64) << 7
    a = torch.abs(v)
    a = torch.where(a <= E4M3_MAX, a, torch.full_like(a, E4M3_MAX))  # NaN saturates too, as in C
    sub = torch.round(a * 512.0).to(torch.int64)  # below 2^-6 the codes step by 2^-9 (round: half to even)
    u = _bits(a)
    u = u + 0x7FFFF + ((u >> 20) & 1)
    normal = ((((u >> 23) - 120) << 3) | ((u >> 20) & 7))
    return sign | torch.where(a < 2.0 ** -6, sub, normal)


def _e4m3_value(c: torch.Tensor) -> torch.Tensor:
    mag = c & 0x7F
    normal = _float((mag << 20) + (120 << 23))
    sub = (mag & 7).to(torch.float32) * 2.0 ** -9
    value = torch.where(mag >= 8, normal, sub)
    return torch.where((c & 0x80) != 0, -value, value)  # negation flips the sign bit alone, as the C core's OR


def _e2m1(v: torch.Tensor) -> torch.Tensor:
    a = torch.abs(v)
    code = torch.zeros_like(a, dtype=torch.int64)
    for bound, inclusive in _E2M1_PAST:
        code += (a >= bound if inclusive else a > bound).to(torch.int64)
    return code | (torch.signbit(v).to(torch.int64) << 3)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """bf16 bits of x, rounded to nearest even, NaNs kept quiet (halfs.c's fl_fp32_to_bf16), as int64."""
    u = _bits(x)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF
    return torch.where(nan, ((u >> 16) & 0xFFFF) | 64, rounded)


@functools.lru_cache(maxsize=8)
def _e2m1_table(device: torch.device) -> torch.Tensor:
    """The 16 e2m1 codes' values (sign in bit 3), made once per device rather than each unpack."""
    return torch.tensor(E2M1 + tuple(-m for m in E2M1), dtype=torch.float32, device=device)


def _bytes(codes: torch.Tensor, n: int) -> torch.Tensor:
    """int64 [..., m] holding n-byte little-endian values -> uint8 [..., m * n]."""
    parts = [(codes >> (8 * i)) & 0xFF for i in range(n)]
    return torch.stack(parts, -1).reshape(*codes.shape[:-1], -1).to(torch.uint8)


def pack_fp8(rows: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """float32 [n, dim] -> uint8 [n, 2 rope_dim + nope + nope / 64] (kv_pack.c's FP8 rows)."""
    n, dim = rows.shape
    nope = dim - rope_dim
    blocks = rows[:, :nope].reshape(n, nope // FP8_BLOCK, FP8_BLOCK)
    e = _scale_exp(blocks.abs().amax(-1), FP8_SCALE_FLOOR, 1.0 / E4M3_MAX)
    codes = _e4m3(blocks * _pow2(-e)[..., None]).reshape(n, nope)
    return torch.cat([_bytes(_bf16(rows[:, nope:]), 2), codes.to(torch.uint8), (e + 127).to(torch.uint8)], 1)


def unpack_fp8(packed: torch.Tensor, dim: int, rope_dim: int) -> torch.Tensor:
    n, nope = packed.shape[0], dim - rope_dim
    p = packed.to(torch.int64)
    rope = p[:, :2 * rope_dim].reshape(n, rope_dim, 2)
    rope = _float(((rope[..., 1] << 8) | rope[..., 0]) << 16)
    codes = p[:, 2 * rope_dim:2 * rope_dim + nope].reshape(n, nope // FP8_BLOCK, FP8_BLOCK)
    scales = _pow2(p[:, 2 * rope_dim + nope:] - 127)
    return torch.cat([(_e4m3_value(codes) * scales[..., None]).reshape(n, nope), rope], 1)


def pack_fp4(rows: torch.Tensor) -> torch.Tensor:
    """float32 [n, dim] -> uint8 [n, dim / 2 + dim / 32] (kv_pack.c's FP4 rows)."""
    n, dim = rows.shape
    blocks = rows.reshape(n, dim // FP4_BLOCK, FP4_BLOCK)
    e = _scale_exp(blocks.abs().amax(-1), FP4_SCALE_FLOOR, 1.0 / E2M1_MAX)
    codes = _e2m1(blocks * _pow2(-e)[..., None]).reshape(n, dim // 2, 2)
    return torch.cat([(codes[..., 0] | codes[..., 1] << 4).to(torch.uint8), (e + 127).to(torch.uint8)], 1)


def unpack_fp4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    n = packed.shape[0]
    p = packed.to(torch.int64)
    pairs = p[:, :dim // 2]
    codes = torch.stack([pairs & 15, pairs >> 4], -1).reshape(n, dim // FP4_BLOCK, FP4_BLOCK)
    table = _e2m1_table(packed.device)
    scales = _pow2(p[:, dim // 2:] - 127)
    return (table[codes] * scales[..., None]).reshape(n, dim)
