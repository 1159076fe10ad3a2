"""Block formats of the C core against gguf-py (the independent reference), numpy float64 and ggml.

Dequantization must match gguf.quants.dequantize bit for bit, NaN positions included, on random and on
adversarial blocks; quantization must match gguf.quants.quantize bit for bit where gguf-py has a quantizer,
and stay within measured error bounds where it does not. ggml's own bytes are pinned by hashes on inputs that
are the same on every platform, with and without an importance vector; where llama.cpp's libggml is at hand
(FLASHLITE_LLAMACPP_PYTHON, see tests/ggml_oracle.py) the quantizers, dequantizers and dots are also compared
with it directly on random data.
"""
import hashlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from flashlite import block_formats
from flashlite._native import ffi, lib
from ggml_oracle import dequantize as ggml_dequantize
from ggml_oracle import dot as ggml_dot
from ggml_oracle import needs_ggml
from ggml_oracle import quantize as ggml_quantize

LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
# the i-quants: non-linear 4-bit values, and 8 (or 4) weights from a lattice grid
IQ_TYPES = [T.IQ4_NL, T.IQ4_XS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M]
WEIGHT_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.MXFP4, *LEGACY, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, *IQ_TYPES]
EXACT_QUANTIZERS = [T.F16, T.BF16, T.Q8_0, T.MXFP4, *LEGACY]
SEARCH_QUANTIZERS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, *IQ_TYPES]
ROUND_TRIP = [*LEGACY, *SEARCH_QUANTIZERS]
# the types whose quantizer weighs its error by an importance vector where one is given (ggml's quantize_<t>)
IMPORTANCE_QUANTIZERS = [*LEGACY, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, *IQ_TYPES]
# the types ggml only quantizes with an importance matrix (ggml_quantize_requires_imatrix): without one the core
# runs the same search with every importance 1, which is what their hashes without importance pin
IMATRIX_ONLY = [T.IQ2_XXS, T.IQ2_XS, T.IQ1_S]
# activations of the legacy types with a min (Q4_1, Q5_1): their block sums carry the weights' min term
Q8_1_ACT = {T.Q4_1, T.Q5_1}

# byte offsets of the fp16 scale fields in one block (d first, then dmin / m)
HALF_SCALES = {
    T.Q8_0: [0],
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
    T.IQ2_XXS: [0],
    T.IQ4_XS: [0],
    T.IQ4_NL: [0],
    T.IQ2_XS: [0],
    T.IQ2_S: [0],
    T.IQ3_XXS: [0],
    T.IQ3_S: [0],
    T.IQ1_S: [0],
}
# IQ1_M keeps its fp16 scale in the top 4 bits of the four 16-bit words at these bytes, low nibble first
IQ1_M_SCALE_WORDS = 48
ADVERSARIAL_HALFS = [
    0x0000, 0x8000,          # +-0
    0x0001, 0x8001, 0x03FF,  # smallest and largest subnormals
    0x0400,                  # smallest normal
    0x3C00, 0xBC00,          # +-1
    0x7BFF, 0xFBFF,          # +-65504
    0x7C00, 0xFC00,          # +-inf
    0x7E00, 0x7C01, 0xFE01,  # NaNs, quiet and signalling
]
PAYLOADS = [0x00, 0xFF, 0x80, 0x7F, 0x55, None]  # None: random bytes

# round-trip relative RMSE on N(0, 1) and on Student-t(3) data: measured (0.297/0.356, 0.0714/0.0934,
# 0.0362/0.0464, 0.0177/0.0251, 0.0768/0.102, 0.343/0.545), bounds with ~10% margin; Q3_K 0.150/0.190, Q4_0
# 0.0863/0.128, Q4_1 0.0779/0.0993, Q5_0 0.0426/0.0651, Q5_1 0.0378/0.0480; IQ4_NL 0.0758/0.101, IQ2_XS
# 0.300/0.397, IQ2_S 0.265/0.399, IQ3_XXS 0.213/0.275, IQ3_S 0.166/0.216, IQ1_S 0.485/0.613, IQ1_M 0.586/0.593
# (IQ1_M's search without importance weighs errors by x^2 and gives the small values away)
RMSE_BOUNDS = {
    T.Q4_0: (0.095, 0.14),
    T.Q4_1: (0.086, 0.11),
    T.Q5_0: (0.047, 0.072),
    T.Q5_1: (0.042, 0.053),
    T.Q2_K: (0.33, 0.40),
    T.Q3_K: (0.165, 0.21),
    T.Q4_K: (0.080, 0.105),
    T.Q5_K: (0.040, 0.052),
    T.Q6_K: (0.020, 0.028),
    T.IQ4_XS: (0.085, 0.115),
    T.IQ2_XXS: (0.38, 0.60),
    T.IQ4_NL: (0.085, 0.115),
    T.IQ2_XS: (0.33, 0.44),
    T.IQ2_S: (0.29, 0.44),
    T.IQ3_XXS: (0.235, 0.30),
    T.IQ3_S: (0.185, 0.24),
    T.IQ1_S: (0.53, 0.67),
    T.IQ1_M: (0.65, 0.66),
}
# requantizing dequantized data: (bound on second/first pass RMSE, least share of identical blocks); measured
# (0.028, 0.99), (0.003, 0.998), (0.072, 0.937), (0.004, 0.999), (0.076, 0.942), (0.17, 0.0); Q3_K (0.20, 0.535);
# IQ4_NL (0.073, 0.939), IQ2_XS 0.242, IQ2_S 0.228, IQ3_XXS 0.120, IQ3_S 0.210, IQ1_S 0.277, IQ1_M 0.235 (no
# identical blocks)
REQUANT_BOUNDS = {
    T.Q2_K: (0.05, 0.97),
    T.Q3_K: (0.25, 0.45),
    T.Q4_K: (0.02, 0.98),
    T.Q5_K: (0.12, 0.88),
    T.Q6_K: (0.02, 0.98),
    T.IQ4_XS: (0.12, 0.88),
    T.IQ2_XXS: (0.25, 0.0),
    T.IQ4_NL: (0.12, 0.88),
    T.IQ2_XS: (0.30, 0.0),
    T.IQ2_S: (0.28, 0.0),
    T.IQ3_XXS: (0.15, 0.0),
    T.IQ3_S: (0.25, 0.0),
    T.IQ1_S: (0.33, 0.0),
    T.IQ1_M: (0.28, 0.0),
}

Q8_K_DTYPE = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])
Q8_1_DTYPE = np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", 32)])


