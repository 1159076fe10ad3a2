"""The Triton device kernels (flashlite.device.triton_kernels) against the C core and float64 numpy.

Without a CUDA device the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set here
before the kernels are imported); with one they run on it. Every type: weights quantized by the C core, then

- dequantize_rows against block_formats.dequantize (the C core's dequantizer, bit-compatible with ggml);
- gemv (1 and 3 tokens) and gemm (17 tokens) against the float64 product of x and the dequantized weights, held
  to float32 rounding, and against flashlite.matmul within the error of the C core's own rounding.

The interpreter is slow (numpy per tile), so the shapes are small but odd: 37 rows (not a multiple of any tile),
k of three blocks or superblocks, k = 288 for the 32-element types (a partial last k tile).
"""
import os
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from flashlite import block_formats
from flashlite import matmul as fm

TYPES = [T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4, T.Q2_K, T.IQ2_XXS, T.IQ4_XS]
ROWS = 37
U32 = 2.0 ** -24  # float32 unit roundoff


@pytest.fixture(scope="module")
def tk():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.importorskip("triton")
    else:
        # read when the kernels are decorated, i.e. at their import below (triton itself may be loaded already)
        os.environ["TRITON_INTERPRET"] = "1"
        # triton 3.6's interpreter cannot loop to a runtime bound under numpy 2.4 (int() of a 1-element array)
        pytest.importorskip("triton", minversion="3.9")
    from flashlite.device import triton_kernels
    return triton_kernels


@pytest.fixture(scope="module")
def device(tk):
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _k(qtype) -> int:
    return 9 * 32 if block_formats.block_elems(qtype) == 32 else 3 * 256


def _weights(qtype, seed: int):
    """(raw blocks [ROWS, row_bytes] uint8, their float64 dequantization [ROWS, k]) from the C core's quantizer."""
    rng = np.random.default_rng(seed)
    k = _k(qtype)
    # rows of different magnitudes, so that a scale read from the wrong block or row shows
    w = (rng.standard_normal((ROWS, k)) * rng.uniform(0.1, 3.0, (ROWS, 1))).astype(np.float32)
    q = block_formats.quantize(w, qtype)
    return q, block_formats.dequantize(q, qtype).astype(np.float64)


def _activations(n_tok: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_tok, k)).astype(np.float32)


def _assert_within(err: np.ndarray, bound: np.ndarray) -> None:
    err, bound = np.broadcast_arrays(err, bound)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"error {err[worst]:.3g} over the bound {bound[worst]:.3g} at {worst}"


def _float32_bound(x: np.ndarray, w64: np.ndarray) -> np.ndarray:
    """A worst-case bound on a float32 dot's error (Higham's gamma_n): (k + 2) u sum |x_i w_i|, the 2 for the
    rounding of the dequantized weight itself (d * sc * q - dmin * m: products and a difference in float32)."""
    k = x.shape[-1]
    return (k + 2) * U32 / (1 - (k + 2) * U32) * (np.abs(x.astype(np.float64)) @ np.abs(w64).T)


