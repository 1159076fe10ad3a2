"""A decode step's segments from static buffers (flashlite/device/step_graphs.py): on torch-cpu in the "static" mode,
which is the "cuda" mode without torch.cuda.graph (the same static buffers, in-place updates, segment split and
refused uploads); on a CUDA device, if there is one, the captured graphs themselves. Skipped without torch.
"""
import numpy as np
import pytest
from click.testing import CliRunner

from flashlite.cli import main
from flashlite.model import load

STEPS = slice(126, 140)  # past the indexer's top-k (4 rows), across the checkpoint at 128 and two ratio-4 closings


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _decode(model, ids, mode: str) -> np.ndarray:
    """The last-position logits of the steps at STEPS after a prefill of the tokens before, in step-graph mode."""
    model.net.use_step_graphs(mode)
    model.reset()
    model.forward(ids[:STEPS.start])
    return np.concatenate([model.forward([t], logits="last") for t in ids[STEPS]])


@pytest.mark.parametrize("kv_format", ["f32", "fp8"])
def test_static_segments_give_the_op_by_op_logits(torch, f32_gguf, goldens, kv_format):
    """Every layer's attention collapse, projections, output and MoE sublayer and the head run from static buffers
    at each step (the prefill, a batch of 126, runs op by op; the ratio-4 layers' projections in their variant with
    the indexer's, which scores from position 19 on), the buffers stay where they are, and the logits are the
    op-by-op ones bit for bit."""
    model = load(f32_gguf, device="torch-cpu", threads=1, kv_format=kv_format)
    ids = goldens["prompt_ids"]
    eager = _decode(model, ids, "off")
    assert model.net.graphs is None
    model.net.use_step_graphs("static")
    g = model.net.graphs
    n_steps, n_layers = STEPS.stop - STEPS.start, model.args.n_layers
    n_scored = sum(r == 4 for r in model.args.compress_ratios)
    assert len(g.segments) == 4 * n_layers + 1 + n_scored  # the ratio-4 layers' projections in two variants
    model.reset()
    model.forward(ids[:STEPS.start])
    assert (g.replays, g.eager) == (0, 3 * n_layers + 1)  # the prefill: every segment's function but projections
    steps = [model.forward([ids[STEPS.start]], logits="last")]
    used = [s for s in g.segments if s.inputs is not None]
    assert len(used) == 4 * n_layers + 1 and all("scoring" in s.name for s in used if "projections" in s.name
                                                  and model.args.compress_ratios[int(s.name[4])] == 4)
    addresses = [[b.data_ptr() for b in s.inputs + list(s.outputs)] for s in used]
    steps += [model.forward([t], logits="last") for t in ids[STEPS.start + 1:STEPS.stop]]
    assert [[b.data_ptr() for b in s.inputs + list(s.outputs)] for s in used] == addresses
    assert g.replays == n_steps * len(used) and not g.failures
    np.testing.assert_array_equal(np.concatenate(steps), eager)


def test_the_indexers_first_scores_switch_the_projections_variant(torch, f32_gguf, goldens):
    """Steps at 12..24 cross position 19, from which the ratio-4 layers' indexer scores (more than index_topk = 4
    rows visible): both variants of their projections' segment run, and the logits are the op-by-op ones."""
    model = load(f32_gguf, device="torch-cpu", threads=1)
    ids = goldens["prompt_ids"]
    logits = {}
    for mode in ("off", "static"):
        model.net.use_step_graphs(mode)
        model.reset()
        model.forward(ids[:12])
        logits[mode] = np.concatenate([model.forward([t], logits="last") for t in ids[12:25]])
    for block in model.net.layers:
        if block.attn.indexer is not None:
            assert all(s.inputs is not None for s in block.attn.project_segments.values()), block.layer
    np.testing.assert_array_equal(logits["static"], logits["off"])


def test_an_upload_inside_a_segment_is_refused(torch, f32_gguf, goldens, monkeypatch):
    """Inside a captured graph an upload would replay the capture's bytes: the shared expert's ids made on the
    host (as they were before they were made on the device) stop the step, naming its segment."""
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
    with pytest.raises(RuntimeError, match="blk.0 MoE sublayer: a host array of shape .1, 1. uploaded inside"):
        model.forward(goldens["prompt_ids"][30:31])


def test_host_weights_end_segments(torch, f32_gguf, goldens):
    """Hybrid placement with 20 of 48 routed experts on the device (layers 0 and 1 whole, 2 split, 3-5 on the
    host): only layers 0 and 1 get a MoE segment; every attention collapse and output and the head get theirs; the
    logits are the op-by-op ones."""
    from flashlite.backends.torch_device import HostWeight

    full = load(f32_gguf, device="torch-cpu", threads=1, gpu_mem="1T").device.placement
    base = sum(full.device_bytes[c] for c in ("kv_cache", "dense", "head_embed", "shared_experts"))
    per_expert = full.device_bytes["routed_experts"] // (len(full.experts) * full.n_expert)
    model = load(f32_gguf, device="torch-cpu", threads=1, gpu_mem=base + 20 * per_expert + per_expert // 2)
    ids = goldens["prompt_ids"]
    eager = _decode(model, ids, "off")
    stepped = _decode(model, ids, "static")
    layers = model.net.layers
    assert [b.ffn_segment is not None for b in layers] == [True, True, False, False, False, False]
    assert isinstance(layers[3].ffn.w1, HostWeight)
    assert all(b.attn_segment is not None and b.attn_finish_segment is not None for b in layers)
    assert model.net.head_segment is not None
    np.testing.assert_array_equal(stepped, eager)


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
    assert not g.failures and g.replays > 0 and all(s.graph is not None for s in g.segments)
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
