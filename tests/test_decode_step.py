"""The CPU backend's fused decode steps (flashlite/backends/cpu.py, csrc/v4_step.c, csrc/v4_attn.c) against the
model definition run op by op: bitwise the same logits, token by token and in the short batches that verify drafts,
through rollbacks and compressor boundaries, for f32 and fp8 KV rows, f32 and quantized weights, memory-mapped and
disk-cached experts; and the router against numpy."""
from pathlib import Path

import numpy as np
import pytest

from flashlite.backends import cpu
from flashlite.model import load
from flashlite.models import deepseek_v4 as v4

SMALL = Path(__file__).parent / "fixtures" / "small_v4"


def _decode(m, ids, fused: bool, schedule=(5, 30, 13, 40)) -> np.ndarray:
    """Logits of a prefill of `prefill` tokens, then one token a step to position `to`, a rollback to `back`, and
    steps again to `end` (by default across ratio-4 boundaries, into the window, with the indexer picking from
    position 19 on): every step's last row."""
    prefill, to, back, end = schedule
    m.net.use_fused_decode(fused)
    m.reset()
    rows = [m.forward(ids[:prefill])[-1]]
    rows += [m.forward([t])[-1] for t in ids[prefill:to]]
    m.truncate(back)
    rows += [m.forward([t])[-1] for t in ids[back:end]]
    m.net.use_fused_decode(True)
    return np.array(rows)


@pytest.mark.parametrize("kv_format", ["f32", "fp8"])
@pytest.mark.parametrize("recipe", [("--type", "f32"), ()], ids=["f32", "default-recipe"])
def test_fused_decode_is_bitwise_the_op_by_op_definition(tiny_gguf, goldens, recipe, kv_format):
    m = load(tiny_gguf(*recipe), kv_format=kv_format)
    ids = goldens["prompt_ids"][:40]
    fused, op_by_op = _decode(m, ids, True), _decode(m, ids, False)
    assert np.isfinite(fused).all()
    assert np.array_equal(fused, op_by_op)


def test_decode_steps_that_dump_run_the_two_sublayer_calls_bitwise_too(tiny_gguf, goldens):
    """A dump wants the state between the sublayers, so the step runs attention and MoE as two planned calls."""
    m = load(tiny_gguf())
    ids = goldens["prompt_ids"][:40]
    m.reset()
    m.forward(ids[:5])
    dumped = []
    for t in ids[5:40]:
        dump = {}
        dumped.append(m.forward([t], dump=dump)[-1])
        assert f"blk.{m.args.n_layers - 1}.attn" in dump
    assert np.array_equal(np.array(dumped), _decode(m, ids, False, (5, 40, 40, 40))[1:])


def test_fused_decode_bitwise_on_q8_0_and_the_trained_small_model(tiny_gguf, tmp_path):
    from click.testing import CliRunner
    from flashlite.cli import main
    small = tmp_path / "small_v4.gguf"
    assert CliRunner().invoke(main, ["quantize", str(SMALL), str(small), "--quiet"]).exit_code == 0
    for path in (tiny_gguf("--type", "q8_0"), small):
        m = load(path, kv_format="fp8")
        ids = np.random.default_rng(1).integers(0, m.vocab_size, 40)
        assert np.array_equal(_decode(m, ids, True), _decode(m, ids, False)), path


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    from click.testing import CliRunner
    from flashlite.cli import main
    out = tmp_path_factory.mktemp("small") / "small_v4.gguf"
    assert CliRunner().invoke(main, ["quantize", str(SMALL), str(out), "--quiet"]).exit_code == 0
    return out


VERIFY_SIZES = (2, 3, 4, 5, 6, 7, 8, 9, v4.STEP_MAX_TOKENS)


