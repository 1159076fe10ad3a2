"""The torch backend (flashlite/backends/torch_device.py) on a CPU torch device, against transformers' goldens and
against the CPU backend; the device option's errors. Skipped without torch, except the error torch's absence gives.

On an f32 file the backend computes what the C core computes, in float32: the oracle's logits within the same 1e-4
as tests/test_forward.py. On a quantized file the C core rounds activations to Q8 for its integer dots and this
backend does not, and the tiny random model amplifies that rounding (its routing and indexer decisions flip:
measured on the default recipe, max |torch - cpu| 2.2 over the prompt, median per position 0.12). So the check is
exact instead: the torch backend on the quantized file equals the CPU backend on the same weights decoded to f32
(measured 8.3e-6), i.e. the two differ by the activation rounding and nothing else.
"""
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from flashlite.backends import open_device
from flashlite.cli import main
from flashlite.model import load
from quantized import quantized

CLEAR = 1e-4  # decision gaps at or below this are near-ties (tests/test_forward.py)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def torch_model(torch, f32_gguf):
    """The f32 oracle model on the torch backend, on the CPU (one thread: torch's OpenMP threads thrash on a busy
    machine)."""
    return load(f32_gguf, device="torch-cpu", threads=1)


@pytest.mark.parametrize("chunk", [None, 7, 1], ids=["at-once", "chunks-of-7", "token-by-token"])
def test_prompt_logits_match_goldens(torch_model, goldens, chunk):
    logits = torch_model.logits(goldens["prompt_ids"], chunk=chunk)
    delta = np.abs(logits - goldens["logits"]).max(axis=1)
    clear = goldens["decision_gap"] > CLEAR
    print(f"torch-cpu chunk={chunk}: max |delta| {delta[clear].max():.3g} over {clear.sum()} clear positions")
    assert delta[clear].max() <= 1e-4


def test_greedy_continuation_matches_goldens(torch_model, goldens):
    ids = list(torch_model.generate(goldens["prompt_ids"], len(goldens["greedy_ids"])))
    assert ids == goldens["greedy_ids"].tolist()


@pytest.mark.parametrize("recipe", [(), ("--type", "q4_k")], ids=["mxfp4-q8_0", "q4_k"])
def test_quantized_file_is_the_cpu_backend_without_activation_rounding(torch, tiny_gguf, goldens, tmp_path, recipe):
    path = tiny_gguf(*recipe)
    decoded = quantized(path, tmp_path / "decoded.gguf", "--type", "f32", "--allow-requantize")
    ids = goldens["prompt_ids"]
    on_torch = load(path, device="torch-cpu", threads=1).logits(ids)
    cpu = load(path).logits(ids)
    cpu_decoded = load(decoded).logits(ids)
    rounding = np.abs(cpu - cpu_decoded).max(axis=1)
    print(f"{recipe or 'default'}: max |torch - cpu on decoded| {np.abs(on_torch - cpu_decoded).max():.3g}; "
          f"torch - cpu: max {np.abs(on_torch - cpu).max():.3g}, median per position "
          f"{np.median(np.abs(on_torch - cpu).max(axis=1)):.3g}; the CPU's own activation rounding: max "
          f"{rounding.max():.3g}")
    np.testing.assert_allclose(on_torch, cpu_decoded, rtol=0, atol=1e-4)
    assert rounding.max() > 100 * np.abs(on_torch - cpu_decoded).max()  # the rounding is real, and all there is


def test_cache_lives_on_the_device_truncates_and_saves(torch, torch_model, goldens, tmp_path):
    """The truncation test of tests/test_forward.py (back across a ratio-4 window, into the window ring), on the
    device's logs; then the cache saved and loaded continues as the live one."""
    model = torch_model
    ids = goldens["prompt_ids"][:300]
    model.reset()
    model.forward(ids[:290])
    model.forward(ids[290:297])
    assert all(isinstance(log.rows(log.start, log.end), torch.Tensor) for layer in model.cache.layers
               for log in layer.logs())
    model.truncate(263)
    tail = np.concatenate([model.forward(ids[263:280]), *[model.forward([t]) for t in ids[280:300]]])
    whole = model.logits(ids)[263:]
    np.testing.assert_allclose(tail, whole, rtol=0, atol=2e-5)
    model.reset()
    model.forward(ids[:150])
    model.save_cache(tmp_path / "c.npz")
    resumed = model.load_cache(tmp_path / "c.npz")
    np.testing.assert_array_equal(model.forward(ids[150:160], cache=resumed), model.forward(ids[150:160]))


