"""A decode step of a model whose weights are all on the device reads nothing back to the host but its logits
(docs/gpu.md): the indexer's picks, the routing ids and the attention's rows stay on the device, and a checkpoint
of the KV cache is a copy queued behind the step. On a GPU each read back would stall the host until the device
caught up, and none may happen inside a captured CUDA graph.

Here (torch-cpu) every way a tensor's values reach Python is counted while decode steps run: the backend's
to_host and torch's scalar and array reads. Skipped without torch.
"""
import numpy as np
import pytest

from flashlite.model import load

READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__index__", "__float__", "__array__")


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


class ReadBacks:
    """Records, while installed, each to_host of the torch backend (the shape it brought over) and each other read
    of a tensor's values (the method)."""

    def __init__(self, torch, monkeypatch):
        from flashlite.backends import torch_device
        self.to_host, self.reads, self._inside = [], [], False
        original = torch_device.to_host

        def to_host(x):
            self.to_host.append(tuple(x.shape))
            self._inside = True
            try:
                return original(x)
            finally:
                self._inside = False

        monkeypatch.setattr(torch_device, "to_host", to_host)
        for name in READS:
            method = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, method))

    def _counted(self, name, method):
        def read(tensor, *args, **kwargs):
            if not self._inside:
                self.reads.append(name)
            return method(tensor, *args, **kwargs)
        return read


@pytest.mark.parametrize("kv_format, graphs", [("f32", "off"), ("fp8", "off"), ("f32", "static"), ("fp8", "static")])
def test_a_resident_decode_step_reads_back_only_its_logits(torch, f32_gguf, goldens, monkeypatch, kv_format, graphs):
    """Steps at positions 126..130 of the f32 file: the ratio-4 layers' indexer scores (more than index_topk rows
    are visible), the hash and the scored routing, and the checkpoint at 128; op by op, and with the step's
    segments from static buffers (step_graphs). Each step brings over one [1, vocab] array and reads nothing
    else; the logits are those of the same steps with nothing counted."""
    model = load(f32_gguf, device="torch-cpu", threads=1, kv_format=kv_format)
    model.net.use_step_graphs(graphs)
    ids = goldens["prompt_ids"]
    model.reset()
    model.forward(ids[:126])
    free = [model.forward([t], logits="last") for t in ids[126:131]]
    model.truncate(126)
    with monkeypatch.context() as m:
        counted = ReadBacks(torch, m)
        stepped = []
        for t in ids[126:131]:
            stepped.append(model.forward([t], logits="last"))
            assert counted.reads == [], f"a decode step at {model.cache.pos - 1} read {counted.reads}"
    assert counted.to_host == [(1, model.args.vocab_size)] * 5
    assert 128 in model.cache.checkpoint_positions()
    np.testing.assert_array_equal(np.concatenate(stepped), np.concatenate(free))


def test_the_counter_sees_a_read_back(torch, f32_gguf, goldens, monkeypatch):
    """The indexer's picks brought to the host, as they were before they stayed on the device, are counted."""
    from flashlite.backends import torch_device
    model = load(f32_gguf, device="torch-cpu", threads=1)
    model.reset()
    model.forward(goldens["prompt_ids"][:40])
    topk = torch_device.indexer_topk
    monkeypatch.setattr(torch_device, "indexer_topk", lambda *a: topk(*a).cpu().numpy())
    counted = ReadBacks(torch, monkeypatch)
    model.forward(goldens["prompt_ids"][40:41], logits="last")
    assert counted.reads == ["cpu", "numpy"] * 2  # two ratio-4 layers


@pytest.mark.parametrize("kv_format", ["f32", "fp8"])
def test_a_device_checkpoint_restores_and_saves(torch, f32_gguf, goldens, tmp_path, kv_format):
    """The checkpoint at 128 (host copies queued behind the step, HostCopy) brings a device cache back from 150 to
    133, past a rewind of 8: the tokens from 128 fed again, the continuation is bitwise that of a run fed in the
    same chunks without the detour; a cache saved with the checkpoint and loaded again does the same."""
    from flashlite.backends.torch_device import HostCopy

    model = load(f32_gguf, device="torch-cpu", threads=1, kv_format=kv_format, rewind=8)
    ids = goldens["prompt_ids"]
    model.reset()
    model.forward(ids[:128])
    model.forward(ids[128:133])
    straight = model.forward(ids[133:160])
    model.reset()
    model.forward(ids[:128])
    model.forward(ids[128:150])
    assert model.cache.checkpoint_positions() == [128]
    assert all(isinstance(packed, HostCopy) for layer in model.cache._checkpoints[128] for _, packed in layer)
    model.save_cache(tmp_path / "c.npz")
    model.truncate(133)  # 128's checkpoint, then ids[128:133] in one chunk
    np.testing.assert_array_equal(model.forward(ids[133:160]), straight)
    resumed = model.load_cache(tmp_path / "c.npz")
    model.truncate(133, cache=resumed)
    np.testing.assert_array_equal(model.forward(ids[133:160], cache=resumed), straight)