def assert_bits_equal(got: np.ndarray, ref: np.ndarray) -> None:
    """Equal as float32 bit patterns; NaNs must sit at the same places (their payloads may differ)."""
    ref = np.ascontiguousarray(ref, dtype=np.float32).reshape(got.shape)
    got_nan, ref_nan = np.isnan(got), np.isnan(ref)
    np.testing.assert_array_equal(got_nan, ref_nan, err_msg="NaN positions differ")
    bad = got.view(np.uint32)[~got_nan] != ref.view(np.uint32)[~ref_nan]
    assert not bad.any(), (f"{bad.sum()} values differ, first: {got[~got_nan][bad][:4]} "
                           f"vs {ref[~ref_nan][bad][:4]}")


def gguf_dequantize(data: np.ndarray, qtype) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gq.dequantize(data, qtype)


def gguf_quantize(x: np.ndarray, qtype) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.ascontiguousarray(gq.quantize(x, qtype)).view(np.uint8).reshape(x.shape[0], -1)


def put_iq1_m_scale(block: np.ndarray, half: int) -> None:
    """Set the fp16 scale of IQ1_M blocks [..., 56], spread over the top nibbles of four 16-bit words."""
    words = block[..., IQ1_M_SCALE_WORDS:IQ1_M_SCALE_WORDS + 8].copy().view("<u2")
    for i in range(4):
        words[..., i] = (words[..., i] & 0x0FFF) | (((half >> (4 * i)) & 0xF) << 12)
    block[..., IQ1_M_SCALE_WORDS:IQ1_M_SCALE_WORDS + 8] = words.view(np.uint8)


def random_blocks(qtype, n_bytes: int, rng, half: int = 0x2E66) -> np.ndarray:
    """Random bytes in whole blocks of qtype with every fp16 scale field set to `half` (0.1): every grid point,
    sign pattern and sub-block scale code comes up, the values stay finite."""
    data = rng.integers(0, 256, n_bytes, dtype=np.uint8)
    per_block = data.reshape(-1, block_formats.block_bytes(qtype))
    if qtype == T.IQ1_M:
        put_iq1_m_scale(per_block, half)
    for off in HALF_SCALES.get(qtype, []):
        per_block[:, off:off + 2] = np.array([half], "<u2").view(np.uint8)
    return data


def adversarial_blocks(qtype, rng) -> np.ndarray:
    """Blocks whose scale fields run through zeros, subnormals, extremes, infinities and NaNs, over payloads
    of constant and random bytes; MXFP4 runs its e8m0 exponent over the edges instead."""
    size = block_formats.block_bytes(qtype)
    out = []
    for payload in PAYLOADS:
        base = rng.integers(0, 256, size, dtype=np.uint8) if payload is None else np.full(size, payload, np.uint8)
        if qtype == T.MXFP4:
            for e in (0, 1, 2, 126, 127, 128, 253, 254, 255):
                block = base.copy()
                block[0] = e
                out.append(block)
            continue
        if qtype == T.IQ1_M:
            for d in ADVERSARIAL_HALFS:
                block = base.copy()
                put_iq1_m_scale(block, d)
                out.append(block)
            continue
        offsets = HALF_SCALES[qtype]
        for d in ADVERSARIAL_HALFS:
            for dmin in (ADVERSARIAL_HALFS if len(offsets) == 2 else [None]):
                block = base.copy()
                block[offsets[0]:offsets[0] + 2] = np.array([d], "<u2").view(np.uint8)
                if dmin is not None:
                    block[offsets[1]:offsets[1] + 2] = np.array([dmin], "<u2").view(np.uint8)
                out.append(block)
    return np.stack(out)


# ---------------------------------------------------------------- dequantization


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_dequantize_random_bytes_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    data = rng.integers(0, 256, (64, 32 * block_formats.block_bytes(qtype)), dtype=np.uint8)
    got = block_formats.dequantize(data, qtype)
    assert got.shape == (64, 32 * block_formats.block_elems(qtype))
    assert_bits_equal(got, gguf_dequantize(data, qtype))


@pytest.mark.parametrize("qtype", [t for t in WEIGHT_TYPES if t in HALF_SCALES or t in (T.MXFP4, T.IQ1_M)],
                         ids=lambda t: t.name)
def test_dequantize_adversarial_blocks_matches_gguf(qtype):
    data = adversarial_blocks(qtype, np.random.default_rng(7))
    assert_bits_equal(block_formats.dequantize(data, qtype), gguf_dequantize(data, qtype))


@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_dequantize_every_16_bit_pattern(qtype):
    data = np.arange(65536, dtype="<u2").view(np.uint8)
    got = block_formats.dequantize(data, qtype)
    # payloads too: both keep NaNs as they are
    np.testing.assert_array_equal(got.view(np.uint32), gguf_dequantize(data, qtype).view(np.uint32))


def test_dequantize_f32_special_values():
    x = np.array([0.0, -0.0, 1e-45, -1e-45, 1.17e-38, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38], np.float32)
    np.testing.assert_array_equal(block_formats.dequantize(x.view(np.uint8), T.F32).view(np.uint32), x.view(np.uint32))


def test_dequantize_accepts_bytes_and_checks_n():
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 3 * 34, dtype=np.uint8)
    data[1::34] = 0x3C  # finite scales
    from_bytes = block_formats.dequantize(data.tobytes(), T.Q8_0, n=96)
    assert from_bytes.shape == (96,)
    assert_bits_equal(from_bytes, gguf_dequantize(data, T.Q8_0))


# ---------------------------------------------------------------- exact quantizers


def exact_inputs(kind: str, rng) -> np.ndarray:
    if kind == "random":
        scale = rng.choice(np.float32([1e-3, 1.0, 300.0]), (64, 1))
        return (rng.standard_normal((64, 256)) * scale).astype(np.float32)
    if kind == "zeros":
        x = np.zeros((4, 256), np.float32)
        x[1, ::7] = -0.0
        return x
    if kind == "huge":
        scale = rng.choice(np.float32([1e30, 3e38, 6e4]), (16, 1))
        return (rng.uniform(-1, 1, (16, 256)) * scale).astype(np.float32)
    if kind == "tiny":
        scale = rng.choice(np.float32([1e-30, 1e-40, 6e-8]), (16, 1))
        return (rng.uniform(-1, 1, (16, 256)) * scale).astype(np.float32)
    if kind == "powers":
        # every block's maximum at or just below a power of two, where floor(log2) decides the MXFP4 exponent
        peak = np.ldexp(np.float32(1), np.arange(-20, 20)).astype(np.float32)[:, None]
        x = (rng.uniform(-0.5, 0.5, (40, 256)) * peak).astype(np.float32)
        below = np.nextafter(peak, np.float32(0))
        x[:, ::32] = np.where(rng.random((40, 8)) < 0.5, peak, below) * rng.choice(np.float32([-1, 1]), (40, 8))
        return x
    raise ValueError(kind)