@pytest.mark.parametrize("kv_format", ["f32", "fp8"])
@pytest.mark.parametrize("weights", ["f32", "default", "q8_0", "Q4_K_M", "bf16", "small"])
def test_verified_batches_are_bitwise_planned_steps(tiny_gguf, small_gguf, weights, kv_format, monkeypatch):
    """Batches of 2..16 tokens (y and the drafts of a round) through the planned whole-step call, each rolled back past
    part of it as after a partial acceptance, from position 5 across window, ratio-4 and indexer boundaries and
    the first ratio-128 row: every row is the bits of the same tokens fed one planned step at a time, and of the
    batch run op by op."""
    path = small_gguf if weights == "small" else tiny_gguf(*(() if weights == "default" else ("--type", weights)))
    m = load(path, kv_format=kv_format)
    planned = []
    step = v4.backend.model_step  # the seam the model calls: every layer in one call
    monkeypatch.setattr(v4.backend, "model_step", lambda *a: planned.append(a[4].shape[0]) or step(*a))
    ids = np.random.default_rng(7).integers(0, m.vocab_size, 400).tolist()
    batched, single, defined = m.new_cache(), m.new_cache(), m.new_cache()
    for cache in (batched, single, defined):
        m.forward(ids[:5], cache=cache)
    pos, rnd = 5, 0
    while pos < 140:
        n = VERIFY_SIZES[rnd % len(VERIFY_SIZES)]
        keep = n - 1 if rnd % 4 == 3 else (rnd * 5) % n  # drafts accepted: all of them every fourth round
        batch = ids[pos:pos + n]
        rows = m.forward(batch, cache=batched)
        assert np.array_equal(rows, np.concatenate([m.forward([t], cache=single) for t in batch])), (pos, n)
        m.net.use_fused_decode(False)
        assert np.array_equal(rows, m.forward(batch, cache=defined)), (pos, n)
        m.net.use_fused_decode(True)
        for cache in (batched, single, defined):
            m.truncate(pos + 1 + keep, cache=cache)
        pos, rnd = pos + 1 + keep, rnd + 1
    assert np.isfinite(rows).all()
    assert set(VERIFY_SIZES) <= set(planned)  # the batches ran the planned calls


@pytest.mark.parametrize("kv_format", ["f32", "fp8"])
def test_fused_decode_bitwise_across_the_first_ratio_128_row(tiny_gguf, goldens, kv_format):
    """Position 127 closes the first ratio-128 row, before and after a rollback across it; with rewind 4 the
    rollback restores the checkpoint at 0 and feeds the tokens again."""
    m = load(tiny_gguf(), kv_format=kv_format, rewind=4)
    ids = goldens["prompt_ids"][:140]
    schedule = (120, 135, 126, 140)
    assert np.array_equal(_decode(m, ids, True, schedule), _decode(m, ids, False, schedule))


def test_fused_decode_with_experts_from_the_disk_cache(tiny_gguf, goldens):
    path = tiny_gguf()
    ids = goldens["prompt_ids"][:40]
    mapped = _decode(load(path), ids, False)
    with load(path, ram_budget="1G", expert_prefetch=False, expert_usage=False) as m:
        assert all(b.ffn_plan is not None for b in m.net.layers)
        assert np.array_equal(_decode(m, ids, True), mapped)
        assert m.stats()["expert_misses"] > 0


def test_route_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    t, n_expert, k, vocab = 9, 16, 4, 50
    logits = (rng.standard_normal((t, n_expert)) * 8).astype(np.float32)
    logits[0, 3] = 30.0  # above softplus' linear threshold
    bias = (rng.standard_normal(n_expert) * 0.1).astype(np.float32)
    tokens = rng.integers(0, vocab, t)
    scores = np.sqrt(np.where(logits > 20, logits, np.log1p(np.exp(np.minimum(logits, 20.0)))).astype(np.float64))
    weights, idx = cpu.moe_route(logits, bias, None, tokens, k, 1.5)
    want = np.argsort(-(scores + bias), axis=1, kind="stable")[:, :k]
    assert np.array_equal(idx, want)  # best first
    picked = np.take_along_axis(scores, want, axis=1)
    np.testing.assert_allclose(weights, picked / picked.sum(axis=1, keepdims=True) * 1.5, rtol=2e-6)
    table = rng.integers(0, n_expert, (vocab, k)).astype(np.int32)
    weights, idx = cpu.moe_route(logits, None, table, tokens, k, 1.0)
    assert np.array_equal(idx, table[tokens])
    picked = np.take_along_axis(scores, table[tokens].astype(np.int64), axis=1)
    np.testing.assert_allclose(weights, picked / picked.sum(axis=1, keepdims=True), rtol=2e-6)
    with pytest.raises(ValueError, match="fl_moe_route"):
        cpu.moe_route(logits, None, table, np.full(t, vocab), k, 1.0)
