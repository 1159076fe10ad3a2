"""The small block formats without a scale search: NVFP4, Q1_0, Q2_0 (Q8_0 activations), TQ1_0, TQ2_0 (Q8_K).

gguf-py 0.19.0 dequantizes NVFP4, TQ1_0 and TQ2_0 (and quantizes the two ternary types): those must match it bit
for bit. It knows Q1_0's id but cannot dequantize it, and does not know Q2_0 (id 42) at all, so for those two ggml
is the reference: its bytes are pinned by hashes in CI, numpy restates the value formulas, and where llama.cpp's
libggml is at hand (FLASHLITE_LLAMACPP_PYTHON, see tests/ggml_oracle.py) everything is compared with it directly.
ggml's quantize_<t> ignores importance weights for all five, so the core's quantizers do too.
"""
import hashlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gq
from ggml_oracle import dequantize as ggml_dequantize
from ggml_oracle import dot as ggml_dot
from ggml_oracle import needs_ggml
from ggml_oracle import quantize as ggml_quantize
from test_block_formats import (ADVERSARIAL_HALFS, PAYLOADS, assert_bits_equal, exact_inputs, gguf_dequantize,
                                gguf_quantize, lcg_importance, lcg_inputs, vec_dot_ref)

from flashlite import block_formats
from flashlite._native import lib


class GGMLType(int):
    """A ggml type id that gguf-py's GGMLQuantizationType lacks, with the .name tests print."""

    def __new__(cls, value: int, name: str):
        obj = super().__new__(cls, value)
        obj.name = name
        return obj

    def __repr__(self):
        return self.name


Q2_0 = GGMLType(42, "Q2_0")
SMALL = [T.NVFP4, T.Q1_0, Q2_0, T.TQ1_0, T.TQ2_0]
GGUF_DEQUANT = [T.NVFP4, T.TQ1_0, T.TQ2_0]
GGUF_QUANT = [T.TQ1_0, T.TQ2_0]
ACT = {T.NVFP4: T.Q8_0, T.Q1_0: T.Q8_0, Q2_0: T.Q8_0, T.TQ1_0: T.Q8_K, T.TQ2_0: T.Q8_K}
# byte offset of the fp16 scale d in one block (NVFP4 has four UE4M3 bytes at 0..3 instead)
HALF_SCALE = {T.Q1_0: 0, Q2_0: 0, T.TQ1_0: 52, T.TQ2_0: 64}
KVALUES_FP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)

ids = lambda t: t.name  # noqa: E731


def adversarial_small_blocks(qtype, rng) -> np.ndarray:
    """Over constant and random payloads: for NVFP4 every UE4M3 byte value (0x7F and 0xFF, the E4M3 NaN
    patterns, included) in each of the four scale positions, the other three random; for the others the fp16
    scale through zeros, subnormals, extremes, infinities and NaNs."""
    size = block_formats.block_bytes(qtype)
    out = []
    for payload in PAYLOADS:
        base = rng.integers(0, 256, size, dtype=np.uint8) if payload is None else np.full(size, payload, np.uint8)
        if qtype == T.NVFP4:
            for pos in range(4):
                block = np.tile(base, (256, 1))
                block[:, :4] = rng.integers(0, 256, (256, 4), dtype=np.uint8)
                block[:, pos] = np.arange(256)
                out.append(block)
            continue
        block = np.tile(base, (len(ADVERSARIAL_HALFS), 1))
        off = HALF_SCALE[qtype]
        block[:, off:off + 2] = np.array(ADVERSARIAL_HALFS, "<u2").view(np.uint8).reshape(-1, 2)
        out.append(block)
    return np.concatenate(out)