def without_zero_scale_signs(q: np.ndarray, qtype) -> np.ndarray:
    """q with every -0 scale field made +0."""
    q = q.copy()
    per_block = q.reshape(-1, block_formats.block_bytes(qtype))
    for off in HALF_SCALES[qtype]:
        field = per_block[:, off:off + 2].copy().view("<u2")
        field[field == 0x8000] = 0
        per_block[:, off:off + 2] = field.view(np.uint8)
    return q


@pytest.mark.parametrize("kind", ["random", "zeros", "huge", "tiny", "powers"])
@pytest.mark.parametrize("qtype", EXACT_QUANTIZERS, ids=lambda t: t.name)
def test_quantize_matches_gguf_bit_exactly(qtype, kind):
    x = exact_inputs(kind, np.random.default_rng(11))
    got, want = block_formats.quantize(x, qtype), gguf_quantize(x, qtype)
    if qtype in LEGACY and kind == "zeros":
        # gguf-py and ggml disagree on the sign of a zero scale: numpy's argmax, min and max pick whichever zero
        # comes first where ggml keeps its own start values. ggml wins (test_legacy_zero_blocks_keep_ggml_signs).
        got, want = without_zero_scale_signs(got, qtype), without_zero_scale_signs(want, qtype)
    np.testing.assert_array_equal(got, want)


def test_legacy_zero_blocks_keep_ggml_signs():
    """ggml's quantize_row_q4_0_ref / q5_0 divide its start value 0.0 by -8 / -16, so a zero block's d is -0
    whatever the signs of its zeros; q4_1 / q5_1 take min and max from the block's first value, so m has its
    sign and d = max - min is +0."""
    x = np.zeros((2, 32), np.float32)
    x[1, 0] = -0.0
    x[1, 5] = -0.0
    for qtype in (T.Q4_0, T.Q5_0):
        d = block_formats.quantize(x, qtype)[:, :2].copy().view("<u2")[:, 0]
        np.testing.assert_array_equal(d, [0x8000, 0x8000])
    for qtype in (T.Q4_1, T.Q5_1):
        dm = block_formats.quantize(x, qtype)[:, :4].copy().view("<u2")
        np.testing.assert_array_equal(dm, [[0x0000, 0x0000], [0x0000, 0x8000]])


def test_f16_conversion_rounds_like_numpy_on_bit_patterns():
    rng = np.random.default_rng(5)
    edges = np.float32([65504, 65519.99, 65520, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 2.0**-14,
                        2.0**-14 * (1 - 2.0**-11), 1 + 2.0**-11, 1 + 3 * 2.0**-11]).view(np.uint32)
    bits = np.concatenate([rng.integers(0, 2**32, 1 << 18, dtype=np.uint64).astype(np.uint32),
                           rng.integers(0x33000000, 0x47800000, 1 << 18, dtype=np.uint64).astype(np.uint32),
                           edges, edges | np.uint32(0x80000000),
                           np.uint32([0x7F800001, 0x7FC00000, 0xFF812345, 0x7F801FFF])])
    x = bits.view(np.float32)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
    np.testing.assert_array_equal(block_formats.quantize(x, T.F16).view(np.uint16), ref.view(np.uint16))


def test_bf16_conversion_matches_gguf_on_bit_patterns():
    rng = np.random.default_rng(6)
    bits = np.concatenate([rng.integers(0, 2**32, 1 << 18, dtype=np.uint64).astype(np.uint32),
                           np.uint32([0x7F7FFFFF, 0x7F7F8000, 0x3F808000, 0x3F818000, 0x7F800001, 0xFFFF0001])])
    x = bits.view(np.float32)[None, :]
    np.testing.assert_array_equal(block_formats.quantize(x, T.BF16), gguf_quantize(x, T.BF16))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.MXFP4, T.F16, T.BF16, *LEGACY], ids=lambda t: t.name)
def test_exact_formats_requantize_to_the_same_bytes(qtype):
    x = exact_inputs("random", np.random.default_rng(12))
    q = block_formats.quantize(x, qtype)
    np.testing.assert_array_equal(block_formats.quantize(block_formats.dequantize(q, qtype), qtype), q)


# ---------------------------------------------------------------- search quantizers (no gguf-py quantizer)


def lcg_inputs(rows: int, n: int, seed: int) -> np.ndarray:
    """Test data from integer arithmetic and exactly rounded float64 operations only, so the same bits on
    every platform: Gaussian-like rows (Irwin-Hall of 4), heavy-tailed rows, and rows whose 256-blocks are
    scaled by 2^-6..2^5."""
    state = np.arange(rows * n * 4, dtype=np.uint64) * np.uint64(6364136223846793005)
    state += np.uint64(seed * 1442695040888963407 % 2**64)
    state ^= state >> np.uint64(29)
    state *= np.uint64(0xBF58476D1CE4E5B9)
    state ^= state >> np.uint64(32)
    u = ((state >> np.uint64(40)).astype(np.float64) * 2.0**-24).reshape(rows, n, 4)
    gauss = u.sum(-1) - 2.0
    heavy = (u[..., 0] - 0.5) / (u[..., 1] + 2.0**-6)
    scale = np.ldexp(1.0, (u[:, ::256, 2] * 12).astype(int) - 6).repeat(256, axis=1)
    return np.concatenate([gauss, heavy, gauss * scale]).astype(np.float32)


def lcg_importance(n: int) -> np.ndarray:
    """A positive importance vector of n, the same bits on every platform: the mean square of lcg_inputs(8, n, 2)
    over its 24 rows (summed in order in float64) plus 2^-8; it spans about 0.07..180."""
    rows = lcg_inputs(8, n, 2).astype(np.float64)
    total = np.zeros(n)
    for row in rows:
        total = total + row * row
    return (total / len(rows) + 2.0**-8).astype(np.float32)


