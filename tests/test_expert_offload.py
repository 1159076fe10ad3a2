"""Routed experts read from disk under a RAM budget (issue 6): the logits stay bitwise those of the memory-mapped
model for every budget and policy, the counters add up to the experts the oracle's router picked, the usage
histogram survives a restart, and the experts' pages stay out of the process and out of the page cache."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from flashlite import load
from flashlite.cli import main
from flashlite.expert_offload import parse_bytes

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "tiny_v4"


@pytest.fixture(scope="module")
def gguf(tiny_gguf):
    """The oracle model in the default recipe: MXFP4 experts, Q8_0 elsewhere."""
    return tiny_gguf()


@pytest.fixture(scope="module")
def mapped(gguf, goldens):
    """Logits of the prompt, then 8 greedy ids after its first 40 tokens, with every expert memory-mapped."""
    model = load(gguf)
    ids = goldens["prompt_ids"]
    return model.logits(ids, chunk=100), list(model.generate(ids[:40], 8))


def _slot_bytes(gguf) -> int:
    with load(gguf, ram_budget="1G", expert_usage=False) as m:
        return m.stats()["slot_bytes"]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["no-prefetch", "prefetch"])
@pytest.mark.parametrize("per_layer", [1, 2, 5, 8])
def test_logits_bitwise_equal_to_mapped_experts(gguf, goldens, mapped, policy, prefetch, per_layer):
    n_layers = 6
    budget = _slot_bytes(gguf) * n_layers * per_layer
    with load(gguf, ram_budget=budget, expert_policy=policy, expert_prefetch=prefetch, expert_usage=False) as m:
        ids = goldens["prompt_ids"]
        logits = m.logits(ids, chunk=100)
        generated = list(m.generate(ids[:40], 8))
        st = m.stats()
    assert np.array_equal(logits, mapped[0])
    assert generated == mapped[1]
    assert st["slots"] == n_layers * per_layer
    assert st["expert_bytes_read"] >= (st["expert_misses"] + st["prefetches"]) * st["slot_bytes"] // 2 > 0
    assert (st["prefetches"] + st["prefetch_dropped"] > 0) == prefetch  # read, or overtaken by the demand


@pytest.mark.skipif(tuple(int(v) for v in os.uname().release.split(".")[:2] if v.isdigit()) < (5, 14),
                    reason="MADV_POPULATE_WRITE needs Linux 5.14")
def test_slots_are_faulted_in_ahead_of_their_first_read(gguf, mapped, goldens):
    """A background thread faults the whole budget in while the model is idle, and reads landing in slots it is
    populating at the same time come out whole."""
    budget = _slot_bytes(gguf) * 6 * 3  # three slots for each of the 6 MoE layers
    with load(gguf, ram_budget=budget, expert_usage=False) as model:
        np.testing.assert_array_equal(model.logits(goldens["prompt_ids"], chunk=100), mapped[0])
        deadline = time.monotonic() + 60
        while model.stats()["populated_bytes"] < model.stats()["slots"] * model.stats()["slot_bytes"]:
            assert time.monotonic() < deadline, model.stats()
            time.sleep(0.01)
        assert model.stats()["populated_bytes"] == model.stats()["slots"] * model.stats()["slot_bytes"]
        model.reset_stats()
        assert model.stats()["populated_bytes"] == model.stats()["slots"] * model.stats()["slot_bytes"]


def test_counters_match_the_oracle_routing(gguf, goldens):
    """All experts fit: the first prefill misses exactly the (layer, expert) pairs the reference router picked;
    the same prefill again hits all of them and reads nothing."""
    ids, picked = goldens["prompt_ids"], goldens["expert_ids"]  # [layers, tokens, k]
    distinct = sum(len(np.unique(layer)) for layer in picked)
    with load(gguf, ram_budget="1G", expert_prefetch=False, expert_usage=False) as m:
        m.logits(ids)
        first = m.stats()
        m.reset_stats()
        m.logits(ids)
        second = m.stats()
        expert_bytes = sum(w.data.strides[0] for w in (m.net.layers[0].ffn.w1, m.net.layers[0].ffn.w3,
                                                        m.net.layers[0].ffn.w2))
    assert (first["expert_hits"], first["expert_misses"]) == (0, distinct)
    assert distinct * expert_bytes <= first["expert_bytes_read"] <= distinct * first["slot_bytes"]
    assert (second["expert_hits"], second["expert_misses"], second["expert_bytes_read"]) == (distinct, 0, 0)
    assert first["tokens"] == len(ids) and second["tokens"] == len(ids)


class _Picks:
    """A layer's gate that writes down what it picked for the token being decoded."""

    def __init__(self, gate, into: list):
        self.gate, self.into = gate, into

    def __call__(self, x, token_ids):
        weights, idx = self.gate(x, token_ids)
        self.into.append(frozenset(int(e) for e in idx.ravel()))
        return weights, idx

    def __getattr__(self, name):
        return getattr(self.gate, name)