def test_triton_kernels_serve_the_block_weights(torch, tiny_gguf, monkeypatch):
    """kernels="triton" keeps the quantized matrices as their GGUF bytes and multiplies them with the Triton kernels
    (here in Triton's interpreter; the whole model there is minutes, so a few products of its weights): the same
    products as the float32 values the other mode decodes, to float32 rounding."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernels' module is first imported
        pytest.importorskip("triton", minversion="3.9")
        from flashlite.device import triton_kernels
        if not triton_kernels._INTERPRETED:
            pytest.skip("the kernels were imported compiled, without a GPU to run them")
    from flashlite.backends.torch_device import TorchDevice
    from flashlite.models.deepseek_v4 import linear

    device = "cuda" if torch.cuda.is_available() else "cpu"
    blocks = load(tiny_gguf(), device=TorchDevice(device, kernels="triton", precision="ieee"), threads=1)
    decoded = load(tiny_gguf(), device=TorchDevice(device, kernels="dequantized"), threads=1)
    assert blocks.device.decoded == []  # mxfp4-q8_0: every matrix has a kernel
    rng = np.random.default_rng(0)
    for get, n_tok, expert in [(lambda n: n.layers[2].ffn.w1, 1, 5), (lambda n: n.layers[2].ffn.w2, 3, 0),
                               (lambda n: n.layers[1].attn.wq_b, 12, None), (lambda n: n.head, 2, None)]:
        wb, wd = get(blocks.net), get(decoded.net)
        assert wb.blocks and wb.data.dtype == torch.uint8 and not wd.blocks
        x = torch.from_numpy(rng.standard_normal((n_tok, wb.k)).astype(np.float32)).to(device)
        got, ref = linear(wb, x, expert).cpu().numpy(), linear(wd, x, expert).cpu().numpy()
        w = wd.data[expert] if expert is not None else wd.data
        scale = (x.abs() @ w.abs().T).cpu().numpy()  # sum |x w|: float32 rounding is relative to it
        assert (np.abs(got - ref) <= 1e-5 * scale + 1e-6).all(), wb.name
    ids = np.array([3, 0, 511, 3])
    np.testing.assert_array_equal(blocks.net.embed_tokens(ids).cpu().numpy(),
                                  decoded.net.embed_tokens(ids).cpu().numpy())
    # a MoE layer's routed and shared experts: one grouped_gemm per matrix over the block bytes
    from flashlite.backends.torch_device import moe_experts
    x = torch.from_numpy(rng.standard_normal((5, blocks.args.dim)).astype(np.float32)).to(device)
    idx = torch.tensor([[0, 3], [3, 7], [1, 0], [7, 6], [3, 2]], device=device)
    w = torch.rand(idx.shape, device=device)
    ys = []
    for m in (blocks, decoded):
        f, y = m.net.layers[3].ffn, torch.zeros_like(x)
        moe_experts(x, idx, w, f.w1, f.w3, f.w2, f.limit, y)
        moe_experts(x, torch.zeros((5, 1), dtype=torch.int64), torch.ones((5, 1)), f.s1, f.s3, f.s2, f.shared_limit, y)
        ys.append(y.cpu().numpy())
    np.testing.assert_allclose(ys[0], ys[1], rtol=0, atol=1e-5 * np.abs(ys[1]).max())


def test_device_experts_bring_nothing_to_the_host(torch, torch_model, goldens, monkeypatch):
    """The routed experts on the device are sorted and multiplied there (grouped products): a MoE layer reads no
    value back to the host, so on an accelerator it queues without waiting. Every way a tensor's values reach
    Python raises while the layer runs; the result is still the C core's."""
    from flashlite.backends import cpu
    from flashlite.backends.torch_device import moe_experts

    f = torch_model.net.layers[3].ffn
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, torch_model.args.dim)).astype(np.float32)
    idx = rng.permuted(np.tile(np.arange(8), (6, 1)), axis=1)[:, :2]
    w = rng.uniform(0.2, 1.5, idx.shape).astype(np.float32)
    args = [torch.from_numpy(a) for a in (x, idx, w)]
    out = torch.zeros(x.shape)

    def refuse(*_, **__):
        raise AssertionError("a tensor's values came to the host")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__index__", "__float__", "__array__"):
            m.setattr(torch.Tensor, name, refuse)
        moe_experts(*args, f.w1, f.w3, f.w2, f.limit, out)
    ref = np.zeros_like(x)
    views = [torch_model.file.tensors[f"blk.3.ffn_{n}_exps.weight"] for n in ("gate", "up", "down")]
    cpu.moe_experts(x, idx.astype(np.int32), w, *views, f.limit, ref)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_run_on_torch_cpu_gives_the_cpu_tokens(torch, f32_gguf):
    runs = [CliRunner().invoke(main, ["run", "-m", str(f32_gguf), "--tokens", "5,17,250,3", "-n", "6", *dev])
            for dev in ([], ["-dev", "torch-cpu"])]
    assert all(r.exit_code == 0 for r in runs), runs[1].output
    assert runs[0].stdout == runs[1].stdout


# ---------------------------------------------------------------- the device option's errors


def test_cpu_needs_no_torch_and_a_device_without_it_says_what_to_install(monkeypatch, f32_gguf):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails, as without it installed
    assert open_device("cpu") is None and open_device("auto") is None
    with pytest.raises(RuntimeError, match=r"device 'cuda' needs torch and triton.*pip install 'flashlite\[cuda\]'"):
        load(f32_gguf, device="cuda")