# sha256 of quantize_row_<t>_ref's output on lcg_inputs(8, 1024, 1), computed with ggml-quants.c of the
# llama.cpp vendored in llama_cpp_python 0.3.36 (built -O2, no FMA); IQ2_XXS through quantize_iq2_xxs with
# all-ones importance weights, since ggml has no quantizer for it without an imatrix. The legacy types and Q3_K
# through tools/ggml_oracle.py (that libggml's ggml_quantize_chunk), Q8_1 through its from_float_ref. The other
# i-quants through tools/ggml_oracle.py too (ggml_quantize_chunk without an importance matrix; IQ2_XS and IQ1_S,
# which ggml only quantizes with one, with all-ones weights like IQ2_XXS; IQ4_NL's chunk quantizer is its full
# search, not quantize_row_iq4_nl_ref, which GGML_FROM_FLOAT_REF_SHA256 pins)
GGML_REF_SHA256 = {
    T.Q4_0: "d3aed2cdbf84eb523eca25902730ad5ec0e16537712b9455015c776f72484b0e",
    T.Q4_1: "cec1c6c09cc9b3471cdfc389ce591c75c16d59f295a23c613b641ef2ec7be4df",
    T.Q5_0: "135595fbf467da880e8b6ef55d02fc07a96cd8fbe10b8bd64fc5505b06eb15b4",
    T.Q5_1: "d10adb8a13cd08684a7246c3794fec03da0889417d70830ab7725381364345e1",
    T.Q8_1: "c1c18453e430d1bd240c25dc91e4492accc5d7366e201367177ec27afbb362d7",
    T.Q3_K: "63cf3f1b8e373691308d8ad38fb07735b095496959449c17f1bd1eba2e9f7067",
    T.Q2_K: "9f47d3272247d4da0145fb7897d4eddd7ce82e9ac396c89aa6cc611d259d4176",
    T.Q4_K: "13e296708794b837b3fd38c25bded22063dbcdecf7a56dc9f8b89ed013f6b09f",
    T.Q5_K: "87d0037894ed0c32db14c64e4f08489d968d2c77d098d55101817207d7acb845",
    T.Q6_K: "ca8d15082d8cda2d926f9a34791a10b312d20c0aba8ed5146ee2061e1a6964a1",
    T.IQ4_XS: "07e6bb7940d0d00c580006630fe6784d6c923f83ba4c711cab697f3824b1c74d",
    T.Q8_K: "1c8102d74060593e72046be1b8e7549a35e25f7cf3ebc41020da99bbda1e121e",
    T.IQ2_XXS: "8439af38e66430d9bc501d8d4bf1f940656788170f045c305c9556081df9f7c7",
    T.IQ4_NL: "5877e2e828e89a65062daa8d8ab617d526960ca077394d745edf26d3b8f27be8",
    T.IQ2_XS: "e53f6e5bb3d6b1988e6ba61b251ce5a9017be4815e2c0392df4177c828e6d475",
    T.IQ2_S: "b12187013ad586c5c4ad0337dd533cfd5b4b4ef972f3d8433523c95afb5c3f48",
    T.IQ3_XXS: "e7f343c309d0e402d4d79f7cad05b14bd3cd8a94498cda366868a271707ac62c",
    T.IQ3_S: "710a20c0aa5d593843f9f4b9f747913aa94d349444e5fe7018f73ddeb28c1f9f",
    T.IQ1_S: "03e25081150987b51cc349d02b36725e069dcd8dc7181b783be531de70acae02",
    T.IQ1_M: "0336825fdbf37ce5f207082ef8484ed73a9eb12076ce64fc08245df7c9892cff",
}


# sha256 of ggml_quantize_chunk's output on lcg_inputs(8, 1024, 1) with the importance vector lcg_importance(1024)
# (ggml's quantize_<t> with quant_weights), through tools/ggml_oracle.py on the same libggml
GGML_IMPORTANCE_SHA256 = {
    T.IQ4_NL: "ec3c0994def483067e8424889d8a785b14a06b5027b8fb6a73802c7444fcc80e",
    T.IQ4_XS: "a7f8ae6a4a65642c4eb6074f2fc267aecdcad117fcc7ff3b5e7a7a6b4a1a0d05",
    T.IQ2_XXS: "0bc5c756ea1d78078d90d68c292db6130ba712402686ff6be0375e4f245312a8",
    T.IQ2_XS: "2d0737eb21e67f4af5bcfad16487f940b4b6aa0386bb3156ba57f27f57c2ba11",
    T.IQ2_S: "bbb791aeeece9d9fa5aa28b7b082f1fb57e0d68ef9e380caffe57d3cac705f31",
    T.IQ3_XXS: "ef145354310fa0cd00fb5ad880c7b908ef5059bc75fea8df235f778258563849",
    T.IQ3_S: "5eefa8656c735169e7e8156be503a2df1bf83fc481b56349bf9ae063268262a0",
    T.IQ1_S: "a447a76d39603f929ef16e23facf5c8a01c5234627c28d1c229dae06824f5191",
    T.IQ1_M: "247f928a8aa6b8c76560709f76ce594baf962a92d605ebc84a45f67d0d73c6c5",
}

# sha256 of ggml's from_float_ref (quantize_row_<t>_ref) row by row on lcg_inputs(8, 1024, 1) where it is not what
# ggml_quantize_chunk writes without importance: the core's fl_quantize
GGML_FROM_FLOAT_REF_SHA256 = {
    T.IQ4_NL: "0faa574016b43a8b7f76e86f104276ad109bee662a882bd03f51fdb4d821bdf3",
}


# sha256 of ggml_quantize_chunk's output on lcg_inputs(8, 1024, 1) with the importance vector lcg_importance(1024)
# (ggml's quantize_<t> with quant_weights), through tools/ggml_oracle.py on the same libggml
GGML_IMPORTANCE_SHA256 = {
    T.Q4_0: "ef99c73d20d8176331792e9b02d10249646be7d126d1be53d644d200a0962954",
    T.Q4_1: "6702ad6bec73b4a960cf82ff088443f30e726d2085a2a653692b5cd23c479a4b",
    T.Q5_0: "826d77e484b3b05532efdb305ddb3cac322b792c7d34a66875250bb56a9d8583",
    T.Q5_1: "a78e4cb367e72f561adc22a9aea684316ffc044b6f47515fe6d9af27ee585dde",
    T.Q2_K: "93b7bf5a12c9410b0974654810c3e33478bdeef8c4e3d1c07ee082778052527d",
    T.Q3_K: "a19e82885c948814e540d047c55f861d1501e5888a0b4c8e39f80b5c0519dd84",
    T.Q4_K: "ac0ab2d72cd46192a2532750aebbd9793bd4849d3f0695e9d2783b34cef07c2e",
    T.Q5_K: "bd3ea7bf44c2c8f78bab3462785540e0a76e18f6afb33a479d97e1df98dc406a",
    T.Q6_K: "323f66d0cfaf46f3d954b0bd7e4fa2fe33e8ebb79ed9bf855ab5d3dbf4138123",
}