def _decode_picks(gguf, tokens) -> list[list[frozenset]]:
    """Per layer, the experts each one-token forward call picks, as the op-by-op definition computes them (the
    backend's planned decode step picks the same: the two are bitwise equal, tests/test_decode_step.py)."""
    with load(gguf) as m:
        m.net.use_fused_decode(False)
        picks = [[] for _ in m.net.layers]
        for block, into in zip(m.net.layers, picks):
            block.ffn.gate = _Picks(block.ffn.gate, into)
        for token in tokens:
            m.forward([int(token)])
    return picks


@pytest.mark.parametrize("fused", [True, False], ids=["planned", "op-by-op"])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_decode_keeps_the_experts_of_the_token_before(gguf, goldens, policy, fused):
    """With as many slots per layer as experts per token, what a decode step must read is forced, whatever the
    policy: the experts its router picked that the token before in the same layer did not. An expert the step
    already computed must not be evicted for one it still waits for while an older one is there (lfu once did,
    when the computation finished an expert before the read of the next one picked its victim)."""
    n_layer, _, k = goldens["expert_ids"].shape
    tokens = list(goldens["prompt_ids"]) * 2
    picks = _decode_picks(gguf, tokens)
    with load(gguf, ram_budget=k * n_layer * _slot_bytes(gguf), expert_policy=policy, expert_prefetch=False,
              expert_usage=False, io_threads=1) as m:
        m.net.use_fused_decode(fused)
        misses = []
        for token in tokens:
            before = m.stats()["expert_misses"]
            m.forward([int(token)])
            misses.append(m.stats()["expert_misses"] - before)
    forced = [sum(len(layer[0]) for layer in picks)]
    forced += [sum(len(layer[t] - layer[t - 1]) for layer in picks) for t in range(1, len(misses))]
    assert misses == forced


def test_usage_histogram_accumulates_and_pins_the_hottest(gguf, goldens, tmp_path):
    """A run on the first token leaves its experts in the histogram; the next load pins exactly those, so the
    same token then hits every expert without a read."""
    first, picked = goldens["prompt_ids"][:1], goldens["expert_ids"][:, 0]  # [layers, k]
    usage = tmp_path / "usage.npy"
    want = np.zeros((len(picked), 8), np.int64)
    for layer, routes in enumerate(picked):
        want[layer, np.unique(routes)] = 1
    with load(gguf, ram_budget="1G", expert_usage=usage) as m:
        m.logits(first)
    assert np.array_equal(np.load(usage), want)
    budget = _slot_bytes(gguf) * 6 * 4
    runs = {}
    for pin in (0.0, 0.5):
        with load(gguf, ram_budget=budget, expert_usage=usage, pin_fraction=pin, expert_prefetch=False) as m:
            m.logits(first)
            runs[pin] = m.stats()
    assert np.array_equal(np.load(usage), 3 * want)
    assert runs[0.0]["expert_hits"] == 0 and runs[0.0]["expert_misses"] == want.sum()
    assert runs[0.5]["expert_hits"] == want.sum() and runs[0.5]["expert_misses"] == 0


def test_bad_options_name_themselves(gguf):
    with pytest.raises(ValueError, match="ram_budget .* below one expert per MoE layer"):
        load(gguf, ram_budget=1000)
    with pytest.raises(ValueError, match="ram_budget: cannot read"):
        load(gguf, ram_budget="lots")
    with pytest.raises(ValueError, match="expert_policy"):
        load(gguf, ram_budget="1G", expert_policy="fifo")
    assert parse_bytes("24G") == 24 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes("1.5k") == 1536


