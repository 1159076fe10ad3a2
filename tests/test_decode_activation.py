"""Decode quantizes the activation row to Q8_0 itself (vectorized on some levels); it must round exactly as
gguf-py's Q8_0 quantizer does, ties away from zero included. One-hot weight rows read single quantized
activations back out of fl_matmul, so one value rounded the other way fails the comparison."""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from flashlite import matmul as fm


def tie_heavy_activation(k, rng):
    """Blocks whose scale is exactly 1 or 1/2, filled with halves: every quantized value is a rounding tie."""
    x = rng.integers(-250, 251, k).astype(np.float32) / 2
    x = x.reshape(-1, 32)
    x[0::2, 0] = 127.0          # amax 127: d = 1, so x * id keeps the .5
    x[1::2] = np.clip(x[1::2] / 2, -63.0, 63.0)
    x[1::2, 5] = -63.5          # amax 63.5: d = 0.5, id = 2, ties at quarters
    return x.reshape(-1)


@pytest.mark.parametrize("wtype", [T.Q8_0, T.MXFP4], ids=lambda t: t.name)
def test_activation_rounding_matches_gguf(wtype, level):
    rng = np.random.default_rng(7)
    for k in (384, 96):  # whole groups of four blocks; then 3 blocks, a partial group
        x = tie_heavy_activation(k, rng)
        w = gguf.quants.quantize(np.eye(k, dtype=np.float32), wtype)
        w_diag = np.diag(gguf.quants.dequantize(w, wtype).reshape(k, k)).astype(np.float64)
        xq = gguf.quants.dequantize(gguf.quants.quantize(x.reshape(1, -1), T.Q8_0), T.Q8_0).reshape(-1)
        y = fm.matmul(w, wtype, k, k, x)
        np.testing.assert_allclose(y, w_diag * xq, rtol=1e-6, atol=0)


def q8_k_reference(x):
    """ggml's quantize_row_q8_K_ref, dequantized: scale -127 / (the signed value of largest magnitude), ties to even."""
    blocks = x.reshape(-1, 256).astype(np.float32)
    signed_max = blocks[np.arange(len(blocks)), np.argmax(np.abs(blocks), axis=1)]
    iscale = (np.float32(-127.0) / signed_max).astype(np.float32)
    q = np.minimum(np.rint(iscale[:, None] * blocks), 127)
    return (q * (np.float32(1.0) / iscale)[:, None]).reshape(-1).astype(np.float64)


def one_hot_q4_k(k):
    """Q4_K rows that are exactly the identity: d = 1, dmin = 0, every sub-block scale 1, one quant of 1 a row."""
    blocks = np.zeros((k, k // 256, 144), np.uint8)
    blocks[:, :, 0:2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    blocks[:, :, 4:8] = 1      # scales of sub-blocks 0-3 (mins 0)
    blocks[:, :, 12:16] = 1    # scales of sub-blocks 4-7 in the low nibbles (mins 0 in the high ones)
    for r in range(k):
        sb, e = divmod(r, 256)
        chunk, pos = divmod(e, 64)
        blocks[r, sb, 16 + 32 * chunk + pos % 32] = 1 if pos < 32 else 0x10
    return blocks.reshape(k, -1)


def test_q8_k_activation_rounding_matches_ggml(level):
    rng = np.random.default_rng(8)
    k = 512
    x = rng.integers(-250, 251, k).astype(np.float32) / 2
    x[0], x[256 + 3] = -127.0, -127.0   # scale 1: the halves stay ties
    x[256 + 9] = 127.0                  # a second value of the largest magnitude, of the other sign
    w = one_hot_q4_k(k)
    assert np.array_equal(gguf.quants.dequantize(w, T.Q4_K).reshape(k, k), np.eye(k))
    y = fm.matmul(w, T.Q4_K, k, k, x)
    np.testing.assert_allclose(y, q8_k_reference(x), rtol=1e-6, atol=0)