@pytest.mark.parametrize("qtype", list(GGML_REF_SHA256), ids=lambda t: t.name)
def test_search_quantizers_write_the_bytes_llama_cpp_writes(qtype):
    x = lcg_inputs(8, 1024, 1)
    assert hashlib.sha256(x.tobytes()).hexdigest()[:16] == "00eb979c510c0bda", "test input changed"
    assert hashlib.sha256(block_formats.quantize(x, qtype).tobytes()).hexdigest() == GGML_REF_SHA256[qtype]


@pytest.mark.parametrize("qtype", list(GGML_IMPORTANCE_SHA256), ids=lambda t: t.name)
def test_importance_quantizers_write_the_bytes_llama_cpp_writes(qtype):
    x, importance = lcg_inputs(8, 1024, 1), lcg_importance(1024)
    assert hashlib.sha256(importance.tobytes()).hexdigest()[:16] == "9dc63d1a5ef954b6", "test input changed"
    q = block_formats.quantize(x, qtype, importance)
    assert hashlib.sha256(q.tobytes()).hexdigest() == GGML_IMPORTANCE_SHA256[qtype]
    assert not np.array_equal(q, block_formats.quantize(x, qtype)), "importance changed nothing"


def fl_quantize_rows_one_by_one(x: np.ndarray, qtype) -> np.ndarray:
    """The core's reference quantizer (fl_quantize, the traits' from_float) on each row of x."""
    out = np.zeros((x.shape[0], block_formats.row_bytes(qtype, x.shape[1])), np.uint8)
    for r in range(x.shape[0]):
        row = np.ascontiguousarray(x[r])
        assert lib.fl_quantize(int(qtype), ffi.from_buffer("float[]", row), ffi.from_buffer(out[r]), row.size) == 0
    return out


@pytest.mark.parametrize("qtype", list(GGML_FROM_FLOAT_REF_SHA256), ids=lambda t: t.name)
def test_reference_quantizers_write_ggml_ref_bytes(qtype):
    q = fl_quantize_rows_one_by_one(lcg_inputs(8, 1024, 1), qtype)
    assert hashlib.sha256(q.tobytes()).hexdigest() == GGML_FROM_FLOAT_REF_SHA256[qtype]


@pytest.mark.parametrize("qtype", [T.IQ4_XS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M],
                         ids=lambda t: t.name)
def test_reference_quantizer_is_the_search_without_importance(qtype):
    """fl_quantize and fl_quantize_rows without importance write the same bytes wherever ggml's reference is its
    chunk quantizer without an imatrix (or, for the types that need one, the search with unit weights)."""
    x = lcg_inputs(2, 512, 3)
    np.testing.assert_array_equal(fl_quantize_rows_one_by_one(x, qtype), block_formats.quantize(x, qtype))
    if qtype in IMATRIX_ONLY:
        np.testing.assert_array_equal(block_formats.quantize(x, qtype),
                                      block_formats.quantize(x, qtype, np.ones(512, np.float32)))


def test_iq4_nl_zero_blocks_keep_ggml_bytes():
    """A block of 32 that is all but zero gets scale 0; ggml's quantize_row_iq4_nl_ref leaves the levels its array
    held from the block before it (the search requantizes them to 1, the index of the value nearest 0)."""
    x = np.random.default_rng(8).standard_normal((1, 128)).astype(np.float32)
    x[0, 32:64] = 0
    ref = fl_quantize_rows_one_by_one(x, T.IQ4_NL).reshape(4, 18)
    np.testing.assert_array_equal(ref[1, :2], [0, 0])
    np.testing.assert_array_equal(ref[1, 2:], ref[0, 2:])
    full = block_formats.quantize(x, T.IQ4_NL).reshape(4, 18)
    np.testing.assert_array_equal(full[1], [0, 0] + [0x88] * 16)


@pytest.mark.parametrize("qtype", IMPORTANCE_QUANTIZERS, ids=lambda t: t.name)
def test_importance_lowers_the_weighted_error(qtype):
    """With importance the search trades error on unimportant elements for error on important ones: the
    importance-weighted error comes out below the reference quantizer's. Measured ratios 0.54..0.79, the
    i-quants 0.35 (IQ3_XXS) to 0.81 (IQ4_NL, IQ4_XS)."""
    rng = np.random.default_rng(24)
    x = rng.standard_normal((32, 2048)).astype(np.float32)
    importance = (rng.random(2048) ** 4 + 1e-3).astype(np.float32)

    def weighted_error(q):
        return np.sum(importance * (block_formats.dequantize(q, qtype) - x) ** 2)

    assert (weighted_error(block_formats.quantize(x, qtype, importance))
            < 0.87 * weighted_error(block_formats.quantize(x, qtype)))


@pytest.mark.parametrize("qtype", ROUND_TRIP, ids=lambda t: t.name)
def test_round_trip_error_within_bounds(qtype):
    rng = np.random.default_rng(21)
    gauss_bound, heavy_bound = RMSE_BOUNDS[qtype]
    for x, bound in ((rng.standard_normal((32, 2048)), gauss_bound), (rng.standard_t(3, (32, 2048)), heavy_bound)):
        x = x.astype(np.float32)
        y = block_formats.dequantize(block_formats.quantize(x, qtype), qtype)
        assert_bits_equal(y, gguf_dequantize(block_formats.quantize(x, qtype), qtype))
        rel = np.sqrt(np.mean((y.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2))
        assert rel < bound, f"{qtype.name}: relative RMSE {rel:.4f} >= {bound}"


@pytest.mark.parametrize("qtype", ROUND_TRIP, ids=lambda t: t.name)
def test_round_trip_error_scales_with_each_block(qtype):
    """Blocks 1e-2 and 1e4 apart each keep their own relative error: scales are per block, not per row.
    (Much smaller blocks lose precision by design: their fp16 super-block scales go subnormal.)"""
    rng = np.random.default_rng(22)
    x = rng.standard_normal((8, 2048)).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-2, 5, (8, 8)).repeat(256, axis=1).astype(np.float32)
    y = block_formats.dequantize(block_formats.quantize(x, qtype), qtype)
    err = ((y - x) ** 2).reshape(-1, 256).sum(1) / (x ** 2).reshape(-1, 256).sum(1)
    assert np.sqrt(err.max()) < 2.0 * RMSE_BOUNDS[qtype][1]