def numpy_dequantize(data: np.ndarray, qtype) -> np.ndarray:
    """Q1_0 and Q2_0 restated from their layout in quants.h: a sign bit per weight (least significant first) times
    d, and d * (q - 1) for 2-bit q."""
    blk = data.reshape(-1, block_formats.block_bytes(qtype))
    d = blk[:, :2].copy().view(np.float16).astype(np.float32)
    if qtype == T.Q1_0:
        bits = np.unpackbits(blk[:, 2:], axis=1, bitorder="little")
        return np.where(bits == 1, d, -d).reshape(data.shape[0], -1)
    q = (blk[:, 2:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
    with np.errstate(invalid="ignore"):
        return ((q.reshape(len(blk), -1).astype(np.float32) - 1) * d).reshape(data.shape[0], -1)


# ---------------------------------------------------------------- dequantization


@pytest.mark.parametrize("qtype", GGUF_DEQUANT, ids=ids)
def test_dequantize_random_bytes_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    data = rng.integers(0, 256, (64, 32 * block_formats.block_bytes(qtype)), dtype=np.uint8)
    assert_bits_equal(block_formats.dequantize(data, qtype), gguf_dequantize(data, qtype))


@pytest.mark.parametrize("qtype", GGUF_DEQUANT, ids=ids)
def test_dequantize_adversarial_blocks_matches_gguf(qtype):
    data = adversarial_small_blocks(qtype, np.random.default_rng(7))
    assert_bits_equal(block_formats.dequantize(data, qtype), gguf_dequantize(data, qtype))


@pytest.mark.parametrize("qtype", [T.Q1_0, Q2_0], ids=ids)
def test_dequantize_matches_the_layout_in_numpy(qtype):
    rng = np.random.default_rng(60 + int(qtype))
    data = np.concatenate([rng.integers(0, 256, (64, block_formats.block_bytes(qtype)), dtype=np.uint8),
                           adversarial_small_blocks(qtype, rng)])
    with np.errstate(invalid="ignore"):
        assert_bits_equal(block_formats.dequantize(data, qtype), numpy_dequantize(data, qtype))


def test_nvfp4_scale_byte_values():
    """Code 2 (the e2m1 value 1.0) reads back each scale byte's own value: (1 + m/8) 2^(e-7) with 4 exponent
    bits, m 2^-9 for e = 0; the top bit is ignored except that 0x7F reads 0 (and 0xFF, 480, does not)."""
    data = np.full((256, 36), 0x22, np.uint8)
    data[:, :4] = np.arange(256)[:, None]
    got = block_formats.dequantize(data, T.NVFP4)
    b = np.arange(256)
    e, m = (b >> 3) & 15, (b & 7).astype(np.float64)
    want = np.where(e == 0, m * 2.0**-9, (1 + m / 8) * 2.0 ** (e - 7.0))
    want[0x7F] = 0
    np.testing.assert_array_equal(got, np.repeat(want[:, None], 64, axis=1).astype(np.float32))
    assert got[0xFF, 0] == 480 and got[0x7E, 0] == 448 and got[0x01, 0] == 2.0**-9


# sha256 of ggml's dequantize_row_<t> on adversarial_small_blocks(t, default_rng(7)) with every NaN made the same
# NaN, through tools/ggml_oracle.py (llama.cpp of llama_cpp_python 0.3.36): Q1_0 and Q2_0 have no gguf-py reference
GGML_DEQUANT_SHA256 = {
    T.Q1_0: "8dae5cb3008c2a245e307d89389d4f121d385c393156a654a9818e8c7b27cf78",
    Q2_0: "f466e1239b97003462ff0b0ab920834b9635ded60bbb81478bb4250f6b382dbb",
}


def canonical_bits(y: np.ndarray) -> bytes:
    return np.where(np.isnan(y), np.float32(np.nan), y).astype(np.float32).tobytes()


@pytest.mark.parametrize("qtype", list(GGML_DEQUANT_SHA256), ids=ids)
def test_dequantize_gives_the_values_ggml_gives(qtype):
    data = adversarial_small_blocks(qtype, np.random.default_rng(7))
    got = hashlib.sha256(canonical_bits(block_formats.dequantize(data, qtype))).hexdigest()
    assert got == GGML_DEQUANT_SHA256[qtype]


@needs_ggml
@pytest.mark.parametrize("qtype", SMALL, ids=ids)
def test_dequantize_matches_ggml(qtype):
    rng = np.random.default_rng(80 + int(qtype))
    for data in (rng.integers(0, 256, (8, block_formats.row_bytes(qtype, 1024)), dtype=np.uint8),
                 adversarial_small_blocks(qtype, np.random.default_rng(7))):
        with np.errstate(all="ignore"):
            assert_bits_equal(block_formats.dequantize(data, qtype), ggml_dequantize(qtype.name, data))


# ---------------------------------------------------------------- quantization


@pytest.mark.parametrize("kind", ["random", "zeros", "huge", "tiny", "powers"])
@pytest.mark.parametrize("qtype", GGUF_QUANT, ids=ids)
def test_ternary_quantize_matches_gguf_bit_exactly(qtype, kind):
    x = exact_inputs(kind, np.random.default_rng(11))
    np.testing.assert_array_equal(block_formats.quantize(x, qtype), gguf_quantize(x, qtype))


def nvfp4_numpy(x: np.ndarray) -> np.ndarray:
    """quantize_row_nvfp4_ref from gguf-py's UE4M3 conversions: per 16 values the scale byte of amax / 6, then the
    first nearest doubled e2m1 value at half that scale (numpy's argmin keeps the first, as ggml does)."""
    sub = x.reshape(-1, 16)
    ue = gq.NVFP4.fp32_to_ue4m3(np.abs(sub).max(1) / np.float32(6))
    d = gq.NVFP4.ue4m3_to_fp32(ue).astype(np.float32)
    codes = np.argmin(np.abs(KVALUES_FP4 * d[:, None, None] - sub[:, :, None]), axis=-1).astype(np.uint8)
    qs = codes[:, :8] | (codes[:, 8:] << 4)
    return np.concatenate([ue.reshape(-1, 4), qs.reshape(-1, 32)], axis=1).reshape(x.shape[0], -1)


@pytest.mark.parametrize("kind", ["random", "zeros", "huge", "tiny", "powers"])
def test_nvfp4_quantize_matches_numpy_from_gguf_conversions(kind):
    x = exact_inputs(kind, np.random.default_rng(11))
    with np.errstate(all="ignore"):
        want = nvfp4_numpy(x)
    np.testing.assert_array_equal(block_formats.quantize(x, T.NVFP4), want)


def test_nvfp4_scale_bytes_match_gguf_conversion_on_bit_patterns():
    """The scale byte of amax / 6 over amax from subnormals to float32's largest: each sub-block holds one amax
    and smaller values."""
    rng = np.random.default_rng(13)
    amax = np.concatenate([rng.integers(1, 0x7F800000, 1 << 14, dtype=np.uint64).astype(np.uint32),
                           rng.integers(0x3A000000, 0x45000000, 1 << 14, dtype=np.uint64).astype(np.uint32)])
    amax = amax.view(np.float32)
    amax = np.concatenate([amax, np.float32([448 * 6, 448 * 6 * 1.0001, 240 * 6, 2.0**-9 * 6, 2.0**-10 * 6,
                                             2.0**-10 * 6 * 0.999, 2.0**-6 * 6, 2.0**-6 * 6 * 0.9999])])
    x = (rng.uniform(-1, 1, (len(amax), 16)) * amax[:, None]).astype(np.float32)
    x[:, 5] = amax * rng.choice(np.float32([-1, 1]), len(amax))
    x = x[: len(x) // 4 * 4].reshape(-1, 64)
    got = block_formats.quantize(x, T.NVFP4)[:, :4].reshape(-1)
    want = gq.NVFP4.fp32_to_ue4m3(np.abs(x.reshape(-1, 16)).max(1) / np.float32(6))
    np.testing.assert_array_equal(got, want)


# sha256 of ggml_quantize_chunk's output on lcg_inputs(8, 1024, 1) through tools/ggml_oracle.py (llama.cpp of
# llama_cpp_python 0.3.36): quantize_row_<t>_ref; with the importance vector lcg_importance(1024) ggml writes the
# same bytes, since its quantize_<t> ignores the weights of these types
GGML_REF_SHA256 = {
    T.NVFP4: "56053ecd217951a6e0df75904afcb124412b36dbe1a3c39af50474fe505caaf4",
    T.Q1_0: "2fe21ecc68cce8213a5a8fd63b7929dc2c851b550233c5c0315eec04426da3a2",
    Q2_0: "11f439d908a484dafa5bed001aaff06632a61066169e50c3dbca8d64b27b7387",
    T.TQ1_0: "d8b296164df6714b72b0f32474ea4a294e57ed189fd8cb11e546389a8d8fa8ca",
    T.TQ2_0: "8499fc437c27bd215e59921df7bb6e966ec5bfb38ffbfa0c269b068247f8e25f",
}


@pytest.mark.parametrize("qtype", SMALL, ids=ids)
def test_quantizers_write_the_bytes_llama_cpp_writes(qtype):
    x, importance = lcg_inputs(8, 1024, 1), lcg_importance(1024)
    assert hashlib.sha256(x.tobytes()).hexdigest()[:16] == "00eb979c510c0bda", "test input changed"
    assert hashlib.sha256(importance.tobytes()).hexdigest()[:16] == "9dc63d1a5ef954b6", "test input changed"
    assert hashlib.sha256(block_formats.quantize(x, qtype).tobytes()).hexdigest() == GGML_REF_SHA256[qtype]
    assert hashlib.sha256(block_formats.quantize(x, qtype, importance).tobytes()).hexdigest() == GGML_REF_SHA256[qtype]


def random_rows(rng, rows: int = 12, n: int = 1024) -> np.ndarray:
    """Gaussian rows at three scales and heavy-tailed ones."""
    x = rng.standard_normal((rows, n)) * rng.choice([1e-3, 1.0, 300.0], (rows, 1))
    x[::3] = rng.standard_t(3, (len(x[::3]), n))
    return x.astype(np.float32)


def garbage_rows(rng) -> np.ndarray:
    """Rows of 256 with NaN, infinities, float32 extremes, subnormals (whose 1/amax overflows), and a NaN that
    resets the ternary types' running maximum (ggml's MAX) before larger values."""
    x = rng.standard_normal((12, 256)).astype(np.float32)
    x[0, 3] = np.nan
    x[1, 7] = np.inf
    x[2, ::2] = -np.inf
    x[3] = np.float32(3.4e38) * np.sign(x[3])
    x[4] = np.float32(1e-45) * np.sign(x[4])
    x[5, 255] = np.nan
    x[6, 100], x[6, 101], x[6, 50] = np.nan, 1e-3, 1e10
    x[7] *= np.float32(1e-39)
    x[8, ::3] = np.nan
    x[9] = np.float32(3e-39) * np.sign(x[9])
    x[9, ::5] = 0
    x[10, 0], x[10, 1] = np.nan, 1e-30
    x[10, 2:] *= np.float32(1e20)
    x[11] = -0.0
    return x


@needs_ggml
@pytest.mark.parametrize("qtype", SMALL, ids=ids)
def test_quantizers_match_ggml_on_random_data(qtype):
    rng = np.random.default_rng(70 + int(qtype))
    x = random_rows(rng)
    importance = (rng.random(x.shape[1]) ** 3 + 1e-3).astype(np.float32)
    ours = block_formats.quantize(x, qtype)
    np.testing.assert_array_equal(ours, ggml_quantize(qtype.name, x))
    np.testing.assert_array_equal(ours, ggml_quantize(qtype.name, x, importance))
    np.testing.assert_array_equal(block_formats.quantize(x, qtype, importance), ours)


@needs_ggml
@pytest.mark.parametrize("qtype", SMALL, ids=ids)
def test_quantizers_match_ggml_on_garbage(qtype):
    """ggml on x86-64 (its float -> int conversions of NaN and overflow give INT_MIN / LONG_MIN)."""
    x = garbage_rows(np.random.default_rng(51))
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(block_formats.quantize(x, qtype), ggml_quantize(qtype.name, x, checked=False))


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("qtype", SMALL, ids=ids)
def test_quantizers_survive_non_finite_and_extreme_input(qtype, weighted):
    """Garbage in, blocks out (finite rows come out as they do alone); importance changes nothing."""
    x = garbage_rows(np.random.default_rng(51))
    x = np.concatenate([x, np.random.default_rng(52).standard_normal((1, 256)).astype(np.float32)])
    importance = np.linspace(0, 1e30, 256, dtype=np.float32) if weighted else None
    q = block_formats.quantize(x, qtype, importance)
    assert q.shape == (13, block_formats.row_bytes(qtype, 256))
    np.testing.assert_array_equal(q[-1:], block_formats.quantize(x[-1:], qtype))
    np.testing.assert_array_equal(q, block_formats.quantize(x, qtype))
    with np.errstate(all="ignore"):
        block_formats.dequantize(q, qtype)


# relative RMSE of a round trip on N(0, 1) and on Student-t(3) rows of 2048: measured NVFP4 0.0949/0.0906, Q1_0
# 0.600/0.755, Q2_0 0.717/0.688, TQ1_0 and TQ2_0 0.808/0.807 (a scale of the largest of 256 values leaves most at 0:
# the ternary formats are for weights trained ternary); bounds with ~5% margin
RMSE_BOUNDS = {T.NVFP4: (0.10, 0.095), T.Q1_0: (0.63, 0.79), Q2_0: (0.75, 0.72), T.TQ1_0: (0.85, 0.85),
               T.TQ2_0: (0.85, 0.85)}


@pytest.mark.parametrize("qtype", SMALL, ids=ids)
def test_round_trip_error_within_bounds(qtype):
    rng = np.random.default_rng(21)
    gauss_bound, heavy_bound = RMSE_BOUNDS[qtype]
    for x, bound in ((rng.standard_normal((32, 2048)), gauss_bound), (rng.standard_t(3, (32, 2048)), heavy_bound)):
        x = x.astype(np.float32)
        y = block_formats.dequantize(block_formats.quantize(x, qtype), qtype)
        rel = np.sqrt(np.mean((y.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2))
        assert rel < bound, f"{qtype.name}: relative RMSE {rel:.4f} >= {bound}"


@pytest.mark.parametrize("qtype", SMALL, ids=ids)
def test_values_on_the_grid_come_back_exactly(qtype):
    """Ternary data (and a block's own dequantized values) quantize to themselves: zeros give zeros, and the
    formats requantize their own output to the same bytes."""
    rng = np.random.default_rng(25)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    x[0] = 0
    q = block_formats.quantize(x, qtype)
    y = block_formats.dequantize(q, qtype)
    assert not np.any(y[0])
    np.testing.assert_array_equal(block_formats.quantize(y, qtype), q)
    if qtype != T.Q1_0:  # Q1_0 has no zero
        t = rng.integers(-1, 2, (4, 1024)).astype(np.float32) * np.float32(0.75)
        np.testing.assert_array_equal(block_formats.dequantize(block_formats.quantize(t, qtype), qtype), t)


# ---------------------------------------------------------------- reference dots


@pytest.mark.parametrize("qtype", SMALL, ids=ids)
def test_vec_dot_ref_matches_float64_dot_of_dequantized_rows(qtype):
    rng = np.random.default_rng(41)
    n = 2048
    act_type = lib.fl_type_act_type(int(qtype))
    assert act_type == ACT[qtype]
    for trial in range(8):
        x = rng.standard_normal(n).astype(np.float32)
        if trial % 2:  # random bytes reach every code (Q2_0's 2d, TQ1_0's unused byte values), sane scales
            w = rng.integers(0, 256, block_formats.row_bytes(qtype, n), dtype=np.uint8)
            per_block = w.reshape(-1, block_formats.block_bytes(qtype))
            if qtype == T.NVFP4:
                per_block[:, :4] = rng.integers(0x20, 0x50, (len(per_block), 4))
            else:
                off = HALF_SCALE[qtype]
                per_block[:, off:off + 2] = np.float16(0.01).reshape(1).view(np.uint8)
        else:
            w = block_formats.quantize(rng.standard_normal(n).astype(np.float32), qtype)
        a = block_formats.quantize(x, act_type)
        wf = block_formats.dequantize(w, qtype).astype(np.float64)
        af = block_formats.dequantize(a, act_type).astype(np.float64)
        exact = float(wf @ af)
        scale = float(np.abs(wf) @ np.abs(af))
        assert abs(vec_dot_ref(qtype, w, a, n) - exact) <= 2e-7 * scale, (trial, exact)


@needs_ggml
@pytest.mark.parametrize("qtype", SMALL, ids=ids)
def test_vec_dot_ref_matches_ggml(qtype):
    """ggml's dot (its SIMD kernel where it has one, after its own activation quantizer) against the generic one
    here. Activations that are whole multiples of a power of two with a +-127 in every block quantize exactly in
    both, so only the order of the sums differs (measured: no difference); plain random ones also differ where
    ggml's SIMD quantizer rounds a tie or the scale's reciprocal otherwise (measured <= 5.7e-8 of sum |w*a|)."""
    rng = np.random.default_rng(90 + int(qtype))
    n = 1024
    act_type = lib.fl_type_act_type(int(qtype))
    w = block_formats.quantize(rng.standard_normal((6, n)).astype(np.float32), qtype)
    exact = rng.integers(-127, 128, (3, n)).astype(np.float32)
    group = 32 if act_type == T.Q8_0 else 256
    exact.reshape(3, -1, group)[:, :, 0] = 127 * rng.choice([-1, 1], (3, n // group))
    exact *= np.float32(2.0) ** rng.integers(-3, 4, (3, 1)).astype(np.float32)
    for x, bound in ((exact, 1e-7), (rng.standard_normal((3, n)).astype(np.float32), 1e-6)):
        theirs = ggml_dot(qtype.name, w, x)
        for t in range(len(x)):
            a = block_formats.quantize(x[t], act_type)
            af = np.abs(block_formats.dequantize(a, act_type).astype(np.float64))
            for r in range(len(w)):
                scale = float(np.abs(block_formats.dequantize(w[r], qtype).astype(np.float64)) @ af)
                assert abs(vec_dot_ref(qtype, w[r], a, n) - theirs[r, t]) <= bound * scale, (r, t)


def test_block_sizes():
    for qtype, (elems, size) in {T.NVFP4: (64, 36), T.Q1_0: (128, 18), Q2_0: (64, 18), T.TQ1_0: (256, 54),
                                 T.TQ2_0: (256, 66)}.items():
        assert (block_formats.block_elems(qtype), block_formats.block_bytes(qtype)) == (elems, size)
        if qtype != Q2_0:
            assert block_formats.row_bytes(qtype, 4 * elems) == gq.quant_shape_to_byte_shape((4 * elems,), qtype)[0]