def _q8_activation_bound(x: np.ndarray, w64: np.ndarray) -> np.ndarray:
    """A bound on what the C core's decode loses by rounding x to Q8_0 (blocks of 32) or Q8_K (blocks of 256):
    each element moves by at most half a step, amax / 127 / 2, plus Q8_0's fp16 scale (127 x 2^-11 of a step);
    the amax over 256 elements is at least that over any 32 of them, so one bound serves both."""
    x64 = x.astype(np.float64)
    amax = np.abs(x64).reshape(x.shape[0], -1, 256 if x.shape[1] % 256 == 0 else 32).max(axis=2)
    step = np.repeat(amax / 127.0, x.shape[1] // amax.shape[1], axis=1) * (0.5 + 127 * 2.0 ** -11)
    return step @ np.abs(w64).T


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_rows(tk, device, qtype):
    import torch
    q, w64 = _weights(qtype, 1)
    w = torch.from_numpy(q.reshape(-1).copy()).to(device)
    got = tk.dequantize_rows(w, qtype, ROWS, _k(qtype)).cpu().numpy()
    # the same float32 operations as the C core; a GPU may contract d * sc * q - dmin * m into one FMA, which
    # changes the last bit of the result, so one rounding of the largest magnitude in the row is allowed
    tol = 2 * U32 * np.abs(w64).max(axis=1, keepdims=True)
    _assert_within(np.abs(got - w64), tol)
    ids = torch.tensor([5, 0, ROWS - 1, 5, 17], device=device)
    gathered = tk.dequantize_rows(w, qtype, ROWS, _k(qtype), ids).cpu().numpy()
    np.testing.assert_array_equal(gathered, got[[5, 0, ROWS - 1, 5, 17]])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_rows_every_bit_pattern(tk, device, qtype):
    """Random bytes reach what a quantizer seldom writes: every grid index, sign pattern and 4-bit scale of
    IQ2_XXS, MXFP4's subnormal exponents 0 and 1, Q6_K's negative scales, Inf and NaN fp16 scales."""
    import torch
    k = _k(qtype)
    raw = np.random.default_rng(13).integers(0, 256, (ROWS, block_formats.row_bytes(qtype, k)), dtype=np.uint8)
    ref = block_formats.dequantize(raw, qtype)
    w = torch.from_numpy(raw.reshape(-1).copy()).to(device)
    got = tk.dequantize_rows(w, qtype, ROWS, k).cpu().numpy()
    if device == "cpu":  # the interpreter runs the core's float32 operations one at a time: bit for bit
        np.testing.assert_array_equal(got, ref)
    else:  # a GPU may fuse d * sc * q - dmin * m into an FMA: a rounding of terms no larger than the block's max
        special = ~np.isfinite(ref)
        np.testing.assert_array_equal(got[special], ref[special])  # Inf and NaN where the core has them
        magnitude = np.where(special, 0, np.abs(ref)).reshape(ROWS, -1, block_formats.block_elems(qtype)).max(axis=2)
        err = np.abs(np.where(special, 0, got - ref))
        _assert_within(err, 4 * U32 * np.repeat(magnitude, block_formats.block_elems(qtype), axis=1))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tok", [1, 3])
def test_gemv(tk, device, qtype, n_tok):
    import torch
    q, w64 = _weights(qtype, 2)
    k = _k(qtype)
    x = _activations(n_tok, k, 3)
    w = torch.from_numpy(q.reshape(-1).copy()).to(device)
    got = tk.gemv(w, qtype, ROWS, k, torch.from_numpy(x).to(device)).cpu().numpy()
    ref = x.astype(np.float64) @ w64.T
    # float activations: only float32 rounding separates the kernel from the float64 product
    _assert_within(np.abs(got - ref), _float32_bound(x, w64))
    # the C core rounds the activations to Q8 first: within that rounding's bound of the same exact product
    core = fm.matmul(q, qtype, ROWS, k, x).astype(np.float64)
    _assert_within(np.abs(got - core), _q8_activation_bound(x, w64) + 2 * _float32_bound(x, w64))
    # and the bound is not vacuous: the core's rounding shows against the float64 product
    assert np.abs(core - ref).max() > 10 * np.abs(got - ref).max()


def test_gemv_one_token_shape(tk, device):
    import torch
    q, w64 = _weights(T.Q4_K, 4)
    x = _activations(1, 768, 5)
    w = torch.from_numpy(q.reshape(-1).copy()).to(device)
    got = tk.matmul(w, T.Q4_K, ROWS, 768, torch.from_numpy(x[0]).to(device))
    assert tuple(got.shape) == (ROWS,)
    _assert_within(np.abs(got.cpu().numpy() - x[0].astype(np.float64) @ w64.T),
                                 _float32_bound(x, w64)[0])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gemm(tk, device, qtype):
    import torch
    q, w64 = _weights(qtype, 6)
    k = _k(qtype)
    x = _activations(17, k, 7)
    w = torch.from_numpy(q.reshape(-1).copy()).to(device)
    got = tk.gemm(w, qtype, ROWS, k, torch.from_numpy(x).to(device), precision="ieee").cpu().numpy()
    ref = x.astype(np.float64) @ w64.T
    bound = _float32_bound(x, w64)
    _assert_within(np.abs(got - ref), bound)
    # the C core rounds the activations to Q8 for any number of tokens (prefill is decode's arithmetic)
    core = fm.matmul(q, qtype, ROWS, k, x).astype(np.float64)
    _assert_within(np.abs(got - core), _q8_activation_bound(x, w64) + 2 * bound)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_grouped_gemm(tk, device, qtype):
    """A stack of 3 experts' matrices; 21 rows sorted by expert (expert 1 with none, expert 2 with more than a
    16-row tile, 3 rows left out at the end): each row against its expert's float64 product."""
    import torch
    k = _k(qtype)
    stacks = [_weights(qtype, 20 + e) for e in range(3)]
    w = torch.from_numpy(np.concatenate([q.reshape(-1) for q, _ in stacks])).to(device)
    experts = np.array([0] * 2 + [2] * 16 + [3] * 3)
    x = _activations(experts.size, k, 21)
    got = tk.grouped_gemm(w, qtype, 3, ROWS, k, torch.from_numpy(x).to(device), torch.from_numpy(experts).to(device),
                          precision="ieee").cpu().numpy()
    for e in (0, 2):
        rows = experts == e
        w64 = stacks[e][1]
        _assert_within(np.abs(got[rows] - x[rows].astype(np.float64) @ w64.T), _float32_bound(x[rows], w64))


def test_expert_tiles_cover_each_row_once(tk, device):
    import torch
    experts = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2, 3, 5, 5], device=device)  # 5: left out (of 4 experts)
    expert, lo, hi = (t.cpu().numpy() for t in tk.expert_tiles(experts, 4, 2))
    assert expert.size == 4 + 6  # min(rows, experts) + ceil(rows / block): fixed by the shapes
    tiles = [(int(e), int(a), int(b)) for e, a, b in zip(expert, lo, hi) if b > a]
    assert tiles == [(0, 0, 2), (0, 2, 3), (2, 3, 5), (2, 5, 7), (2, 7, 8), (3, 8, 9)]