@pytest.mark.parametrize("qtype", SEARCH_QUANTIZERS, ids=lambda t: t.name)
def test_requantizing_dequantized_blocks_is_nearly_idempotent(qtype):
    """The searches need not land on the same grid twice, but a second pass must lose far less than the first."""
    rng = np.random.default_rng(23)
    x = rng.standard_normal((64, 2048)).astype(np.float32)
    y = block_formats.dequantize(block_formats.quantize(x, qtype), qtype)
    z = block_formats.dequantize(block_formats.quantize(y, qtype), qtype)
    first = np.sqrt(np.mean((y - x) ** 2))
    second = np.sqrt(np.mean((z - y) ** 2))
    ratio_bound, identical_share = REQUANT_BOUNDS[qtype]
    assert second < ratio_bound * first
    assert (y.reshape(-1, 256) == z.reshape(-1, 256)).all(1).mean() >= identical_share


@pytest.mark.parametrize("qtype", ROUND_TRIP, ids=lambda t: t.name)
def test_search_quantizers_on_edge_blocks(qtype):
    """All-zero blocks give zero; constant, one-hot and sign-alternating blocks come back close."""
    x = np.zeros((4, 256), np.float32)
    x[1] = 0.37
    x[2, 5] = -3.0
    x[3] = np.where(np.arange(256) % 2, 1.0, -1.0)
    y = block_formats.dequantize(block_formats.quantize(x, qtype), qtype)
    assert not np.any(y[0])
    # measured worst relative errors 3e-4, 1e-3, 6e-4, 3e-4, 0.061, 0.70: the IQ2_XXS lattice has no point with
    # 8 equal middle magnitudes, so a constant block comes back as a mix of its neighbours. Q4_0 / Q5_0 map the
    # first of the largest magnitudes, here -1, to -8 d / -16 d and have no +8 d / +16 d for +1: 0.125, 0.0625;
    # Q3_K 0.16, Q4_1 / Q5_1 5e-4. IQ4_NL 0.020, IQ2_XS 0.19, IQ2_S 0.20, IQ3_XXS 0.28, IQ3_S 0.080, IQ1_S 0.12
    # (the one-hot block: a lone value against the grid); IQ1_M 1.11: its search without importance weighs errors
    # by x^2, so the zeros of the one-hot block weigh nothing and may come back as anything on the grid (+-1.125
    # times the scale), as in ggml
    tol = {T.Q2_K: 0.01, T.Q4_K: 0.01, T.Q5_K: 0.01, T.Q6_K: 0.01, T.IQ4_XS: 0.08, T.IQ2_XXS: 0.75, T.Q3_K: 0.18,
           T.Q4_0: 0.13, T.Q4_1: 0.01, T.Q5_0: 0.07, T.Q5_1: 0.01, T.IQ4_NL: 0.03, T.IQ2_XS: 0.22, T.IQ2_S: 0.22,
           T.IQ3_XXS: 0.31, T.IQ3_S: 0.10, T.IQ1_S: 0.14, T.IQ1_M: 1.2}[qtype]
    np.testing.assert_allclose(y[1:], x[1:], atol=tol * np.abs(x[1:]).max())


ALL_QUANTIZERS = [*WEIGHT_TYPES, T.Q8_K, T.Q8_1]


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("qtype", ALL_QUANTIZERS, ids=lambda t: t.name)
def test_quantizers_survive_non_finite_and_extreme_input(qtype, weighted):
    """Garbage in, blocks out: NaN, infinities, float32 extremes and subnormals give well-formed blocks
    (finite blocks stay exactly as they are) instead of a crash or an out-of-range table read; with an
    importance vector too, zeros and extremes included."""
    rng = np.random.default_rng(51)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    x[0, 3] = np.nan
    x[1, 7] = np.inf
    x[2, ::2] = -np.inf
    x[3] = np.float32(3.4e38) * np.sign(x[3])
    x[4] = np.float32(1e-45) * np.sign(x[4])
    importance = None
    if weighted:
        importance = rng.random(256).astype(np.float32)
        importance[::5] = 0
        importance[1::17] = 3e38
        importance[2::19] = 1e-45
    q = block_formats.quantize(x, qtype, importance)
    assert q.shape == (6, block_formats.row_bytes(qtype, 256))
    clean = block_formats.quantize(x[5:], qtype, importance)
    np.testing.assert_array_equal(q[5:], clean)
    with np.errstate(all="ignore"):
        block_formats.dequantize(q, qtype)


# ---------------------------------------------------------------- Q8_K activations


