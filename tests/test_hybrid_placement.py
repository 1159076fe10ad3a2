"""Hybrid placement (flashlite/backends/placement.py) on a CPU torch device: gpu_mem keeps part of the model on
the "device" and the rest in the file for the C core. The logits stay transformers' (the f32 file, the same 1e-4
as tests/test_forward.py); a MoE layer split between the two computes what each side computes alone (quantized
files, exactly up to float32 rounding); the order in which classes and experts are placed; the errors.
The placement's own arithmetic (the order) runs without torch."""
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from flashlite.backends import placement
from flashlite.cli import main
from flashlite.model import load

CLEAR = 1e-4  # decision gaps at or below this are near-ties (tests/test_forward.py)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _sizes(path, kv_format="f32"):
    """The placement's byte counts of a file on torch-cpu (a budget that holds everything)."""
    p = load(path, device="torch-cpu", threads=1, gpu_mem="1T", kv_format=kv_format).device.placement
    base = sum(p.device_bytes[c] for c in ("kv_cache", "dense", "head_embed", "shared_experts"))
    return p, base, p.device_bytes["routed_experts"] // (len(p.experts) * p.n_expert)


# ---------------------------------------------------------------- the whole model, against the goldens


@pytest.mark.parametrize("what", ["some-routed", "no-routed", "dense-only", "expert-cache"])
def test_hybrid_logits_match_goldens(torch, f32_gguf, goldens, tmp_path, what):
    """some-routed: 20 of 48 routed experts on the device (two layers whole, one split, three on the host);
    no-routed: head and shared experts there, every routed expert on the host; dense-only: the least budget, the
    head, the embedding and the shared experts on the host too; expert-cache: some-routed with the host's experts
    read from the file by the expert cache (ram_budget)."""
    from flashlite.backends.torch_device import DeviceWeight, HostWeight, SplitExperts

    full, base, per_expert = _sizes(f32_gguf)
    kv_dense = full.device_bytes["kv_cache"] + full.device_bytes["dense"]
    budget = {"some-routed": base + 20 * per_expert + per_expert // 2, "no-routed": base + per_expert - 1,
              "dense-only": kv_dense, "expert-cache": base + 20 * per_expert + per_expert // 2}[what]
    extra = dict(ram_budget="4M", expert_usage=False) if what == "expert-cache" else {}
    model = load(f32_gguf, device="torch-cpu", threads=1, gpu_mem=budget, **extra)
    p = model.device.placement
    routed = [type(layer.ffn.w1) for layer in model.net.layers]
    if what in ("some-routed", "expert-cache"):
        assert routed == [DeviceWeight, DeviceWeight, SplitExperts, HostWeight, HostWeight, HostWeight]
        assert p.experts[2].tolist() == [0, 1, 2, 3]
    else:
        assert routed == [HostWeight] * 6 and p.routed_on_device() == 0
    host_head = what == "dense-only"
    assert isinstance(model.net.head, HostWeight) == host_head == isinstance(model.net.embed, HostWeight)
    assert isinstance(model.net.layers[0].ffn.s1, HostWeight) == host_head
    logits = model.logits(goldens["prompt_ids"])
    delta = np.abs(logits - goldens["logits"]).max(axis=1)
    clear = goldens["decision_gap"] > CLEAR
    print(f"{what}: {p}\nmax |delta| {delta[clear].max():.3g} over {clear.sum()} clear positions")
    assert delta[clear].max() <= 1e-4
    if what == "expert-cache":
        st = model.stats()
        assert st["expert_misses"] > 0 and st["expert_bytes_read"] > 0  # the host's experts came through the cache
        # the disk prefetch runs on a device too (the predicted ids brought to the host), and changes no bit
        assert st["prefetches"] + st["prefetch_dropped"] > 0
        unfetched = load(f32_gguf, device="torch-cpu", threads=1, gpu_mem=budget, expert_prefetch=False, **extra)
        np.testing.assert_array_equal(unfetched.logits(goldens["prompt_ids"]), logits)
        assert unfetched.stats()["prefetches"] == 0
    ids = list(model.generate(goldens["prompt_ids"][:40], 8))
    assert ids == list(load(f32_gguf).generate(goldens["prompt_ids"][:40], 8))  # decode through the split too


def test_hybrid_equals_the_device_and_the_cpu_backend(torch, f32_gguf, goldens):
    """Token by token and at once, the split model agrees with all on the device and with the CPU backend to
    float32 rounding (not only within the goldens' bound)."""
    _, base, per_expert = _sizes(f32_gguf)
    ids = goldens["prompt_ids"][:64]
    hybrid = load(f32_gguf, device="torch-cpu", threads=1, gpu_mem=base + 27 * per_expert)
    device = load(f32_gguf, device="torch-cpu", threads=1).logits(ids)
    cpu = load(f32_gguf).logits(ids)
    for chunk in (None, 1):
        got = hybrid.logits(ids, chunk=chunk)
        np.testing.assert_allclose(got, device, rtol=0, atol=2e-5)
        np.testing.assert_allclose(got, cpu, rtol=0, atol=2e-5)


# ---------------------------------------------------------------- the host's share on a worker thread


def _host_calls(monkeypatch):
    """The threads the C core's expert calls run on, recorded (tests wrap backends.cpu.moe_experts)."""
    from flashlite.backends import cpu

    threads, call = [], cpu.moe_experts
    monkeypatch.setattr(cpu, "moe_experts", lambda *a: (threads.append(threading.current_thread().name), call(*a)))
    return threads


def _steps(model, ids, n_prefill):
    """Logits of a prefill of ids[:n_prefill] and of each later token as a decode step."""
    model.reset()
    return np.concatenate([model.forward(ids[:n_prefill])] + [model.forward([t]) for t in ids[n_prefill:]])


@pytest.mark.parametrize("kv_format", ["f32", "fp8"])
@pytest.mark.parametrize("what", ["plain", "expert-cache", "step-graphs"])
def test_overlapped_host_experts_give_the_same_bits(torch, f32_gguf, goldens, monkeypatch, kv_format, what):
    """The split layer's host experts run on the worker thread while the calling thread runs the device's routed
    experts and the shared expert, and the logits of a prefill and of decode steps are bitwise those of the C call
    on the calling thread after the device's share (overlap off, as before the worker); the CPU backend's within
    float32 rounding (fp8: tests/test_device_kv.py's bound). expert-cache: the host's experts through the expert
    cache with its disk prefetch; step-graphs: decode steps from static segments, the split layer's MoE sublayer
    op by op between them."""
    _, base, per_expert = _sizes(f32_gguf, kv_format)
    extra = dict(ram_budget="4M", expert_usage=False) if what == "expert-cache" else {}
    model = load(f32_gguf, device="torch-cpu", threads=1, gpu_mem=base + 20 * per_expert + per_expert // 2,
                 kv_format=kv_format, **extra)
    assert [type(layer.ffn.w1).__name__ for layer in model.net.layers][2] == "SplitExperts"
    if what == "step-graphs":
        model.net.use_step_graphs("static")
    ids = goldens["prompt_ids"][:40]
    threads = _host_calls(monkeypatch)
    overlapped = _steps(model, ids, 32)
    # every forward's split layer ran its C call on the worker, the host-only layers' on the caller
    assert threads.count("MainThread") == 3 * 9 and len(threads) == 4 * 9
    assert all(t.startswith("flashlite-host-experts") for t in threads if t != "MainThread")
    if what == "step-graphs":
        assert model.net.graphs.replays > 0 and model.net.layers[2].ffn_segment is None
    if what == "expert-cache":
        assert model.stats()["prefetches"] + model.stats()["prefetch_dropped"] > 0
    model.device.host_experts.overlap = False
    threads.clear()
    in_turn = _steps(model, ids, 32)
    assert threads == ["MainThread"] * 4 * 9
    np.testing.assert_array_equal(overlapped, in_turn)
    cpu = _steps(load(f32_gguf, kv_format=kv_format), ids, 32)
    if kv_format == "f32":
        np.testing.assert_allclose(overlapped, cpu, rtol=0, atol=2e-5)
    else:  # float32 rounding may put a row's value on the other side of an fp8 boundary (tests/test_device_kv.py)
        delta = np.abs(overlapped - cpu).max(axis=1)
        assert np.median(delta) <= 3e-4 and (overlapped.argmax(1) == cpu.argmax(1)).mean() >= 0.95
    model.close()


def test_a_worker_error_surfaces_in_the_caller_and_close_stops_the_worker(torch, f32_gguf, goldens, monkeypatch):
    from flashlite.backends import cpu

    _, base, per_expert = _sizes(f32_gguf)
    model = load(f32_gguf, device="torch-cpu", threads=1, gpu_mem=base + 20 * per_expert + per_expert // 2)
    ids = goldens["prompt_ids"][:8]
    expected = model.logits(ids)
    call = cpu.moe_experts

    def failing(*args):
        if threading.current_thread().name.startswith("flashlite-host-experts"):
            raise RuntimeError("blk.2.ffn_gate_exps.weight: the disk went away")
        return call(*args)

    monkeypatch.setattr(cpu, "moe_experts", failing)
    with pytest.raises(RuntimeError, match="blk.2.ffn_gate_exps.weight: the disk went away"):
        model.logits(ids)
    monkeypatch.setattr(cpu, "moe_experts", call)
    np.testing.assert_array_equal(model.logits(ids), expected)  # the worker survives its call's error
    worker = model.device.host_experts.submit(threading.current_thread).result()
    assert worker.is_alive() and worker.name.startswith("flashlite-host-experts")
    model.close()
    assert not worker.is_alive()
    assert not [t for t in threading.enumerate() if t.name.startswith("flashlite-host-experts")]
    np.testing.assert_array_equal(model.logits(ids), expected)  # a later call starts a worker again
    model.close()


# ---------------------------------------------------------------- a split MoE layer on quantized files


@pytest.mark.parametrize("recipe", [(), ("--type", "q4_k")], ids=["mxfp4-q8_0", "q4_k"])
def test_a_split_layer_is_the_sum_of_its_two_sides(torch, tiny_gguf, recipe):
    """On a quantized file the C core rounds the host experts' activations to Q8 and the device does not, so the
    split model is neither all-device nor all-CPU; what it must be is exactly the device's products of its
    experts plus the C core's of the others. For every split layer, with tokens that route to device experts
    only, host experts only, and both (several tokens of one expert, a token whose host experts are fewer than
    another's, so the padding shows): split_experts equals the device backend on every expert with the host
    experts' weights zeroed plus the CPU backend on the file with the device experts' weights zeroed."""
    from flashlite.backends import cpu
    from flashlite.backends import torch_device as td

    path = tiny_gguf(*recipe)
    _, base, per_expert = _sizes(path)
    hybrid = load(path, device="torch-cpu", threads=1, gpu_mem=base + 19 * per_expert)
    device = load(path, device="torch-cpu", threads=1)
    rng = np.random.default_rng(3)
    split = [i for i, layer in enumerate(hybrid.net.layers) if isinstance(layer.ffn.w1, td.SplitExperts)]
    assert split == [2]
    for i in split:
        h, d = hybrid.net.layers[i].ffn, device.net.layers[i].ffn
        on_device = hybrid.device.placement.experts[i]
        assert on_device.tolist() == [0, 1, 2]
        idx = np.array([[0, 1], [5, 7], [2, 6], [7, 0], [3, 4], [1, 0], [6, 6], [2, 3]], np.int64)
        w = rng.uniform(0.2, 1.5, idx.shape).astype(np.float32)
        x = rng.standard_normal((idx.shape[0], hybrid.args.dim)).astype(np.float32)
        got = torch.zeros(x.shape)
        td.moe_experts(torch.from_numpy(x), torch.from_numpy(idx), torch.from_numpy(w), h.w1, h.w3, h.w2, h.limit,
                       got)
        dev_pair = np.isin(idx, on_device)
        ref = torch.zeros(x.shape)
        td.moe_experts(torch.from_numpy(x), idx, np.where(dev_pair, w, 0).astype(np.float32), d.w1, d.w3, d.w2,
                       d.limit, ref)
        host = np.zeros_like(x)
        views = [hybrid.file.tensors[f"blk.{i}.ffn_{m}_exps.weight"] for m in ("gate", "up", "down")]
        cpu.moe_experts(x, idx.astype(np.int32), np.where(dev_pair, 0, w).astype(np.float32), *views, h.limit, host)
        expected = ref.numpy() + host
        assert np.abs(host).max() > 0.1 and np.abs(ref.numpy()).max() > 0.1  # both sides contribute
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


# ---------------------------------------------------------------- the order


def _args(n_layers=2, n_expert=4):
    return SimpleNamespace(n_layers=n_layers, n_routed_experts=n_expert, compress_ratios=(0,) * n_layers,
                           window_size=8, head_dim=16, index_head_dim=8, rope_head_dim=8)


def _views(n_layers=2, expert_bytes=(100, 100)):
    """name -> bytes the device would hold, for the placement's nbytes: dense 1000, head + embedding 300, shared
    experts 60 per layer, routed experts expert_bytes[layer] each (three matrices of 4 experts)."""
    v = {"blk.0.attn_q_a.weight": 1000, "token_embd.weight": 100, "output.weight": 200}
    for i in range(n_layers):
        for m in ("gate", "up", "down"):
            v[f"blk.{i}.ffn_{m}_shexp.weight"] = 20
            v[f"blk.{i}.ffn_{m}_exps.weight"] = 4 * expert_bytes[i] // 3
    return v


def test_placement_order_is_kv_dense_head_shared_then_hottest_experts():
    args = _args()
    kv = placement.kv_cache_bytes(args, 64, 0)
    assert kv == 2 * 4 * 8 * 16  # two window logs of 8 rows x 16 floats (no rewind)

    def plan(budget, usage=None, expert_bytes=(99, 99)):
        return placement.plan(args, _views(2, expert_bytes), lambda n: n, kv + budget, kv, usage)

    def on_device(p):
        return [c for c in placement.CLASSES if p.device_bytes[c]]

    assert on_device(plan(1299)) == ["kv_cache", "dense"]  # the head does not fit: nothing after it either
    assert on_device(plan(1300 + 119)) == ["kv_cache", "dense", "head_embed"]
    p = plan(1300 + 120 + 99 * 3 + 98)
    assert on_device(p) == list(placement.CLASSES) and p.routed_on_device() == 3
    assert [e.tolist() for e in p.experts] == [[0, 1, 2], []]  # layer order without a histogram
    assert p.host_bytes == {"kv_cache": 0, "dense": 0, "head_embed": 0, "shared_experts": 0, "routed_experts": 5 * 99}
    usage = np.array([[5, 0, 9, 1], [7, 9, 0, 3]], np.int64)
    p = plan(1300 + 120 + 99 * 4, usage)
    assert [e.tolist() for e in p.experts] == [[0, 2], [0, 1]]  # 9 (layer 0's first), 9, 7, 5
    # strict: the hottest expert that does not fit stops the routed experts, though a colder one would fit
    p = plan(1300 + 120 + 150, np.array([[0, 0, 0, 0], [1, 0, 0, 0]], np.int64), expert_bytes=(99, 300))
    assert p.routed_on_device() == 0 and p.device_bytes["shared_experts"] == 120
    assert p.resident("blk.1.ffn_up_exps.weight").size == 0 and p.resident("blk.0.ffn_gate_shexp.weight") is None
    everything = plan(10**6)
    assert everything.resident("blk.0.ffn_down_exps.weight") is None and everything.resident("output.weight") is None


def test_placement_bytes_are_what_the_device_holds(torch, f32_gguf, tmp_path):
    """The load's placement message, its bytes per class equal to the tensors uploaded, and the hottest routed
    experts taken from the expert-usage histogram."""
    from flashlite.backends.torch_device import DeviceWeight, SplitExperts

    _, base, per_expert = _sizes(f32_gguf)
    usage = np.zeros((6, 8), np.int64)
    usage[4, [6, 1]] = [50, 40]
    usage[0, 3] = 30
    usage[5, :] = 1
    np.save(tmp_path / "usage.npy", usage)
    model = load(f32_gguf, device="torch-cpu", threads=1, gpu_mem=base + 5 * per_expert,
                 expert_usage=tmp_path / "usage.npy")
    p = model.device.placement
    assert [e.tolist() for e in p.experts] == [[3], [], [], [], [1, 6], [0, 1]]
    held = {c: 0 for c in placement.CLASSES}
    for layer in model.net.layers:
        for w in (layer.ffn.w1, layer.ffn.w3, layer.ffn.w2):
            held["routed_experts"] += w.device.data.nbytes if isinstance(w, SplitExperts) else 0
        for w in (layer.ffn.s1, layer.ffn.s3, layer.ffn.s2):
            held["shared_experts"] += w.data.nbytes
    held["head_embed"] = model.net.head.data.nbytes + model.net.embed.data.nbytes
    assert isinstance(model.net.head, DeviceWeight)
    assert held["routed_experts"] == p.device_bytes["routed_experts"] == 5 * per_expert
    assert held["shared_experts"] == p.device_bytes["shared_experts"]
    assert held["head_embed"] == p.device_bytes["head_embed"]
    text = str(p)
    assert "routed experts 5/48" in text and "on the CPU: routed experts" in text


# ---------------------------------------------------------------- the options and their errors


def test_gpu_mem_errors(torch, f32_gguf):
    full, _, _ = _sizes(f32_gguf)
    need = full.device_bytes["kv_cache"] + full.device_bytes["dense"]
    with pytest.raises(ValueError, match=rf"gpu_mem \(--gpu-mem\) {need - 1} bytes .* is below what the device must "
                                         rf"hold: {need} bytes"):
        load(f32_gguf, device="torch-cpu", gpu_mem=need - 1)
    with pytest.raises(ValueError, match="gpu_mem: cannot read 'lots' as a size"):
        load(f32_gguf, device="torch-cpu", gpu_mem="lots")
    with pytest.raises(ValueError, match="gpu_mem: a device memory budget needs a device backend"):
        load(f32_gguf, gpu_mem="1G")
    result = CliRunner().invoke(main, ["run", "-m", str(f32_gguf), "--tokens", "1", "-dev", "torch-cpu",
                                       "--gpu-mem", str(need - 1)])
    assert result.exit_code == 1 and f"below what the device must hold: {need} bytes" in result.output


def test_run_with_gpu_mem_reports_the_placement_and_gives_the_cpu_tokens(torch, f32_gguf):
    _, base, per_expert = _sizes(f32_gguf)
    runs = [CliRunner().invoke(main, ["run", "-m", str(f32_gguf), "--tokens", "5,17,250,3", "-n", "6", *dev])
            for dev in ([], ["-dev", "torch-cpu", "--gpu-mem", str(base + 10 * per_expert)])]
    assert all(r.exit_code == 0 for r in runs), runs[1].output
    assert runs[0].stdout == runs[1].stdout
    assert "routed experts 10/48" in runs[1].stderr and "on the CPU: routed experts" in runs[1].stderr


def test_the_expert_cache_pins_the_hottest_of_the_hosts_experts(torch, f32_gguf, tmp_path, monkeypatch):
    """With ram_budget the expert cache pins the hottest experts of the saved histogram; those the device holds
    are never asked of it, so it pins the hottest of the others."""
    from flashlite.expert_offload import ExpertCache

    pinned = []
    pin = ExpertCache._pin_hottest
    monkeypatch.setattr(ExpertCache, "_pin_hottest", lambda self, counts, fraction: (
        pinned.append([np.argsort(-row, kind="stable")[0] for row in counts]), pin(self, counts, fraction)))
    _, base, per_expert = _sizes(f32_gguf)
    usage = np.zeros((6, 8), np.int64)
    usage[:, 0] = 9  # each layer's hottest: the device takes layer 0's to 3's
    usage[:, 5] = 4
    np.save(tmp_path / "usage.npy", usage)
    model = load(f32_gguf, device="torch-cpu", threads=1, gpu_mem=base + 4 * per_expert, ram_budget="4M",
                 expert_usage=tmp_path / "usage.npy", pin_fraction=0.5)
    assert [e.tolist() for e in model.device.placement.experts] == [[0], [0], [0], [0], [], []]
    assert pinned == [[5, 5, 5, 5, 0, 0]]  # one slot of three per layer
    model.close()
