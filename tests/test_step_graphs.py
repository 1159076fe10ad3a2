"""A decode step's segments from static buffers (flashlite/device/step_graphs.py): on torch-cpu in the "static" mode,
which is the "cuda" mode without torch.cuda.graph (the same static buffers, in-place updates, segment split and
refused uploads); on a CUDA device, if there is one, the captured graphs themselves. Skipped without torch.
"""
import numpy as np
import pytest
from click.testing import CliRunner

from flashlite import backends as backend
from flashlite.cli import main
from flashlite.model import load

STEPS = slice(126, 140)  # past the indexer's top-k (4 rows), across the checkpoint at 128 and two ratio-4 closings
# The heads over the KV rings (flashlite/device/step_heads.py) add the masked rows' exact zeros to the softmax's
# sums, grouped otherwise than op by op's shorter sums: the logits agree to float32 rounding, which the fp8 cache's
# rounding of the rows a step writes can turn into a step of one e4m3 code in a later layer (up to 3e-5 seen here,
# on logits of magnitude 1-5). A wrong row, slot or mask moves them by 1e-2 or more.
ATOL = 1e-4


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _decode(model, ids, mode: str, steps: slice = STEPS) -> np.ndarray:
    """The last-position logits of the steps at `steps` after a prefill of the tokens before, in step-graph mode."""
    model.net.use_step_graphs(mode)
    model.reset()
    model.forward(ids[:steps.start])
    return np.concatenate([model.forward([t], logits="last") for t in ids[steps]])


def _rings(model) -> list:
    """Each layer's KV rings as (address, capacity)."""
    return [[(log.buffer.data_ptr(), log.capacity) for log in layer.logs()] for layer in model.cache.layers]


@pytest.mark.parametrize("kv_format", ["f32", "fp8"])
@pytest.mark.parametrize("steps", [slice(12, 36), slice(124, 132)])
def test_a_resident_step_is_one_segment_that_follows_op_by_op(torch, f32_gguf, goldens, kv_format, steps):
    """A model wholly on the device runs a decode step as one segment (layers.LayerRun: every layer's attention
    collapse, projections, heads over the KV rings, output and MoE sublayer, then the head), one per KV format, over
    steps that cross the ratio-4 windows' closings and the indexer's first scores (from position 19, more than
    index_topk = 4 rows visible), the doublings of the rings (16 -> 32 -> 64 positions; 128 -> 256) and the
    ratio-128 layers' first row (position 127); the prefill runs the same functions op by op. The static buffers
    stay where they are; the rings move only when one doubles, and the segment is bound again exactly then (not
    after a reset, which empties the rings in place). The logits follow op by op's to ATOL, the greedy tokens are
    the same."""
    ids = goldens["prompt_ids"]
    eager = _decode(load(f32_gguf, device="torch-cpu", threads=1, kv_format=kv_format), ids, "off", steps)
    model = load(f32_gguf, device="torch-cpu", threads=1, kv_format=kv_format)  # rings of a fresh cache
    model.net.use_step_graphs("static")
    g = model.net.graphs
    assert [s.name for s in g.segments] == ["blk.0-5 and head (f32 KV)", "blk.0-5 and head (fp8 KV)"]
    model.reset()
    model.forward(ids[:steps.start])
    assert (g.replays, g.eager) == (0, 0)  # the prefill runs the functions themselves
    stepped = [model.forward([ids[steps.start]], logits="last")]
    rings = [_rings(model)]  # after each step: the rings it read and wrote
    used, = [s for s in g.segments if s.inputs is not None]
    assert kv_format in used.name
    addresses = [b.data_ptr() for b in used.inputs + list(used.outputs)]
    for t in ids[steps.start + 1:steps.stop]:
        stepped.append(model.forward([t], logits="last"))
        rings.append(_rings(model))
    assert [b.data_ptr() for b in used.inputs + list(used.outputs)] == addresses
    assert g.replays == steps.stop - steps.start and not g.failures
    moves = sum(a != b for a, b in zip(rings, rings[1:]))
    assert moves >= 1 and used.bindings == 1 + moves  # a ring doubled within the steps
    model.reset()  # the cache emptied in place: the same rings, no new binding (no capture on CUDA)
    model.forward(ids[:steps.start])
    model.forward([ids[steps.start]], logits="last")
    assert used.bindings == 1 + moves and _rings(model) == rings[-1]
    stepped = np.concatenate(stepped)
    np.testing.assert_allclose(stepped, eager, rtol=0, atol=ATOL)
    assert (stepped.argmax(1) == eager.argmax(1)).all()


