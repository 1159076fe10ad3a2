"""flashlite.matmul against numpy float64 on weights dequantized by gguf-py, at every SIMD level of this CPU.

Any number of tokens multiplies by activations quantized to Q8_0 / Q8_1 / Q8_K (float formats: f32), so a product
is checked twice: tightly against float64 with the activations put through the same quantization (done here in
numpy), and within a per-format bound against the plain float64 product. A product of n tokens is bitwise the n
products of one token each. Every level must also agree with the scalar reference level.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from test_block_formats_small import Q2_0

from flashlite import block_formats
from flashlite import matmul as fm

FORMATS = [T.F32, T.F16, T.BF16, T.Q8_0, T.MXFP4, T.NVFP4, T.Q1_0, Q2_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K,
           T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.TQ1_0, T.TQ2_0, T.IQ2_XXS, T.IQ4_XS, T.IQ4_NL, T.IQ2_XS, T.IQ2_S,
           T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M]
ACT_Q8_0 = {T.Q8_0, T.MXFP4, T.NVFP4, T.Q1_0, Q2_0, T.Q4_0, T.Q5_0, T.IQ4_NL}
ACT_Q8_1 = {T.Q4_1, T.Q5_1}
FLOATS = {T.F32, T.F16, T.BF16}
GGUF_QUANTIZERS = {T.BF16, T.Q8_0, T.MXFP4, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}
# types gguf-py cannot dequantize: the core's dequantizer (checked against ggml in test_block_formats_small) serves
NO_GGUF_DEQUANT = {T.Q1_0, Q2_0}
# byte offsets of the fp16 scale fields in a block, set to small positive values in random blocks (IQ1_M's is
# spread over the top nibbles of the four 16-bit words at byte 48)
SCALE_OFFSETS = {T.Q1_0: (0,), Q2_0: (0,), T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2),
                 T.Q6_K: (208,), T.TQ1_0: (52,), T.TQ2_0: (64,), T.IQ2_XXS: (0,), T.IQ4_XS: (0,), T.IQ4_NL: (0,),
                 T.IQ2_XS: (0,), T.IQ2_S: (0,), T.IQ3_XXS: (0,), T.IQ3_S: (0,), T.IQ1_S: (0,)}
# ||y - y64|| / ||y64|| of decode against the unquantized activations: the activation rounding of Q8_0 / Q8_1
# (blocks of 32) or Q8_K (blocks of 256, so a coarser step), amplified by the weights' offsets on random k-quant blocks
DECODE_BOUND = {t: 1e-5 if t in FLOATS else 2e-2 if t in ACT_Q8_0 | ACT_Q8_1 else 5e-2 for t in FORMATS}
TIGHT = 2e-5
Q8_1_DTYPE = np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", 32)])


def make_weights(wtype, rows, k, rng):
    """Weights of `wtype`: gguf-py's quantizer where it has one, else random bits with sane scales."""
    values = rng.standard_normal((rows, k)).astype(np.float32)
    if wtype == T.F32:
        return values
    if wtype == T.F16:
        return values.astype(np.float16)
    if wtype in GGUF_QUANTIZERS:
        return gguf.quants.quantize(values, wtype)
    n_blocks = rows * k // block_formats.block_elems(wtype)
    data = rng.integers(0, 256, (n_blocks, block_formats.block_bytes(wtype)), dtype=np.uint8)
    if wtype == T.NVFP4:  # four UE4M3 scale bytes, 2^-4..2^-1
        data[:, :4] = rng.integers(0x18, 0x38, (n_blocks, 4))
    for off in SCALE_OFFSETS.get(wtype, ()):
        scales = (rng.uniform(0.5, 1.5, n_blocks) * 0.01).astype(np.float16)
        data[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    if wtype == T.IQ1_M:
        half = (rng.uniform(0.5, 1.5, n_blocks) * 0.01).astype(np.float16).view(np.uint16)
        words = data[:, 48:56].copy().view("<u2")
        for i in range(4):
            words[:, i] = (words[:, i] & 0x0FFF) | (((half >> (4 * i)) & 0xF) << 12)
        data[:, 48:56] = words.view(np.uint8)
    return data.reshape(rows, -1)


def dequantized(w, wtype, rows, k):
    if wtype == T.F32:
        return w.astype(np.float64)
    if wtype == T.F16:
        return w.astype(np.float64)
    if wtype in NO_GGUF_DEQUANT:
        return block_formats.dequantize(np.ascontiguousarray(w), wtype).reshape(rows, k).astype(np.float64)
    return gguf.quants.dequantize(np.ascontiguousarray(w).view(np.uint8), wtype).reshape(rows, k).astype(np.float64)


def quantized_activations(x, wtype):
    """x as the decode kernels see it: Q8_0 through gguf-py (Q8_1 holds the same values), Q8_K as ggml's
    quantize_row_q8_K_ref."""
    if wtype in FLOATS:
        return x.astype(np.float64)
    if wtype in ACT_Q8_0 | ACT_Q8_1:
        return gguf.quants.dequantize(gguf.quants.quantize(x, T.Q8_0), T.Q8_0).astype(np.float64)
    blocks = x.reshape(-1, 256).astype(np.float32)
    pick = np.argmax(np.abs(blocks), axis=1)
    signed_max = blocks[np.arange(len(blocks)), pick]
    with np.errstate(divide="ignore"):
        iscale = np.where(signed_max != 0, np.float32(-127.0) / signed_max, 0).astype(np.float32)
    q = np.minimum(np.rint(iscale[:, None] * blocks), 127)
    d = np.where(iscale != 0, np.float32(1.0) / np.where(iscale != 0, iscale, 1), 0).astype(np.float32)
    return (q * d[:, None]).reshape(x.shape).astype(np.float64)


def decode_reference(x, w, wtype, rows, k):
    """The float64 product decode computes, [n_tok, rows] for x [n_tok, k]. Q4_1 / Q5_1 dots add each weight
    block's min m times the Q8_1 activation block's s = d * sum(q) rounded to fp16 (by the core's quantizer,
    which test_block_formats checks against ggml), where the product of dequantized operands has the exact sum."""
    xq = np.stack([quantized_activations(row, wtype) for row in x])
    ref = xq @ dequantized(w, wtype, rows, k).T
    if wtype in ACT_Q8_1:
        m = np.ascontiguousarray(w).view(np.uint8).reshape(rows, k // 32, -1)[:, :, 2:4].copy().view("<f2")[..., 0]
        for t, row in enumerate(x):
            a = block_formats.quantize(row, T.Q8_1).view(Q8_1_DTYPE)
            s_error = a["s"].astype(np.float64) - a["d"].astype(np.float64) * a["qs"].astype(np.int64).sum(1)
            ref[t] += m.astype(np.float64) @ s_error
    return ref


def rel_err(y, ref):
    return float(np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref))


@pytest.fixture
def threads():
    before = fm.threads()
    yield fm.set_threads
    fm.set_threads(before)


@pytest.mark.parametrize("wtype", FORMATS, ids=lambda t: t.name)
def test_products_against_float64(wtype, level):
    rng = np.random.default_rng(int(wtype))
    block = block_formats.block_elems(wtype)
    rows, k = 45, 4 * max(block, 64)
    w = make_weights(wtype, rows, k, rng)
    w64 = dequantized(w, wtype, rows, k)
    x = rng.standard_normal((40, k)).astype(np.float32)

    for n_tok in (1, 3, 40):
        xs = x[0] if n_tok == 1 else x[:n_tok]
        y = fm.matmul(w, wtype, rows, k, xs)
        assert y.shape == ((rows,) if n_tok == 1 else (n_tok, rows)) and y.dtype == np.float32
        assert rel_err(y.reshape(n_tok, rows), decode_reference(x[:n_tok], w, wtype, rows, k)) < TIGHT
        assert rel_err(y.reshape(n_tok, rows), x[:n_tok].astype(np.float64) @ w64.T) < DECODE_BOUND[wtype]


@pytest.mark.parametrize("wtype", FORMATS, ids=lambda t: t.name)
def test_many_tokens_are_bitwise_one_token_each(wtype, level, threads):
    """However many tokens one call takes (across the old prefill threshold of 16, odd counts, the token dots' 1..8
    tokens and their chunks, 9 as 5 + 4), each token's outputs are the bits of a call with that token alone: a
    prompt gives the same logits in one prefill, in chunks or token by token, and a verified batch of drafts the
    logits of plain decoding. k has an odd count of blocks, so that the dots' last group or pair is not full (the
    float formats: 265 = 8 x 32 + 8 + 1, through the dots' 32-wide loop, their 8-wide tail and their scalar one)."""
    rng = np.random.default_rng(300 + int(wtype))
    block = block_formats.block_elems(wtype)
    k = 2 * max(block, 128) + max(block, 9)
    rows = 37
    w = make_weights(wtype, rows, k, rng)
    x = rng.standard_normal((40, k)).astype(np.float32)
    for n_threads in (1, 2, 3):
        threads(n_threads)
        alone = np.stack([fm.matmul(w, wtype, rows, k, x[t]) for t in range(len(x))])
        for n_tok in range(1, 41):
            y = fm.matmul(w, wtype, rows, k, x[:n_tok]).reshape(n_tok, rows)
            assert np.array_equal(y, alone[:n_tok]), (n_threads, n_tok)


# formats with a prefill kernel on AVX512-VNNI CPUs with VBMI (csrc/arch/x86/avx512_vbmi_gemm.c)
PREFILL_KERNELS = [T.Q8_0, T.MXFP4, T.Q5_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
# formats whose prefill kernel runs on AMX-INT8 tiles where the CPU and OS offer them (csrc/arch/x86/amx_gemm.c)
AMX_KERNELS = [T.Q4_K, T.Q5_K, T.Q6_K]
AMX = fm.has_amx()  # on by default where offered


@pytest.fixture(params=["amx", "avx512"])
def prefill_unit(request):
    """The AMX prefill kernels, or the AVX-512 ones that CPUs without AMX take, for the test, restored after."""
    if request.param == "amx" and not AMX:
        pytest.skip("this CPU or OS offers no AMX-INT8 tiles")
    fm.set_amx(request.param == "amx")
    yield request.param
    fm.set_amx(AMX)


@pytest.mark.parametrize("wtype", PREFILL_KERNELS, ids=lambda t: t.name)
def test_prefill_kernels_are_bitwise_one_token_each(wtype, threads, prefill_unit):
    """The prefill kernels (many tokens, 16 to a panel, 8 rows (AMX: 16) at a time) against one-token calls, which
    take the decode dot, on shapes that leave every remainder: rows past a multiple of 8 and 16 and of the threads'
    shares, a last panel with 1..15 tokens, an odd number of panels, more tokens than one task takes (256), and for
    Q8_0, MXFP4 and Q5_0 a last group of blocks that is not full. The k-quants' random blocks take every scale and
    min (Q6_K: -128..127), which the AMX kernels cut into digits. At levels without the kernels this checks the
    four-token dots the same way."""
    if prefill_unit == "amx" and wtype not in AMX_KERNELS:
        pytest.skip("no AMX kernel for this format")
    rng = np.random.default_rng(700 + int(wtype))
    k = 5 * 32 if wtype in (T.Q8_0, T.MXFP4, T.Q5_0) else 3 * 256
    rows = 29
    w = make_weights(wtype, rows, k, rng)
    x = (rng.standard_normal((300, k)) * rng.uniform(0.1, 10.0, (300, 1))).astype(np.float32)
    x[5] = 0.0  # a token of zeros: its scale is 0
    alone = np.stack([fm.matmul(w, wtype, rows, k, x[t]) for t in range(len(x))])
    ref = decode_reference(x, w, wtype, rows, k)
    assert rel_err(alone, ref) < TIGHT
    for n_threads in (1, 2, 3):
        threads(n_threads)
        for n_tok in (3, 5, 7, 8, 9, 16, 17, 31, 33, 47, 64, 100, 257, 300):
            for r0, r1 in ((0, rows), (3, 12), (0, 1)):  # a row range that starts inside a block of 8
                y = fm.matmul(np.ascontiguousarray(w[r0:r1]), wtype, r1 - r0, k, x[:n_tok]).reshape(n_tok, r1 - r0)
                assert np.array_equal(y, alone[:n_tok, r0:r1]), (n_threads, n_tok, r0, r1)


def test_amx_switch():
    """AMX turns off and back on where offered; elsewhere turning it on is refused and the AVX-512 kernels stay."""
    if not AMX:
        with pytest.raises(ValueError, match="^on:"):
            fm.set_amx(True)
        assert not fm.has_amx()
        return
    try:
        fm.set_amx(False)
        assert not fm.has_amx()
        fm.set_amx(True)
        assert fm.has_amx()
    finally:
        fm.set_amx(AMX)


@pytest.mark.parametrize("wtype", AMX_KERNELS, ids=lambda t: t.name)
def test_amx_prefill_matches_dequantized_weights(wtype, prefill_unit):
    """Many tokens against float64 on weights dequantized by gguf-py and the activations quantized as the kernels
    see them: the AMX kernels' digits add up to the scales, not merely to what the AVX-512 kernel computes."""
    rng = np.random.default_rng(900 + int(wtype))
    rows, k, n_tok = 37, 4 * 256, 45
    w = make_weights(wtype, rows, k, rng)
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    y = fm.matmul(w, wtype, rows, k, x).reshape(n_tok, rows)
    assert rel_err(y, decode_reference(x, w, wtype, rows, k)) < TIGHT


@pytest.mark.parametrize("wtype", FORMATS, ids=lambda t: t.name)
def test_levels_agree_with_scalar(wtype, level):
    rng = np.random.default_rng(100 + int(wtype))
    block = block_formats.block_elems(wtype)
    rows, k = 13, 2 * block
    w = make_weights(wtype, rows, k, rng)
    x = rng.standard_normal((20, k)).astype(np.float32)
    got = [fm.matmul(w, wtype, rows, k, x[0]), fm.matmul(w, wtype, rows, k, x[:5]), fm.matmul(w, wtype, rows, k, x)]
    fm.set_simd_level("scalar")
    want = [fm.matmul(w, wtype, rows, k, x[0]), fm.matmul(w, wtype, rows, k, x[:5]), fm.matmul(w, wtype, rows, k, x)]
    for g, r in zip(got, want):
        assert rel_err(g, r.astype(np.float64)) < TIGHT


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("wtype", [T.F16, T.Q8_0, T.Q4_1, T.Q4_K, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ4_NL, T.IQ1_M],
                         ids=lambda t: t.name)
def test_odd_shapes(wtype, n_threads, threads):
    """One row, rows not a multiple of the thread count or the tile, k at the format's minimum (for the i-quants
    that take two superblocks a step, IQ2_XXS, IQ2_XS and IQ2_S, a pair without its second)."""
    threads(n_threads)
    rng = np.random.default_rng(7)
    k = block_formats.block_elems(wtype) if wtype not in FLOATS else 1
    for rows in (1, 5, 31):
        w = make_weights(wtype, rows, k, rng)
        for n_tok in (1, 2, 16, 37):
            x = rng.standard_normal((n_tok, k)).astype(np.float32)
            y = fm.matmul(w, wtype, rows, k, x)
            ref = decode_reference(x, w, wtype, rows, k)
            np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_bad_input_names_the_argument():
    w = make_weights(T.Q8_0, 4, 64, np.random.default_rng(0))
    x = np.ones(64, np.float32)
    with pytest.raises(ValueError, match="^x:"):
        fm.matmul(w, T.Q8_0, 4, 64, np.ones(63, np.float32))
    with pytest.raises(ValueError, match="^x:"):
        fm.matmul(w, T.Q8_0, 4, 64, np.ones((2, 2, 64), np.float32))
    with pytest.raises(TypeError, match="^x:"):
        fm.matmul(w, T.Q8_0, 4, 64, np.array(["a"] * 64))
    with pytest.raises(ValueError, match="^w:"):
        fm.matmul(w[:3], T.Q8_0, 4, 64, x)
    with pytest.raises(ValueError, match="^w:"):
        fm.matmul(w.tobytes()[:-1], T.Q8_0, 4, 64, x)
    with pytest.raises(TypeError, match="^w:"):
        fm.matmul(12, T.Q8_0, 4, 64, x)
    with pytest.raises(ValueError, match="^wtype:"):
        fm.matmul(w, 4, 4, 64, x)
    with pytest.raises(ValueError, match="^wtype:"):
        fm.matmul(w, "Q9_X", 4, 64, x)
    with pytest.raises(ValueError, match="^wtype:"):
        fm.matmul(w, T.Q8_K, 4, 64, x)
    with pytest.raises(ValueError, match="^wtype:"):
        fm.matmul(w, T.Q8_1, 4, 64, x)
    with pytest.raises(TypeError, match="^wtype:"):
        fm.matmul(w, 8.0, 4, 64, x)
    with pytest.raises(ValueError, match="^k:"):
        fm.matmul(w, T.Q4_K, 4, 64, x)
    with pytest.raises(ValueError, match="^rows:"):
        fm.matmul(w, T.Q8_0, 0, 64, x)
    with pytest.raises(ValueError, match="^name:"):
        fm.set_simd_level("sse9")
    with pytest.raises(TypeError, match="^n:"):
        fm.set_threads("4")
    assert fm.matmul(w, "q8_0", 4, 64, x).shape == (4,)


def test_batch_is_bitwise_each_matmul_alone(level):
    """matmul_batch against separate matmul calls: shared and separate activations, several formats, a
    product of many tokens among one-token ones; and a bad product is named by its index."""
    rng = np.random.default_rng(5)
    x, other, many = (rng.standard_normal(s).astype(np.float32) for s in (256, 256, (19, 256)))
    products = [(make_weights(t, 37, 256, rng), t, 37, 256, a)
                for t, a in ((T.Q8_0, x), (T.Q8_0, x), (T.MXFP4, x), (T.Q4_K, other), (T.F32, x), (T.Q6_K, many),
                             # many tokens by formats whose activations are prepared alike but packed (Q8_0,
                             # MXFP4 and Q5_0: with other offsets and factors) or run by other prefill kernels
                             (T.Q8_0, many), (T.MXFP4, many), (T.Q5_0, many), (T.Q4_K, many), (T.Q5_K, many),
                             (T.Q2_K, many), (T.Q3_K, many))]
    for got, (w, t, rows, k, a) in zip(fm.matmul_batch(products), products):
        assert np.array_equal(got, fm.matmul(w, t, rows, k, a)), t.name
    with pytest.raises(ValueError, match=r"^products\[1\]\.x:"):
        fm.matmul_batch([products[0], products[1][:4] + (np.ones(255, np.float32),)])


@pytest.mark.parametrize("wtype", FORMATS, ids=lambda t: t.name)
def test_decode_row_does_not_depend_on_its_neighbours(wtype, level, threads):
    """Decode runs four rows at a time where a kernel can (rows from four quarters of a thread's range): each row
    must come out bitwise as when it is multiplied alone, for every row count around the grouping."""
    rng = np.random.default_rng(9)
    k = 512
    x = rng.standard_normal(k).astype(np.float32)
    for n_threads in (1, 2):
        threads(n_threads)
        for rows in (4, 7, 16, 33, 131):
            w = make_weights(wtype, rows, k, rng)
            alone = np.array([fm.matmul(w[r:r + 1], wtype, 1, k, x)[0] for r in range(rows)], np.float32)
            assert np.array_equal(fm.matmul(w, wtype, rows, k, x), alone), (rows, n_threads)


# weight bytes (times tokens) under which a product runs on the calling thread alone (csrc/matmul.c: TASK_BYTES)
SPLIT_BYTES = 512 << 10


@pytest.mark.parametrize("wtype", FORMATS, ids=lambda t: t.name)
def test_decode_split_across_threads_is_one_threads_bits(wtype, threads):
    """A product the size of a tiny model's stays on the calling thread, a larger one is cut into row ranges for the
    pool's threads (with four-row dots over four quarters of each): either way every row comes out as one thread
    computes it, rows past every boundary included (an odd count)."""
    rng = np.random.default_rng(21)
    k = 256 * max(1, block_formats.block_elems(wtype) // 256)
    row_bytes = k // block_formats.block_elems(wtype) * block_formats.block_bytes(wtype)
    x = rng.standard_normal(k).astype(np.float32)
    for rows in (SPLIT_BYTES // row_bytes - 1, 2 * SPLIT_BYTES // row_bytes + 7):
        w = make_weights(wtype, rows, k, rng)
        threads(1)
        alone = fm.matmul(w, wtype, rows, k, x)
        for n_threads in (2, 3):
            threads(n_threads)
            assert np.array_equal(fm.matmul(w, wtype, rows, k, x).view(np.uint32), alone.view(np.uint32)), \
                (rows, n_threads)


def test_unsupported_level_is_refused():
    other = "neon" if fm.simd_best() != "neon" else "avx2"
    with pytest.raises(ValueError, match="^name:"):
        fm.set_simd_level(other)


@pytest.mark.parametrize("forced", fm.simd_levels())
def test_environment_forces_the_level(forced):
    code = "from flashlite import matmul as m; print(m.simd_level(), m.simd_best())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, FLASHLITE_SIMD=forced)).stdout.split()
    assert out == [forced, fm.simd_best()]


def _physical_performance_cores(allowed: set[int]) -> int:
    """An independent count from sysfs: the CPUs of allowed, E-cores dropped on a hybrid CPU, one per core."""
    def cpu_list(path):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            return None
        cpus = set()
        for part in filter(None, text.split(",")):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
        return cpus
    perf = (cpu_list("/sys/devices/cpu_core/cpus") or set()) & allowed or allowed
    cores = {frozenset(cpu_list(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list") or {c}) & perf
             for c in perf}
    return len(cores)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
@pytest.mark.parametrize("narrow", [False, True], ids=["all-cpus", "one-cpu"])
def test_default_threads_are_the_physical_performance_cores(narrow):
    """The default pool width counts the cores this process may use, as the kernel describes them, with one core
    left to the caller from 8 up; a process pinned to one CPU (taskset, a container) gets one thread."""
    code = ("import json, os, sys; cpus = sorted(os.sched_getaffinity(0)); "
            "os.sched_setaffinity(0, cpus[:1] if sys.argv[1] == '1' else cpus); "
            "from flashlite import matmul; "
            "print(json.dumps([sorted(os.sched_getaffinity(0)), matmul.default_threads(), matmul.threads()]))")
    out = subprocess.run([sys.executable, "-c", code, str(int(narrow))], capture_output=True, text=True, check=True)
    allowed, default, pool = json.loads(out.stdout)
    cores = _physical_performance_cores(set(allowed))
    expected = cores - 1 if cores >= 8 else cores
    assert (default, pool) == (expected, expected)
    if narrow:
        assert expected == 1