def test_run_command_reports_the_cache(gguf, goldens, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ids = ",".join(str(i) for i in goldens["prompt_ids"][:20])
    result = CliRunner().invoke(main, ["run", "-m", str(gguf), "--tokens", ids, "-n", "4", "--ram-budget", "2M",
                                       "--expert-policy", "lfu"])
    assert result.exit_code == 0, result.output
    assert "hits" in result.output and "MiB read per token" in result.output
    saved = list((tmp_path / "flashlite").glob("tiny_v4.gguf-*.expert-usage.npy"))
    assert len(saved) == 1 and np.load(saved[0]).sum() > 0


def test_buffered_reads_give_the_same_logits(gguf, mapped, goldens):
    with load(gguf, ram_budget="2M", expert_usage=False, direct_io=False) as m:
        logits = m.logits(goldens["prompt_ids"], chunk=100)
        st = m.stats()
    assert st["direct_io"] is False and st["expert_misses"] > 0
    assert np.array_equal(logits, mapped[0])


FOOTPRINT = r"""
import json, os, sys
import numpy as np
import flashlite
from flashlite._native import lib

path, budget = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDONLY)
os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

def experts_cached():
    return sum(lib.fl_file_cached_bytes(path.encode(), o, n) for o, n in ranges)

direct = sys.argv[3] == "direct"
options = {} if budget == "none" else {"ram_budget": budget, "expert_usage": False, "direct_io": direct}
m = flashlite.load(path, threads=1, **options)
ranges = [(w.offset, w.data.nbytes) for n, w in m.file.tensors.items() if "_exps." in n]
at_load = experts_cached()  # DONTNEED is advice: a few pages may have stayed
ids = np.arange(256) % m.vocab_size
m.logits(ids[:8])
before = rss()
m.logits(ids)
grown = rss() - before
print(json.dumps({"rss_growth": grown, "experts_cached": experts_cached() - at_load,
                  "expert_bytes": sum(n for _, n in ranges),
                  "stats": m.stats()}))
"""


@pytest.fixture(scope="module")
def wide_experts(tmp_path_factory):
    """A synthetic V4 with 4 layers of 256 routed experts (107 MB of MXFP4 experts, 104 KB each)."""
    d = tmp_path_factory.mktemp("wide")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), str(d / "ckpt"), "--preset", "tiny",
                    "--layers", "4", "--experts", "256"], check=True, capture_output=True)
    out = d / "wide.gguf"
    result = CliRunner().invoke(main, ["quantize", str(d / "ckpt"), str(out)])
    assert result.exit_code == 0, result.output
    return out


def _footprint(path, budget, io="direct"):
    run = subprocess.run([sys.executable, "-c", FOOTPRINT, str(path), budget, io], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_footprint_stays_within_the_budget(wide_experts):
    """Mapped, a 256-token prefill pulls most of the experts into the process and the page cache; with an 8 MiB
    budget the process grows by less than the budget plus activations, and the page cache takes no expert pages
    (reads bypass it, and the map is kept from reading ahead into the experts)."""
    mapped = _footprint(wide_experts, "none")
    budgeted = _footprint(wide_experts, "8M")
    buffered = _footprint(wide_experts, "8M", "buffered")
    assert mapped["expert_bytes"] > 100e6
    assert mapped["rss_growth"] > 0.5 * mapped["expert_bytes"]
    assert mapped["experts_cached"] > 0.5 * mapped["expert_bytes"]
    assert budgeted["stats"]["expert_misses"] + budgeted["stats"]["prefetches"] > 500
    assert budgeted["rss_growth"] < 8 * 2**20 + 24 * 2**20
    assert budgeted["experts_cached"] <= 16 * 4096
    assert budgeted["stats"]["direct_io"] and not buffered["stats"]["direct_io"]
    assert buffered["rss_growth"] < 8 * 2**20 + 24 * 2**20
    assert buffered["experts_cached"] <= 16 * 4096  # read through the page cache, then dropped