@pytest.mark.parametrize("precision,unit", [("tf32", 2.0 ** -11), ("fp16", 2.0 ** -11)])
def test_gemm_reduced_precision(tk, device, precision, unit):
    """tf32 and fp16 tiles round x and w to 10 stored mantissa bits (unit roundoff 2^-11) before the product:
    each term moves by at most 2 units of its magnitude, plus the float32 accumulation. (The interpreter
    computes tf32 in float32, so there it meets the bound with room; on a GPU it is the bound that matters.)"""
    import torch
    q, w64 = _weights(T.Q6_K, 8)
    x = _activations(20, 768, 9)
    w = torch.from_numpy(q.reshape(-1).copy()).to(device)
    got = tk.gemm(w, T.Q6_K, ROWS, 768, torch.from_numpy(x).to(device), precision=precision).cpu().numpy()
    ref = x.astype(np.float64) @ w64.T
    bound = (2 * unit + unit ** 2) * (np.abs(x.astype(np.float64)) @ np.abs(w64).T) + _float32_bound(x, w64)
    _assert_within(np.abs(got - ref), bound)


def test_matmul_picks_gemm_above_gemv_tokens(tk, device):
    import torch
    q, _ = _weights(T.Q8_0, 10)
    x = torch.from_numpy(_activations(tk.GEMV_MAX_TOKENS + 1, 288, 11)).to(device)
    w = torch.from_numpy(q.reshape(-1).copy()).to(device)
    with pytest.raises(ValueError, match="gemv takes at most"):
        tk.gemv(w, T.Q8_0, ROWS, 288, x)
    np.testing.assert_array_equal(tk.matmul(w, T.Q8_0, ROWS, 288, x).cpu().numpy(),
                                  tk.gemm(w, T.Q8_0, ROWS, 288, x).cpu().numpy())


def test_bad_input_names_the_argument(tk, device):
    import torch
    q, _ = _weights(T.Q8_0, 12)
    w = torch.from_numpy(q.reshape(-1).copy()).to(device)
    x = torch.zeros(288, device=device)
    with pytest.raises(ValueError, match="wtype: no device kernel for Q4_0"):
        tk.gemv(w, T.Q4_0, ROWS, 288, x)
    with pytest.raises(ValueError, match=r"w: expected 36 rows x 306 bytes"):
        tk.gemv(w, T.Q8_0, ROWS - 1, 288, x)
    with pytest.raises(ValueError, match="k: 100 is not a multiple of the Q8_0 block size 32"):
        tk.gemv(w, T.Q8_0, ROWS, 100, torch.zeros(100, device=device))
    with pytest.raises(TypeError, match="w: expected a torch uint8 tensor"):
        tk.gemv(q, T.Q8_0, ROWS, 288, x)
    with pytest.raises(ValueError, match=r"x: expected shape \(288,\)"):
        tk.gemv(w, T.Q8_0, ROWS, 288, torch.zeros(3, 96, device=device))
    with pytest.raises(ValueError, match="precision: expected one of"):
        tk.gemm(w, T.Q8_0, ROWS, 288, x, precision="bf16")
    with pytest.raises(ValueError, match=r"ids: row indices must lie in 0\.\.36"):
        tk.dequantize_rows(w, T.Q8_0, ROWS, 288, torch.tensor([0, ROWS], device=device))


def test_missing_packages_name_the_extra(monkeypatch):
    """Without torch or triton the kernels' import says what to install (runs with or without them)."""
    monkeypatch.setitem(sys.modules, "triton", None)  # None in sys.modules makes `import triton` fail
    monkeypatch.delitem(sys.modules, "flashlite.device.triton_kernels", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'flashlite\[cuda\]'"):
        import flashlite.device.triton_kernels  # noqa: F401


def test_kernels_compile_for_cuda(tk):
    """The interpreter accepts code Triton's compiler rejects (a plain global, say): every kernel compiled for
    sm_90 with the wrappers' configurations, no GPU needed (triton's wheel carries ptxas)."""
    import subprocess
    from pathlib import Path

    import triton
    if not (Path(triton.__file__).parent / "backends" / "nvidia").is_dir():
        pytest.skip("this triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set, so triton 3.9 does not warn about it
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    tool = Path(__file__).resolve().parent.parent / "tools" / "compile_gpu_kernels.py"
    result = subprocess.run([sys.executable, str(tool), "--quick"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in tk.TYPES:
        assert f"{name:8s} gemm tf32" in result.stdout and f"{name:8s} gemv 1 tok" in result.stdout, result.stdout