def q8_k_numpy(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_K_ref in numpy: the largest magnitude maps to -127, round half to even (nearest_int)."""
    out = np.zeros(x.shape[0], Q8_K_DTYPE)
    for i, row in enumerate(x):
        big = row[np.argmax(np.abs(row))]
        if big == 0:
            continue
        iscale = np.float32(-127.0) / big
        qs = np.minimum(np.rint(iscale * row), 127).astype(np.int8)
        out[i]["qs"] = qs
        out[i]["bsums"] = qs.reshape(16, 16).astype(np.int32).sum(1)
        out[i]["d"] = np.float32(1.0) / iscale
    return out


def test_q8_k_matches_numpy_reference_and_bsums():
    rng = np.random.default_rng(31)
    x = (rng.standard_normal((40, 256)) * rng.choice(np.float32([1e-20, 1.0, 1e20]), (40, 1))).astype(np.float32)
    x[3] = 0.0
    x[4] = -2.5  # every value is the extreme one
    got = block_formats.quantize(x, T.Q8_K).reshape(-1).view(Q8_K_DTYPE)
    ref = q8_k_numpy(x)
    np.testing.assert_array_equal(got["qs"], ref["qs"])
    np.testing.assert_array_equal(got["d"].view(np.uint32), ref["d"].view(np.uint32))
    np.testing.assert_array_equal(got["bsums"], got["qs"].reshape(-1, 16, 16).astype(np.int32).sum(2))
    assert got["qs"].min() >= -128 and got["qs"].max() <= 127
    deq = block_formats.dequantize(block_formats.quantize(x, T.Q8_K), T.Q8_K)
    np.testing.assert_array_equal(deq, got["d"][:, None] * got["qs"].astype(np.float32))


# ---------------------------------------------------------------- Q8_1 activations


@pytest.mark.parametrize("kind", ["random", "zeros", "huge", "tiny"])
def test_q8_1_is_q8_0_with_block_sums(kind):
    """quantize_row_q8_1_ref: d and qs exactly as Q8_0's (gguf-py's quantizer), and s = d * sum(qs) with d before
    its rounding to fp16, rounded to fp16."""
    x = exact_inputs(kind, np.random.default_rng(32))
    got = block_formats.quantize(x, T.Q8_1).reshape(-1).view(Q8_1_DTYPE)
    q8_0 = gguf_quantize(x, T.Q8_0).reshape(-1, 34)
    np.testing.assert_array_equal(got["d"].view("<u2"), q8_0[:, :2].copy().view("<u2")[:, 0])
    np.testing.assert_array_equal(got["qs"], q8_0[:, 2:].view(np.int8))
    d = np.abs(x.reshape(-1, 32)).max(1) / np.float32(127)
    with np.errstate(over="ignore"):
        s = (got["qs"].astype(np.int32).sum(1).astype(np.float32) * d).astype(np.float16)
    np.testing.assert_array_equal(got["s"].view("<u2"), s.view("<u2"))
    deq = block_formats.dequantize(block_formats.quantize(x, T.Q8_1), T.Q8_1).reshape(-1, 32)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(deq, got["qs"].astype(np.float32) * got["d"].astype(np.float32)[:, None])


# ---------------------------------------------------------------- reference dots


def q8_1_min_term(qtype, w_row: np.ndarray, act_row: np.ndarray) -> float:
    """Q4_1 / Q5_1 dots add each weight block's min m times the activation block's s = d * sum(q) rounded to fp16,
    where the float64 dot of the dequantized rows has the exact sum: the difference, to add to that dot."""
    if qtype not in Q8_1_ACT:
        return 0.0
    m = w_row.reshape(-1, block_formats.block_bytes(qtype))[:, 2:4].copy().view("<f2")[:, 0].astype(np.float64)
    a = act_row.view(Q8_1_DTYPE)
    exact = a["d"].astype(np.float64) * a["qs"].astype(np.int64).sum(1)
    return float(np.sum(m * (a["s"].astype(np.float64) - exact)))


def vec_dot_ref(qtype, w_row: np.ndarray, act_row: np.ndarray, n: int) -> float:
    s = ffi.new("float *")
    status = lib.fl_vec_dot_ref(int(qtype), ffi.from_buffer(w_row), ffi.from_buffer(act_row), n, s)
    assert status == lib.FL_OK
    return s[0]


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_vec_dot_ref_matches_float64_dot_of_dequantized_rows(qtype):
    rng = np.random.default_rng(41)
    n = 2048
    act_type = lib.fl_type_act_type(int(qtype))
    assert act_type == {T.F32: T.F32, T.F16: T.F32, T.BF16: T.F32, T.Q8_0: T.Q8_0, T.MXFP4: T.Q8_0, T.Q4_0: T.Q8_0,
                        T.Q5_0: T.Q8_0, T.Q4_1: T.Q8_1, T.Q5_1: T.Q8_1, T.IQ4_NL: T.Q8_0}.get(qtype, T.Q8_K)
    for trial in range(8):
        x = rng.standard_normal(n).astype(np.float32)
        if qtype in IQ_TYPES and trial % 2:  # random blocks reach every grid point, sign pattern and scale code
            w = random_blocks(qtype, block_formats.row_bytes(qtype, n), rng)
        else:
            w = block_formats.quantize(rng.standard_normal(n).astype(np.float32), qtype)
        a = block_formats.quantize(x, act_type)
        wf = block_formats.dequantize(w, qtype).astype(np.float64)
        af = block_formats.dequantize(a, act_type).astype(np.float64)
        exact = float(wf @ af) + q8_1_min_term(qtype, w, a)
        scale = float(np.abs(wf) @ np.abs(af))
        # float32 accumulation over blocks: measured <= 2.1e-8 of sum |w*a| over 50 rows per type
        assert abs(vec_dot_ref(qtype, w, a, n) - exact) <= 2e-7 * scale, (trial, exact)


# ---------------------------------------------------------------- against ggml itself (skipped without libggml)


def random_rows(rng, rows: int = 12, n: int = 1024) -> np.ndarray:
    """Gaussian rows at three scales and heavy-tailed ones."""
    x = rng.standard_normal((rows, n)) * rng.choice([1e-3, 1.0, 300.0], (rows, 1))
    x[::3] = rng.standard_t(3, (len(x[::3]), n))
    return x.astype(np.float32)


def awkward_rows(rng, n: int = 1024) -> np.ndarray:
    """Rows where the searches meet ties and skipped groups: small integers and quarter steps (equal values for
    IQ1's sorts), exact zeros over whole groups of 16 and 32 (IQ3_S's shifted write positions, IQ4_NL's kept
    levels), a constant row, one-hot groups, values down at 1e-9 and 1e-30 and up at 1e4."""
    x = np.stack([rng.integers(-3, 4, n), np.round(rng.standard_normal(n) * 4) / 4, rng.standard_normal(n),
                  np.full(n, 0.37), rng.standard_normal(n), rng.standard_normal(n) * 1e-9,
                  rng.standard_normal(n) * 1e-30, rng.standard_normal(n) * 1e4]).astype(np.float32)
    x[2, 32:64] = 0
    x[2, 256 + 16:256 + 32] = 0
    x[2, 512:768] = 0
    x[4] = 0
    x[4, ::37] = rng.standard_normal(len(x[4, ::37]))
    return x


@needs_ggml
@pytest.mark.parametrize("qtype", IMPORTANCE_QUANTIZERS, ids=lambda t: t.name)
def test_quantizers_match_ggml_on_random_data(qtype):
    """Without importance against ggml_quantize_chunk without an imatrix (with all-ones weights for the types that
    need one), with importance against it with that importance vector."""
    rng = np.random.default_rng(70 + int(qtype))
    x = np.concatenate([random_rows(rng), awkward_rows(rng)])
    importance = (rng.random(x.shape[1]) ** 3 + 1e-3).astype(np.float32)
    importance[::11] = 0
    plain = np.ones(x.shape[1], np.float32) if qtype in IMATRIX_ONLY else None
    np.testing.assert_array_equal(block_formats.quantize(x, qtype), ggml_quantize(qtype.name, x, plain))
    np.testing.assert_array_equal(block_formats.quantize(x, qtype, importance),
                                  ggml_quantize(qtype.name, x, importance))


@needs_ggml
@pytest.mark.parametrize("qtype", IMPORTANCE_QUANTIZERS, ids=lambda t: t.name)
def test_dequantize_matches_ggml_on_random_bytes(qtype):
    """Random bytes, scale fields included: NaN and infinity come out where ggml's do."""
    rng = np.random.default_rng(80 + int(qtype))
    data = rng.integers(0, 256, (8, block_formats.row_bytes(qtype, 1024)), dtype=np.uint8)
    with np.errstate(all="ignore"):
        assert_bits_equal(block_formats.dequantize(data, qtype), ggml_dequantize(qtype.name, data))