def test_an_upload_inside_a_segment_is_refused(torch, f32_gguf, goldens, monkeypatch):
    """Inside a captured graph an upload would replay the capture's bytes: the shared expert's ids made on the
    host (as they were before they were made on the device) stop the step, naming its segment (the whole step)."""
    from flashlite.backends import torch_device

    model = load(f32_gguf, device="torch-cpu", threads=1)
    model.net.use_step_graphs("static")
    model.forward(goldens["prompt_ids"][:30])
    experts = torch_device.moe_experts

    def host_ids(x, idx, weights, *rest):
        if idx is None:
            idx, weights = np.zeros((x.shape[0], 1), np.int32), np.ones((x.shape[0], 1), np.float32)
        experts(x, idx, weights, *rest)

    monkeypatch.setattr(torch_device, "moe_experts", host_ids)
    with pytest.raises(RuntimeError, match=r"blk.0-5 and head \(f32 KV\): a host array of shape .1, 1. uploaded"):
        model.forward(goldens["prompt_ids"][30:31])


@pytest.mark.parametrize("kv_format", ["f32", "fp8"])
def test_host_weights_end_segments(torch, f32_gguf, goldens, kv_format):
    """Hybrid placement with 20 of 48 routed experts on the device (layers 0 and 1 whole, 2 split, 3-5 on the
    host): layers 0 and 1 and layer 2's attention are one segment, each of layers 3-5's attention (the windows'
    closings, the indexer's scores and a doubling at 128 among the steps) another, the head its own; the MoE
    sublayers of layers 2-5 run op by op between them; the logits follow the op-by-op ones."""
    from flashlite.backends.torch_device import HostWeight

    full = load(f32_gguf, device="torch-cpu", threads=1, kv_format=kv_format, gpu_mem="1T").device.placement
    base = sum(full.device_bytes[c] for c in ("kv_cache", "dense", "head_embed", "shared_experts"))
    per_expert = full.device_bytes["routed_experts"] // (len(full.experts) * full.n_expert)
    model = load(f32_gguf, device="torch-cpu", threads=1, kv_format=kv_format,
                 gpu_mem=base + 20 * per_expert + per_expert // 2)
    ids = goldens["prompt_ids"]
    eager = _decode(model, ids, "off")
    stepped = _decode(model, ids, "static")
    layers, g = model.net.layers, model.net.graphs
    assert isinstance(layers[3].ffn.w1, HostWeight)
    runs = model.net.step_runs
    assert [(r.start, r.stop, r.attention_only) for r in runs.values()] == [(0, 3, True), (3, 4, True), (4, 5, True),
                                                                            (5, 6, True)]
    assert all(b.attn_segment is None and b.ffn_segment is None and b.attn.step_heads is None for b in layers)
    assert model.net.head_segment is not None
    used = sorted(s.name for s in g.segments if s.inputs is not None)
    assert used == [f"blk.0-2 (blk.2's attention) ({kv_format} KV)"] + [
        f"blk.{i}-{i} (blk.{i}'s attention) ({kv_format} KV)" for i in (3, 4, 5)] + ["head"]
    np.testing.assert_allclose(stepped, eager, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kv_format", ["f32", "fp8"])
def test_a_rollback_restores_the_rings(torch, f32_gguf, goldens, kv_format):
    """With the heads over the rings, a cache goes back in place (from 40 to 27: the counts and ends move back, the
    rows past them are overwritten or masked) and past its rewind of 8 through the checkpoint at 128 (from 150 to
    133: the ring rows restored in place, ids[128:133] fed again op by op), and decodes on as op by op does after
    the same rollbacks."""
    model = load(f32_gguf, device="torch-cpu", threads=1, kv_format=kv_format, rewind=8)
    ids = goldens["prompt_ids"]
    got = {}
    for mode in ("off", "static"):
        model.net.use_step_graphs(mode)
        model.reset()
        model.forward(ids[:12])
        for t in ids[12:40]:
            model.forward([t])
        model.truncate(27)
        logits = [model.forward([t], logits="last") for t in ids[27:36]]
        model.forward(ids[36:126])
        for t in ids[126:150]:
            model.forward([t])
        rings = _rings(model)
        model.truncate(133)
        assert _rings(model) == rings  # restored in place
        logits += [model.forward([t], logits="last") for t in ids[133:141]]
        got[mode] = np.concatenate(logits)
    np.testing.assert_allclose(got["static"], got["off"], rtol=0, atol=ATOL)
    assert (got["static"].argmax(1) == got["off"].argmax(1)).all()


def test_sequences_taking_turns_keep_their_bindings(torch, f32_gguf, goldens):
    """Two sequences' caches taking turns, a step each (a server's way): the step's segment is bound once to each
    cache's rings and then replays the one it is handed (Segment.kept), where each turn would capture again; each
    sequence's logits are those of decoding it alone."""
    model = load(f32_gguf, device="torch-cpu", threads=1)
    ids = goldens["prompt_ids"]
    alone = [_decode(model, ids[k:], "static", slice(36, 44)) for k in (0, 50)]
    caches = [model.new_cache(), model.new_cache()]
    for k, cache in zip((0, 50), caches):
        model.forward(ids[k:k + 36], cache=cache)
    segment = model.net.step_runs[0].segments["f32"]
    before = segment.bindings
    turns = [[], []]
    for i in range(36, 44):
        for k, cache, out in zip((0, 50), caches, turns):
            out.append(model.forward([ids[k + i]], cache=cache, logits="last"))
    assert segment.bindings == before + 2 and len(segment.kept) == 2  # the other turn's, and the solo cache's
    for got, expected in zip(turns, alone):
        np.testing.assert_allclose(np.concatenate(got), expected, rtol=0, atol=ATOL)


def test_a_step_in_one_segment_gives_the_taps(torch, f32_gguf, goldens):
    """A DSpark draft reads the mean of the streams entering layers of the target (taps): a resident step in one
    segment gives them too (the run's second output), as op by op does, to ATOL."""
    model = load(f32_gguf, device="torch-cpu", threads=1)
    ids = goldens["prompt_ids"]
    got = {}
    for mode in ("off", "static"):
        model.net.use_step_graphs(mode)
        model.reset()
        model.forward(ids[:30])
        taps = {1: None, 4: None, 6: None}
        model.forward(ids[30:31], taps=taps)
        got[mode] = np.concatenate([np.asarray(backend.to_host(taps[k])) for k in sorted(taps)])
    assert model.net.graphs.replays == 1
    np.testing.assert_allclose(got["static"], got["off"], rtol=0, atol=ATOL)


class _WrongThird:
    """A drafter that, every other round, proposes plain decoding's continuation with the third token of each
    draft wrong (a draft of three or more passes in part, and the rows of its rejected tokens are rolled back),
    and nothing in the rounds between (a single decode step)."""

    cost, context_rows = None, 0

    def __init__(self, prompt, continuation):
        self.at, self.continuation = len(prompt), continuation
        self.proposed = self.rounds = 0

    def propose(self, tokens, k):
        self.rounds += 1
        if self.rounds % 2 == 0:
            return []
        out = list(self.continuation[len(tokens) - self.at:][:k])
        if len(out) >= 3:
            out[2] = (out[2] + 1) % 512
        self.proposed += len(out)
        return out

    def capture(self):
        return {}

    def observe(self, captured, start, rows):
        pass


def test_speculation_with_the_step_graphs_decodes_as_plain(torch, f32_gguf, goldens):
    """Greedy speculation on the device with the heads over the rings (drafts verified op by op as a batch, the
    rejected tokens' rows rolled back, single steps from the segments) gives plain op-by-op decoding's tokens."""
    from flashlite import speculative as sp

    model = load(f32_gguf, device="torch-cpu", threads=1)
    prompt = goldens["prompt_ids"][:24].tolist()
    model.net.use_step_graphs("off")
    plain = list(model.generate(prompt, 30))
    model.net.use_step_graphs("static")
    speculator = sp.Speculator(model, model.new_cache(), sp.SpecOptions("ngram", 4, adaptive=False))
    speculator.drafter = drafter = _WrongThird(prompt, plain)
    stream = speculator.tokens(list(prompt), list(prompt))
    out = [next(stream) for _ in range(29)]
    stream.close()
    assert out == plain[:29]
    assert drafter.proposed > 0 and model.net.graphs.replays > 0


def test_a_segment_handed_other_shapes_makes_new_inputs(torch):
    """A segment's host arrays go up in one copy into views of one buffer; arguments of other shapes (more or
    fewer positional inputs) get new static inputs, and a state at other addresses a new binding."""
    from flashlite.device.step_graphs import StepGraphs

    g = StepGraphs("static", torch.device("cpu"))
    seg = g.segment(lambda x, k, slots, ring: (ring.index_copy_(0, slots, x), x.sum(1) * k.sum())[1], "t", [])
    ring = torch.zeros(4, 3)
    x = torch.ones(1, 3)
    assert seg(x, np.array([2.0], np.float32), np.array([1]), state=(ring,)).tolist() == [6.0]
    first = seg.inputs
    assert seg(2 * x, np.array([1.0, 2.0], np.float32), np.array([3]), state=(ring,)).tolist() == [18.0]
    assert seg.inputs is not first and seg.bindings == 2  # new inputs: bound again
    assert ring[:, 0].tolist() == [0.0, 1.0, 0.0, 2.0]
    assert seg(x, np.array([1.0, 1.0], np.float32), np.array([0]), state=(torch.zeros(4, 3),)).tolist() == [6.0]
    assert seg.bindings == 3 and g.replays == 3


def test_step_graph_modes_are_checked(torch, f32_gguf):
    model = load(f32_gguf, device="torch-cpu", threads=1)
    with pytest.raises(ValueError, match="step graphs: expected one of off, static, cuda, got 'graph'"):
        model.net.use_step_graphs("graph")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        model.net.use_step_graphs("cuda")
    with pytest.raises(ValueError, match="the CPU backend runs a decode step as one planned call"):
        load(f32_gguf).net.use_step_graphs("static")


def test_cuda_graphs_replay_the_op_by_op_step(torch, f32_gguf, goldens):
    """On a CUDA device load captures the segments at the first step and replays them: greedy tokens as op by op
    (cuda_graphs=False) and the goldens', logits within float32 reordering of each other."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ids, n = goldens["prompt_ids"], len(goldens["greedy_ids"])
    graphed = load(f32_gguf, device="cuda")
    eager = load(f32_gguf, device="cuda", cuda_graphs=False)
    assert graphed.net.graphs.mode == "cuda" and eager.net.graphs is None
    assert list(graphed.generate(ids, n)) == list(eager.generate(ids, n)) == goldens["greedy_ids"].tolist()
    g = graphed.net.graphs
    assert not g.failures and g.replays > 0 and all(s.graph is not None for s in g.segments if s.inputs is not None)
    np.testing.assert_allclose(_decode(graphed, ids, "cuda"), _decode(eager, ids, "off"), rtol=0, atol=1e-4)


def test_the_commands_pass_no_cuda_graphs_to_load(torch, f32_gguf, monkeypatch):
    """--no-cuda-graphs reaches load as cuda_graphs=False (the default True), and the tokens are the CPU's."""
    import flashlite.model

    seen = []
    real = flashlite.model.load
    monkeypatch.setattr(flashlite.model, "load", lambda *a, **kw: seen.append(kw["cuda_graphs"]) or real(*a, **kw))
    base = ["run", "-m", str(f32_gguf), "--tokens", "5,17,250,3", "-n", "6"]
    runs = [CliRunner().invoke(main, base + flags) for flags in ([], ["-dev", "torch-cpu", "--no-cuda-graphs"])]
    assert all(r.exit_code == 0 for r in runs), runs[1].output
    assert seen == [True, False] and runs[0].stdout == runs[1].stdout