def test_unknown_devices_are_refused(f32_gguf):
    for name in ("gpu", "cuda:x", "torch-cpu:1", ""):
        with pytest.raises(ValueError, match="device: unknown device"):
            open_device(name)
    result = CliRunner().invoke(main, ["run", "-m", str(f32_gguf), "--tokens", "1", "-dev", "tpu"])
    assert result.exit_code == 1 and "Error: device: unknown device 'tpu'; expected one of auto, cpu" in result.output


def test_an_absent_accelerator_is_named(torch, f32_gguf):
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device 'cuda': torch .* sees no CUDA device"):
            load(f32_gguf, device="cuda")
        assert open_device("auto") is None
    else:
        n = torch.cuda.device_count()
        with pytest.raises(RuntimeError, match=f"device 'cuda:{n}': there"):
            load(f32_gguf, device=f"cuda:{n}")
    with pytest.raises(RuntimeError, match="device 'npu' needs torch_npu"):
        load(f32_gguf, device="npu")


def test_what_the_device_backend_does_not_hold_is_refused(torch, f32_gguf):
    with pytest.raises(ValueError, match=r"ram_budget: on device cpu .* holds the routed experts that gpu_mem"):
        load(f32_gguf, device="torch-cpu", ram_budget="1M")  # with gpu_mem it serves those: test_hybrid_placement.py


# ---------------------------------------------------------------- each operation against the C core


def test_each_operation_matches_the_c_core(torch):
    """The torch backend's operations against the CPU backend's (the C core) on random inputs with the edge cases
    the tiny model seldom meets: tied scores (top-k ties go to the lower index in both), -1 picks, queries that see
    no window row, a compressor's first window without the one before it, more picks asked for than rows exist."""
    from flashlite.backends import cpu
    from flashlite.backends import torch_device as td

    rng = np.random.default_rng(1)

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    def close(got, ref, atol=2e-6):
        np.testing.assert_allclose(got.numpy() if hasattr(got, "numpy") else got, ref, rtol=1e-5, atol=atol)

    x = rng.standard_normal((5, 64)).astype(np.float32)
    close(td.hadamard(t(x)), cpu.hadamard(x), 1e-5)
    w = rng.standard_normal(64).astype(np.float32)
    close(td.rms_norm(t(x), t(w), 1e-6), cpu.rms_norm(x, w, 1e-6))
    for overlap, has_prev, n_rows in ((True, True, 3), (True, False, 3), (False, False, 2)):
        r, d = 4, 16
        width = 2 * d if overlap else d
        n_tok = (n_rows + has_prev) * r
        kv, score = (rng.standard_normal((n_tok, width)).astype(np.float32) for _ in range(2))
        close(td.compress_pool(n_rows, r, d, overlap, has_prev, t(kv), t(score), "x"),
              cpu.compress_pool(n_rows, r, d, overlap, has_prev, kv, score, "x"))
    q = rng.standard_normal((4, 3, 32)).astype(np.float32)
    keys = rng.standard_normal((9, 32)).astype(np.float32)
    keys[5] = keys[2]  # a tie
    head_w = rng.standard_normal((4, 3)).astype(np.float32)
    visible = np.array([0, 3, 9, 6], np.int32)
    for topk in (4, 12):
        np.testing.assert_array_equal(td.indexer_topk(t(q), t(keys), t(head_w), visible, topk, 0.2),
                                      cpu.indexer_topk(q, keys, head_w, visible, topk, 0.2))
    window = rng.standard_normal((7, 32)).astype(np.float32)
    ranges = np.array([[0, 0], [0, 3], [2, 7], [6, 7]], np.int32)
    idx = np.array([[-1, -1], [4, -1], [0, 8], [3, 3]], np.int32)
    sinks = rng.standard_normal(3).astype(np.float32)
    close(td.attention_sink(t(q), t(window), ranges, t(keys), idx, t(sinks), 0.3, "x"),
          cpu.attention_sink(q, window, ranges, keys, idx, sinks, 0.3, "x"))
    logits = rng.standard_normal((3, 8)).astype(np.float32) * 10
    logits[1, 2] = logits[1, 6] = 25.0  # a tie, and softplus's linear part
    bias = rng.standard_normal(8).astype(np.float32) * 0.1
    bias[2] = bias[6]
    tid2eid = rng.integers(0, 8, (11, 2)).astype(np.int32)
    ids = np.array([4, 10, 0])
    for b, table in ((bias, None), (None, tid2eid)):
        got_w, got_i = td.moe_route(t(logits), None if b is None else t(b),
                                    None if table is None else t(table.astype(np.int64)), ids, 2, 1.5)
        ref_w, ref_i = cpu.moe_route(logits, b, table, ids, 2, 1.5)
        np.testing.assert_array_equal(got_i.numpy(), ref_i)
        close(got_w, ref_w)