@needs_ggml
@pytest.mark.parametrize("qtype", IMPORTANCE_QUANTIZERS, ids=lambda t: t.name)
def test_vec_dot_ref_matches_ggml(qtype):
    """ggml's dot (its SIMD kernel where it has one, after its own activation quantizer) against the generic one
    here, on quantized rows and on random blocks. Activations that are whole multiples of a power of two with a
    +-127 in every block quantize exactly in both, so only the order of the sums differs (measured <= 3.5e-8 of
    sum |w*a|); plain random ones also differ where ggml's SIMD quantizer rounds a tie or the scale's reciprocal
    otherwise (measured <= 6.8e-8)."""
    rng = np.random.default_rng(90 + int(qtype))
    n = 1024
    act_type = lib.fl_type_act_type(int(qtype))
    w = np.concatenate([block_formats.quantize(rng.standard_normal((4, n)).astype(np.float32), qtype),
                        random_blocks(qtype, 2 * block_formats.row_bytes(qtype, n), rng).reshape(2, -1)])
    exact = rng.integers(-127, 128, (3, n)).astype(np.float32)
    exact.reshape(3, -1, 32)[:, :, 0] = 127 * rng.choice([-1, 1], (3, n // 32))
    exact *= np.float32(2.0) ** rng.integers(-3, 4, (3, 1)).astype(np.float32)
    for x, bound in ((exact, 1e-7), (rng.standard_normal((3, n)).astype(np.float32), 1e-6)):
        theirs = ggml_dot(qtype.name, w, x)
        for t in range(len(x)):
            a = block_formats.quantize(x[t], act_type)
            af = np.abs(block_formats.dequantize(a, act_type).astype(np.float64))
            for r in range(len(w)):
                scale = float(np.abs(block_formats.dequantize(w[r], qtype).astype(np.float64)) @ af)
                assert abs(vec_dot_ref(qtype, w[r], a, n) - theirs[r, t]) <= bound * scale, (r, t)


def test_vec_dot_ref_rejects_activation_only_and_unknown_types():
    s = ffi.new("float *")
    buf = ffi.new("char[]", 4096)
    assert lib.fl_vec_dot_ref(int(T.Q8_K), buf, buf, 256, s) == lib.FL_ETYPE
    assert lib.fl_vec_dot_ref(int(T.Q8_1), buf, buf, 32, s) == lib.FL_ETYPE
    assert lib.fl_vec_dot_ref(4, buf, buf, 32, s) == lib.FL_ETYPE  # an id ggml does not use
    assert lib.fl_vec_dot_ref(int(T.Q8_0), buf, buf, 33, s) == lib.FL_EINVAL


# ---------------------------------------------------------------- shapes and errors


def test_row_bytes_and_shapes():
    assert block_formats.row_bytes(T.Q4_K, 512) == 288
    assert block_formats.row_bytes(int(T.F16), 3) == 6
    assert block_formats.row_bytes(T.MXFP4, 64) == 34
    assert block_formats.row_bytes(T.IQ2_XXS, 256) == 66
    assert block_formats.row_bytes(T.IQ4_NL, 64) == 36 and block_formats.row_bytes(T.IQ1_M, 256) == 56
    for qtype in WEIGHT_TYPES:
        assert block_formats.row_bytes(qtype, 256) == gq.quant_shape_to_byte_shape((256,), qtype)[0]
    x = np.random.default_rng(0).standard_normal((3, 2, 512)).astype(np.float32)
    q = block_formats.quantize(x, T.Q6_K)
    assert q.shape == (3, 2, 420) and q.dtype == np.uint8
    assert block_formats.dequantize(q, T.Q6_K).shape == (3, 2, 512)
    np.testing.assert_array_equal(block_formats.quantize(x, T.F32).view(np.float32), x)


def test_bad_arguments_raise_naming_the_argument():
    x = np.zeros(512, np.float32)
    data = np.zeros(288, np.uint8)
    with pytest.raises(ValueError, match="data"):
        block_formats.dequantize(data[:100], T.Q4_K)
    with pytest.raises(TypeError, match="data"):
        block_formats.dequantize(data.view(np.int8), T.Q4_K)
    with pytest.raises(TypeError, match="data"):
        block_formats.dequantize(list(data), T.Q4_K)
    with pytest.raises(ValueError, match="data"):
        block_formats.dequantize(np.zeros((288, 2), np.uint8)[:, 0], T.Q4_K)
    with pytest.raises(ValueError, match="n"):
        block_formats.dequantize(data, T.Q4_K, n=256)
    with pytest.raises(ValueError, match="qtype"):
        block_formats.dequantize(data, 4)  # an id ggml does not use (was Q4_2)
    with pytest.raises(ValueError, match="qtype"):
        block_formats.dequantize(data, 999)
    with pytest.raises(TypeError, match="qtype"):
        block_formats.dequantize(data, "q4_K")
    with pytest.raises(TypeError, match="x"):
        block_formats.quantize(x.astype(np.float64), T.Q4_K)
    with pytest.raises(ValueError, match="x"):
        block_formats.quantize(x[:100], T.Q4_K)
    with pytest.raises(ValueError, match="x"):
        block_formats.quantize(x[::2], T.Q8_0)
    with pytest.raises(ValueError, match="n"):
        block_formats.row_bytes(T.Q4_K, 100)


def test_c_entry_points_validate_arguments():
    src = ffi.new("char[]", 1024)
    dst = ffi.new("float[]", 256)
    assert lib.fl_dequantize(999, src, dst, 32) == lib.FL_ETYPE
    assert lib.fl_dequantize(-1, src, dst, 32) == lib.FL_ETYPE
    assert lib.fl_dequantize(int(T.Q8_0), src, dst, 33) == lib.FL_EINVAL
    assert lib.fl_dequantize(int(T.Q8_0), src, dst, -32) == lib.FL_EINVAL
    assert lib.fl_dequantize(int(T.Q8_0), ffi.NULL, dst, 32) == lib.FL_EINVAL
    assert lib.fl_quantize(int(T.Q8_0), dst, src, 16) == lib.FL_EINVAL
    assert lib.fl_quantize(int(T.Q8_0), dst, src, 0) == lib.FL_OK
    assert lib.fl_row_bytes(999, 32) == -1 and lib.fl_row_bytes(int(T.Q8_0), 31) == -1
    assert lib.fl_type_block_elems(4) == 0 and lib.fl_type_block_bytes(999) == 0
