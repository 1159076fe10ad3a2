"""Decode quantizes the activation row to Q8_0 itself (vectorized on some levels); it must round exactly as
gguf-py's Q8_0 quantizer does, ties away from zero included. One-hot weight rows read single quantized
activations back out of fl_matmul, so one value rounded the other way fails the comparison."""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from flashlite import matmul as fm


@pytest.fixture(params=fm.simd_levels())
def level(request):
    before = fm.simd_level()
    fm.set_simd_level(request.param)
    yield request.param
    fm.set_simd_level(before)


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
