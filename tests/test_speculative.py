"""Speculative decoding (flashlite/speculative.py, flashlite/mtp.py, quantize --mtp): a verified batch computes
what feeding its tokens one by one computes, so greedy output with any drafter and draft length is plain decoding's,
token for token, on the oracle (tiny_v4) and the trained model (small_v4); sampled output keeps the model's
distribution; the MTP draft file is llama.cpp's layout and its block is the trainer's MTPBlock."""
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from flashlite import speculative as sp
from flashlite.chat.sampling import Sampler
from flashlite.cli import main
from flashlite.gguf_file import GGUFFile
from flashlite.model import load
from quantized import quantized

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny_v4"
SMALL = ROOT / "tests" / "fixtures" / "small_v4"
LENGTHS = (1, 2, 3, 4, 8, sp.MAX_DRAFT)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """GGUFs of both fixtures, default recipe (MXFP4 experts, Q8_0 rest: 8-bit activations in decode) and f32,
    with their MTP drafts."""
    d = tmp_path_factory.mktemp("spec")
    out = {}
    for name, src in (("tiny", TINY), ("small", SMALL)):
        out[name] = quantized(src, d / f"{name}.gguf")
        out[name + "-f32"] = quantized(src, d / f"{name}-f32.gguf", "--type", "f32")
        out["mtp-" + name] = quantized(src, d / f"mtp-{name}.gguf", "--mtp")
        out["mtp-" + name + "-f32"] = quantized(src, d / f"mtp-{name}-f32.gguf", "--type", "f32", "--mtp")
    return out


@pytest.fixture(scope="module")
def models(files):
    loaded = {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in loaded:
            loaded[key] = load(files[name], **kw)
        return loaded[key]

    return get


# ------------------------------------------------------------------------- a batch is the tokens one by one

@pytest.mark.parametrize("name,kv_format,start", [("tiny", "f32", 40), ("tiny-f32", "f32", 40), ("tiny", "fp8", 100),
                                                  ("small", "f32", 120), ("small", "fp8", 60)])
def test_batch_is_bitwise_the_tokens_one_by_one(models, name, kv_format, start):
    """Every row of a batch of up to MAX_DRAFT + 1 tokens equals feeding them one at a time, bit for bit: across
    sliding windows, compressed-row boundaries (ratio 4 and 128), crowded indexer queries, and in both cache
    formats; with 8-bit activations (the Q8_0 / MXFP4 file) as with f32."""
    m = models(name, kv_format=kv_format)
    ids = np.random.default_rng(start).integers(3, m.vocab_size, start + 3 * (sp.MAX_DRAFT + 1)).tolist()
    for s in range(start, start + 3 * (sp.MAX_DRAFT + 1), sp.MAX_DRAFT + 1):
        a, b = m.new_cache(), m.new_cache()
        m.forward(ids[:s], cache=a, logits="none")
        m.forward(ids[:s], cache=b, logits="none")
        batch = m.forward(ids[s:s + sp.MAX_DRAFT + 1], cache=a)
        single = np.concatenate([m.forward([t], cache=b) for t in ids[s:s + sp.MAX_DRAFT + 1]])
        assert np.array_equal(batch, single), (s, np.abs(batch - single).max())


@pytest.mark.parametrize("n", [16, 23])
def test_a_prefill_sized_batch_is_too(models, n):
    """A batch of 16 tokens or more (once a separate f32 prefill path in the core) is bitwise token by token too
    on a quantized model."""
    m = models("small")
    ids = np.random.default_rng(3).integers(3, m.vocab_size, 40 + n).tolist()
    a, b = m.new_cache(), m.new_cache()
    m.forward(ids[:40], cache=a, logits="none")
    m.forward(ids[:40], cache=b, logits="none")
    batch = m.forward(ids[40:40 + n], cache=a)
    single = np.concatenate([m.forward([t], cache=b) for t in ids[40:40 + n]])
    assert np.array_equal(batch, single)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_rolling_back_rejected_drafts_is_exact(models, name):
    """Feed a batch, roll back past part of it, go on: the logits are those of never having fed the rest."""
    m = models(name)
    ids = np.random.default_rng(5).integers(3, m.vocab_size, 200).tolist()
    a, b = m.new_cache(), m.new_cache()
    m.forward(ids[:120], cache=a, logits="none")
    m.forward(ids[:120], cache=b, logits="none")
    pos = 120
    rng = np.random.default_rng(6)
    for k, keep in ((8, 3), (14, 0), (5, 5), (9, 1)):
        batch = [ids[pos]] + rng.integers(3, m.vocab_size, k).tolist()
        m.forward(batch, cache=a)
        m.truncate(pos + 1 + keep, cache=a)
        for t in batch[:1 + keep]:
            m.forward([t], cache=b)
        pos += 1 + keep
        assert a.pos == b.pos == pos
        assert np.array_equal(a.token_ids, b.token_ids)
        assert np.array_equal(m.forward([ids[pos]], cache=a), m.forward([ids[pos]], cache=b))
        pos += 1


# ------------------------------------------------------------------------- greedy identity, each drafter and length

def _prompt(m, n=24, repeat=16, seed=11):
    ids = np.random.default_rng(seed).integers(3, m.vocab_size, n).tolist()
    return ids + ids[:repeat]  # a repeated span gives the n-gram drafter something to find


@pytest.mark.parametrize("kind", ["ngram", "mtp"])
@pytest.mark.parametrize("name", ["tiny", "tiny-f32", "small", "small-f32"])
def test_greedy_generate_is_plain_decoding(models, files, name, kind):
    m = models(name)
    draft = str(files["mtp-" + name]) if kind == "mtp" else None
    prompt = _prompt(m)
    plain = list(m.generate(prompt, 40))
    for n in LENGTHS:
        m.reset_stats()
        spec = list(m.generate(prompt, 40, spec_type=sp.SpecOptions(kind, n, draft, adaptive=False)))
        assert spec == plain, (kind, n)
        st = m.stats()
        assert st["spec_rounds"] > 0 and st["drafted_tokens"] >= st["accepted_tokens"]


def test_the_trained_mtp_block_drafts_what_the_model_says(models, files):
    """On the trained model the MTP block's first draft is mostly right, and the n-gram drafter finds the
    prompt's repeats: both save forward passes, with the answer unchanged."""
    m = models("small")
    messages = [{"role": "user", "content": "Hello! Who are you?"}]
    plain = m.chat(messages, stream=False, max_tokens=48, temperature=0)
    for options in (sp.SpecOptions("mtp", 1, str(files["mtp-small"]), adaptive=False),
                    sp.SpecOptions("mtp", 3, str(files["mtp-small"]), adaptive=False)):
        m.reset_stats()
        out = m.chat(messages, stream=False, max_tokens=48, temperature=0, spec_type=options)
        assert out[-1].token_ids == plain[-1].token_ids
        st = m.stats()
        assert st["accepted_tokens"] >= 0.5 * st["spec_rounds"], st
        assert st["spec_rounds"] < len(plain[-1].token_ids) * 0.75, st
    # asked again, the model says again what it said: prompt lookup drafts nearly all of it
    q = [{"role": "user", "content": "What does os.path.join do?"}]
    said = "".join(p.text for p in m.chat(q, stream=False, max_tokens=80, temperature=0) if p.kind == "content")
    again = q + [{"role": "assistant", "content": said}, {"role": "user", "content": q[0]["content"]}]
    plain = m.chat(again, stream=False, max_tokens=80, temperature=0)
    m.reset_stats()
    out = m.chat(again, stream=False, max_tokens=80, temperature=0, spec_type=sp.SpecOptions("ngram", 8, adaptive=False))
    assert out[-1].token_ids == plain[-1].token_ids
    st = m.stats()
    assert st["accepted_tokens"] > 0.8 * len(plain[-1].token_ids) and st["spec_rounds"] < 16, st


def test_chat_with_speculation_answers_and_caches_as_without(models, files):
    """Stops (EOS, stop strings, max_tokens), finish reasons, pieces, and the conversation's cache afterwards are
    plain decoding's; a second turn reuses the cache either way."""
    m = models("small")
    draft = str(files["mtp-small"])
    q1 = [{"role": "user", "content": "What does the os module do?"}]
    for kw in (dict(max_tokens=30), dict(max_tokens=200), dict(max_tokens=200, stop=["module"])):
        caches = []
        answers = []
        for spec in (None, "mtp", "ngram"):
            cache = m.new_cache()
            extra = {} if spec is None else dict(spec_type=spec, spec_draft_n_max=4,
                                                  model_draft=draft if spec == "mtp" else None)
            first = m.chat(q1, stream=False, temperature=0, cache=cache, **kw, **extra)
            text = "".join(p.text for p in first if p.kind == "content")
            q2 = q1 + [{"role": "assistant", "content": text}, {"role": "user", "content": "And the sys module?"}]
            second = m.chat(q2, stream=False, temperature=0, cache=cache, max_tokens=20, **extra)
            answers.append([(p.kind, p.text, p.finish_reason, p.token_ids, p.cached_tokens) for p in first + second])
            caches.append((cache.pos, cache.token_ids.tolist()))
        assert answers[1] == answers[0] and answers[2] == answers[0], kw
        assert caches[1] == caches[0] and caches[2] == caches[0], kw
    m.reset_stats()
    done = m.chat(q1, stream=False, temperature=0, max_tokens=40, spec_type="mtp", model_draft=draft)[-1]
    assert done.drafted_tokens == m.stats()["drafted_tokens"] > 0
    assert done.accepted_tokens == m.stats()["accepted_tokens"]


def test_cancel_and_context_end_as_without(models, files):
    import threading

    m = models("small")
    q = [{"role": "user", "content": "Hello! Who are you?"}]
    cancel = threading.Event()
    cancel.set()
    done = m.chat(q, stream=False, cancel=cancel, spec_type="ngram")[-1]
    assert done.finish_reason == "cancelled" and done.completion_tokens == 0
    small = load(files["small"], ctx=40)
    plain = small.chat(q, stream=False, temperature=0)[-1]
    spec = small.chat(q, stream=False, temperature=0, spec_type="mtp", model_draft=files["mtp-small"])[-1]
    assert plain.finish_reason == spec.finish_reason == "length" and plain.token_ids == spec.token_ids


def test_create_chat_completion_and_defaults_from_load(files):
    m = load(files["small"], spec_type="mtp", spec_draft_n_max=3, model_draft=files["mtp-small"])
    messages = [{"role": "user", "content": "Hello! Who are you?"}]
    with_spec = m.create_chat_completion(messages, max_tokens=24, temperature=0)
    assert m.stats()["drafted_tokens"] > 0
    m.reset_stats()
    plain = m.create_chat_completion(messages, max_tokens=24, temperature=0, spec_type="none")
    assert m.stats()["drafted_tokens"] == 0
    assert with_spec["choices"] == plain["choices"] and with_spec["usage"] == plain["usage"]


def test_options_are_checked(models, files):
    m = models("small")
    with pytest.raises(ValueError, match="spec_type"):
        list(m.generate([5, 6], 2, spec_type="eagle"))
    with pytest.raises(ValueError, match="spec_draft_n_max"):
        list(m.generate([5, 6], 2, spec_type="ngram", spec_draft_n_max=sp.MAX_DRAFT + 1))
    with pytest.raises(ValueError, match="MTP draft"):
        list(m.generate([5, 6], 2, spec_type="mtp"))
    with pytest.raises(ValueError, match="not an MTP draft"):
        list(m.generate([5, 6], 2, spec_type="mtp", model_draft=files["small"]))
    with pytest.raises(ValueError, match="another model"):
        list(m.generate([5, 6], 2, spec_type="mtp", model_draft=files["mtp-tiny"]))
    with pytest.raises(ValueError, match="dspark"):
        list(m.generate([5, 6], 2, spec_type="draft-dspark"))
    with pytest.raises(ValueError, match="sampler"):
        list(m.generate([5, 6], 2, sampler=lambda row: 0, spec_type="ngram"))
    assert sp.parse_spec_type("draft-mtp") == "mtp" and sp.parse_spec_type("ngram-simple") == "ngram"
    # a draft file without a type is an MTP draft, as llama.cpp reads -md alone
    assert m.spec_options(model_draft=files["mtp-small"]).type == "mtp"


# ------------------------------------------------------------------------- sampling keeps the distribution

def _chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the cells expecting >= 5 (the rest pooled) and its degrees of freedom."""
    n = counts.sum()
    expect = probs * n
    big = expect >= 5
    c = np.append(counts[big], counts[~big].sum())
    e = np.append(expect[big], expect[~big].sum())
    keep = e > 0
    return float(((c[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum() - 1)


def _chi2_limit(df: int, z: float = 4.0) -> float:
    """The chi-square quantile at a normal z (Wilson-Hilferty): z = 4 is a one-sided p of 3e-5."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _wrong_accept(rows, drafts, history, sampler, q=None):
    """A plausible mistake: on rejection, draw from p itself instead of the residual max(0, p - q)."""
    out = []
    for j, d in enumerate(drafts):
        p = sampler.probs(rows[j], history)
        if sampler.rng.random() >= p[d]:
            t = int(np.searchsorted(np.cumsum(p), sampler.rng.random() * p.sum(), side="right"))
            return out + [t]
        out.append(d)
    return out + [sampler(rows[len(drafts)], history)]


@pytest.mark.parametrize("stochastic", [False, True], ids=["one-hot draft", "sampled draft"])
def test_acceptance_rule_keeps_the_distribution(stochastic):
    """Over 40000 rounds with a fixed seed, the first token a round yields follows p(row 0), and the second
    (given the first draft passed) p(row 1); the same test on a wrong rule fails."""
    rng = np.random.default_rng(0)
    v = 8
    rows = rng.normal(0, 1.5, (3, v)).astype(np.float32)
    q = [None, None]
    draw = np.random.default_rng(1)

    def run(rule, n):
        s = Sampler(temperature=0.9, top_k=6, seed=2)
        first, second = np.zeros(v, int), np.zeros(v, int)
        for _ in range(n):
            if stochastic:
                q[0] = draw.dirichlet(np.ones(v))
                q[1] = draw.dirichlet(np.ones(v))
                drafts = [int(draw.choice(v, p=q[0])), int(draw.choice(v, p=q[1]))]
                out = rule(rows, drafts, [], s, q)
            else:
                drafts = [2, 5]
                out = rule(rows, drafts, [], s)
            first[out[0]] += 1
            if out[0] == drafts[0] and len(out) > 1:
                second[out[1]] += 1
        p0, p1 = s.probs(rows[0]), s.probs(rows[1])
        return _chi2(first, p0), _chi2(second, p1)

    for (stat, df) in run(sp.accept, 40000):
        assert stat < _chi2_limit(df), (stat, df)
    if not stochastic:
        (stat, df), _ = run(_wrong_accept, 40000)
        assert stat > _chi2_limit(df), "the test cannot tell a wrong rule"


def test_sampled_generation_keeps_the_distribution(models, files):
    """End to end on the trained model with its MTP drafts: the second generated token (the first one a verified
    batch decides) follows sum_t1 p(t1) p(t2 | t1), computed from the model's own rows (a high temperature over the
    top 4 spreads it over 14 tokens, so that drafts are rejected about half the time)."""
    from flashlite.chat.completion import prompt_ids

    m = models("small")
    prompt = prompt_ids(m, [{"role": "user", "content": "Hello! Who are you?"}])
    kw = dict(temperature=8.0, top_k=4)
    p1 = Sampler(**kw).probs(m.logits(prompt)[-1])
    exact = np.zeros(m.vocab_size)
    for t1 in np.flatnonzero(p1):
        exact += p1[t1] * Sampler(**kw).probs(m.logits(prompt + [int(t1)])[-1])
    options = sp.SpecOptions("mtp", 2, str(files["mtp-small"]), adaptive=False)
    counts = np.zeros(m.vocab_size, int)
    m.reset_stats()
    for seed in range(400):
        out = list(m.generate(prompt, 2, sampler=Sampler(seed=seed, **kw), spec_type=options))
        counts[out[1]] += 1
    st = m.stats()
    assert 0.2 * st["drafted_tokens"] < st["accepted_tokens"] < 0.8 * st["drafted_tokens"], st
    stat, df = _chi2(counts, exact)
    assert df >= 8 and stat < _chi2_limit(df, 3.5), (stat, df)


# ------------------------------------------------------------------------- drafters and the draft-length control

def test_ngram_drafter_finds_the_longest_confident_match():
    """llama.cpp's ngram-cache rule: the longest n-gram ending the sequence whose continuations are confident, its
    most frequent continuation (the latest among equals), a token at a time through the drafts' own n-grams,
    stopping where no n-gram is confident."""
    d = sp.NgramDrafter(n_min=2, n_max=3)
    seq = [1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 2, 3]
    # "7 2 3" never occurred; "2 3" twice, followed by 4 and 5 (half each: the latest, 5); then "2 3 5" -> 7 and
    # "3 5 7" -> 2, once each (enough for a 3-gram); "5 7 2" -> 3
    assert d.propose(seq, 3) == [5, 7, 2]
    assert d.propose(seq + [5], 2) == [7, 2]  # counted incrementally
    assert d.propose([8, 8, 9], 4) == []  # a new sequence is counted afresh; "8 9" never occurred before
    d = sp.NgramDrafter()
    assert d.propose([1, 2, 1, 2], 5) == []  # "1 2" and "2" were followed once each: too few for 1- and 2-grams
    assert d.propose([1, 2, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]  # "1 2 1 2" -> 1 once, then through the drafts
    d = sp.NgramDrafter(n_min=1, n_max=1)
    assert d.propose([5, 1, 5, 1, 5, 2, 5], 3) == [1, 5, 1]  # "5" -> 1 two times in three: the most frequent
    assert d.propose([5, 1, 5, 2, 5], 3) == []  # "5" -> 1 once, 2 once: not confident
    with pytest.raises(ValueError, match="n-gram sizes"):
        sp.NgramDrafter(n_min=1, n_max=5)


def test_draft_control_turns_down_and_off():
    c = sp.DraftControl(n_max=6)
    assert c.next_k() == 1  # nothing measured: one draft, more as drafts pass
    for _ in range(40):  # drafts never pass, and each drafted token costs a quarter of a pass
        c.record(2, 0, 1.0 + 0.25 * 2, 0.01)
        c.record(0, 0, 1.0, 0.0)
    assert c.next_k() == 0
    assert 1 in [c.next_k() for _ in range(c.probe)]  # a probe now and then
    c = sp.DraftControl(n_max=6)
    for _ in range(40):  # drafts pass 90%: long drafts pay
        c.record(4, 4 if np.random.default_rng(_).random() < 0.7 else 2, 1.0 + 0.25 * 4, 0.01)
        c.record(0, 0, 1.0, 0.0)
    assert c.next_k() >= 3
    c = sp.DraftControl(n_max=6)
    for _ in range(40):  # drafts pass half the time but a verified token costs as much as a pass: off
        c.record(3, 1, 4.0, 0.0)
        c.record(0, 0, 1.0, 0.0)
    assert c.next_k() == 0


def test_draft_control_counts_what_a_round_spends_beyond_the_pass():
    """Half the drafts pass and a verified token costs a quarter of a pass: by the passes alone one draft pays (1.5
    tokens for 1.25 + 0.2 passes), but when a drafting round also spends 0.6 of a pass on its bookkeeping
    (picking, rolling back, the drafter's state) and a plain round 0.02, plain decoding is faster and the control
    turns drafting off."""
    def control(rest_drafting, rest_plain):
        c = sp.DraftControl(n_max=4)
        for i in range(40):
            c.record(1, i % 2, 1.25, 0.2, 1.25 + 0.2 + rest_drafting)
            c.record(0, 0, 1.0, 0.0, 1.0 + rest_plain)
        return c.next_k()

    assert control(0.0, 0.0) == 1
    assert control(0.6, 0.02) == 0
    assert control(0.6, 0.6) == 1  # what every round spends alike does not tip the choice


def test_draft_control_probes_less_often_while_probes_fail():
    """While plain decoding wins, the gap between one-draft probes doubles after each probe that fails, up to
    MAX_PROBE_GAP; once drafting wins again, it drafts."""
    c = sp.DraftControl(n_max=4)
    for _ in range(40):  # a draft never passes
        c.record(1, 0, 1.3, 0.2, 1.6)
        c.record(0, 0, 1.0, 0.0, 1.0)
    probes = []
    for i in range(4000):
        k = c.next_k()
        c.record(k, 0, 1.3 if k else 1.0, 0.2 * k, 1.6 if k else 1.0)
        if k:
            probes.append(i)
    gaps = np.diff(probes).tolist()
    assert probes[0] < c.probe and gaps[:4] == [2 * c.probe, 4 * c.probe, 8 * c.probe, 16 * c.probe], gaps
    assert max(gaps) == gaps[-1] == c.MAX_PROBE_GAP, gaps
    for _ in range(40):  # drafts pass from now on
        c.record(1, 1, 1.3, 0.2, 1.6)
    assert c.next_k() >= 1


def test_no_probes_but_the_rarest_where_even_passing_drafts_lose():
    """Every draft passes, but drafting a token costs 1.2 passes and a verified token half a pass: no draft length
    beats plain decoding, so the control turns drafting off and probes only every MAX_PROBE_GAP rounds (where
    drafting could pay at some acceptance, the gaps start at `probe`: test above)."""
    c = sp.DraftControl(n_max=4)
    c.record(1, 1, 15.0, 1.2, 16.2)  # a first 2-token batch ten times too slow does not end the probing alone
    c.record(0, 0, 1.0, 0.0, 1.0)
    assert c.next_k() == 0 and c.until_probe == c.probe - 1
    for _ in range(20):
        c.record(1, 1, 1.5, 1.2, 2.7)
        c.record(0, 0, 1.0, 0.0, 1.0)
    ks = []
    for _ in range(2 * c.MAX_PROBE_GAP):
        ks.append(c.next_k())
        c.record(ks[-1], ks[-1], 1.0 + 0.5 * ks[-1], 1.2 * ks[-1], 1.0 + 1.7 * ks[-1])
    assert ks[0] == 0 and sum(ks) == 2 and np.diff(np.nonzero(ks)[0]).tolist() == [c.MAX_PROBE_GAP], np.nonzero(ks)


def test_sequences_share_costs_but_learn_their_own_acceptance():
    """Two sequences of one model interleave their rounds: the seconds they measure go to one DraftCosts, the
    acceptance to each its own control, so the one whose drafts always pass drafts long while the one whose drafts
    never pass turns drafting off (a shared estimate would have put both in between)."""
    costs = sp.DraftCosts()
    passing, failing = sp.DraftControl(6, costs=costs), sp.DraftControl(6, costs=costs)
    for _ in range(40):
        for control, accepted in ((passing, lambda k: k), (failing, lambda k: 0)):
            k = control.next_k()
            control.record(k, accepted(k), 1.0 + 0.25 * k, 0.01 * k, 1.05 + 0.26 * k)
    assert passing.costs is failing.costs and set(costs.med) >= {1, 2}
    assert passing.next_k() >= 4 and failing.next_k() == 0
    assert passing.acceptance > 0.9 and failing.acceptance < 0.1


def test_a_new_sequence_starts_from_the_models_recent_first_drafts():
    """Where earlier sequences' first drafts seldom passed, a new sequence of the model starts with drafting off
    instead of drafting its first rounds at a loss (it starts from 1/2 only on a model with no rounds yet), and its
    own outcomes still decide within a few rounds."""
    def new_sequence(costs):
        return sp.DraftControl(4, costs=costs)

    fresh = sp.DraftCosts()
    assert fresh.first_prior() == 0.5 and new_sequence(fresh).next_k() == 1
    costs = sp.DraftCosts()
    earlier = new_sequence(costs)
    for _ in range(30):  # a drafted token costs 0.3 of a pass: one draft pays only if it passes 30% of the time
        earlier.record(1, 0, 1.3, 0.0, 1.3)
        earlier.record(0, 0, 1.0, 0.0, 1.0)
    prior = costs.first_prior()
    tries = sum(costs.FIRST_DECAY ** i for i in range(30))
    assert prior == pytest.approx(1 / (tries + 2))
    assert new_sequence(costs).next_k() == 0
    later = new_sequence(costs)
    for _ in range(6):  # this sequence's drafts pass: after a few rounds it drafts although the pool says no
        later.record(1, 1, 1.3, 0.0, 1.3)
    assert later.next_k() >= 1 and later.rates()[1] > 0.7


def accepted_on_each(models: dict, prompt, plain: list, spec) -> dict:
    """Each model's drafts accepted while it generates len(plain) tokens of prompt with speculation `spec`; its
    output must be `plain`, plain decoding's."""
    accepted = {}
    for name, m in models.items():
        m.reset_stats()
        assert list(m.generate(prompt, len(plain), spec_type=spec)) == plain, name
        accepted[name] = m.stats()["accepted_tokens"]
    return accepted


class _Scripted:
    """A drafter that proposes the given continuation (plain decoding's: every draft passes), or, with `miss`,
    each of its tokens plus one (no draft passes)."""

    cost, context_rows = None, 0

    def __init__(self, prompt, continuation, miss=False):
        self.at, self.continuation, self.miss = len(prompt), continuation, miss

    def propose(self, tokens, k):
        out = self.continuation[len(tokens) - self.at:][:k]
        return [(t + 1) % 4096 if self.miss else t for t in out]

    def capture(self):
        return {}

    def observe(self, captured, start, rows):
        pass


def test_interleaved_sequences_share_costs_and_keep_their_own_draft_length(models):
    """Two generations of one model with the same options, their rounds interleaved as the server's threads run
    them: each yields plain decoding's tokens, they share one DraftCosts (the model's: draft_costs) and each has
    its own control, whose choice follows its own drafts (always passing: drafting; never passing: off)."""
    m = models("tiny")
    prompt = _prompt(m)
    plain = list(m.generate(prompt, 41))
    options = sp.SpecOptions("ngram", 4)
    speculators = [sp.Speculator(m, m.new_cache(), options) for _ in range(2)]
    speculators[0].drafter = _Scripted(prompt, plain)
    speculators[1].drafter = _Scripted(prompt, plain, miss=True)
    histories = [list(prompt), list(prompt)]
    streams = [s.tokens(list(prompt), h) for s, h in zip(speculators, histories)]
    outs = [[], []]
    for _ in range(40):
        for out, stream in zip(outs, streams):
            out.append(next(stream))
    for stream in streams:
        stream.close()
    assert outs == [plain[:40], plain[:40]]
    passing, failing = (s.control for s in speculators)
    assert passing is not failing and passing.costs is failing.costs is sp.draft_costs(m, options)
    assert passing.acceptance == 1.0 and failing.acceptance == 0.0
    assert passing.next_k() >= 1 and failing.choice == 0  # drafting off (until its next probe)
    assert sp.draft_costs(m, sp.SpecOptions("ngram", 3)) is not passing.costs


def test_a_probes_catch_up_is_not_counted_as_drafting(models, monkeypatch):
    """A drafter's cost is what drafting costs a round that keeps drafting; the rest of its propose() (a probe's
    catch-up on the positions decided while drafting was off) is neither draft nor rest seconds, else the probes'
    rest would keep drafting off where drafts pass. On a clock that only the drafter moves: 10 s in propose(), of
    which it reports 1 s as its cost."""
    class Clock:
        now = 0.0

        @classmethod
        def perf_counter(cls):
            return cls.now

    class CatchingUp(_Scripted):
        def propose(self, tokens, k):
            Clock.now += 10.0
            self.cost = 1.0
            return super().propose(tokens, k)

    m = models("tiny")
    prompt = _prompt(m)
    plain = list(m.generate(prompt, 8))
    monkeypatch.setattr(sp, "time", Clock)
    options = sp.SpecOptions("ngram", 2, adaptive=False)
    speculator = sp.Speculator(m, m.new_cache(), options)
    speculator.drafter = CatchingUp(prompt, plain)
    speculator.control = sp.DraftControl(2, adaptive=False)  # costs of its own: none measured on the real clock
    assert list(itertools.islice(speculator.tokens(list(prompt), list(prompt)), 8)) == plain
    costs = speculator.control.costs
    assert costs.draft_med == 0.5 and costs.rest_med[1] == 0.0 and set(costs.med.values()) == {0.0}


@pytest.mark.parametrize("name,kind", [("tiny", "ngram"), ("tiny", "mtp"), ("small", "mtp")])
def test_rounds_while_drafting_is_off_decode_as_plain(models, files, name, kind, monkeypatch):
    """While drafting is off, the rounds before a probe run as plain decoding (DraftControl.plain_ahead) and the
    drafter sees only the last context_rows of them: the output is plain decoding's, the probes draft, and each
    probe's drafts are those of a drafter that saw every row (the MTP block's window before the probe)."""
    m = models(name)
    draft = str(files["mtp-" + name]) if kind == "mtp" else None
    prompt = _prompt(m)
    plain = list(m.generate(prompt, 200))
    # plain decoding wins, and drafting could pay, so the probes back off from 16 rounds (could_pay reads the
    # model's measured costs, which earlier tests left and a loaded machine moves: unpatched, it ended the probing
    # at once now and then)
    monkeypatch.setattr(sp.DraftCosts, "tokens_per_second", lambda self, n_max, tokens: [1.0] + [0.5] * n_max)
    monkeypatch.setattr(sp.DraftCosts, "could_pay", lambda self, n_max, sure: True)
    drafter = sp.MTPDrafter if kind == "mtp" else sp.NgramDrafter
    propose = drafter.propose
    runs = []

    def spy(self, tokens, k):
        out = propose(self, tokens, k)
        runs[-1].append((len(tokens), k, out))
        return out

    monkeypatch.setattr(drafter, "propose", spy)
    for every_row in (False, True):
        if every_row:
            monkeypatch.setattr(drafter, "context_rows", 10 ** 9)
        runs.append([])
        m.reset_stats()
        assert list(m.generate(prompt, 200, spec_type=sp.SpecOptions(kind, 4, draft))) == plain
        st = m.stats()
        assert st["spec_rounds"] == 199 - st["accepted_tokens"]
    skipping, seeing_all = runs
    assert len([k for _, k, _ in skipping if k]) == 3  # probes after 16, 32 and 64 plain rounds
    assert skipping == seeing_all


def test_sampled_rounds_while_drafting_is_off_are_plain_decodings(models, monkeypatch):
    """Up to the first probe (the 16 tokens before it), a sampled generation with drafting off draws what plain
    decoding with the same sampler and seed draws: the plain rounds call the sampler as Model.generate does."""
    m = models("tiny")
    prompt = _prompt(m)
    monkeypatch.setattr(sp.DraftCosts, "tokens_per_second", lambda self, n_max, tokens: [1.0] + [0.5] * n_max)
    plain = list(m.generate(prompt, 16, sampler=Sampler(seed=3, temperature=1.5)))
    spec = list(m.generate(prompt, 16, sampler=Sampler(seed=3, temperature=1.5), spec_type=sp.SpecOptions("ngram")))
    assert spec == plain and len(set(plain)) > 4


# ------------------------------------------------------------------------- the MTP draft file and block

def test_mtp_draft_file_is_llamacpp_layout(files):
    f = GGUFFile(files["mtp-small"])
    n = 6
    assert f.get("deepseek4.block_count") == n + 1 and f.get("deepseek4.nextn_predict_layers") == 1
    assert len(f.get("deepseek4.attention.compress_ratios")) >= n + 1
    names = set(f.tensors)
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "output_hc_fn.weight",
            f"blk.{n}.nextn.eh_proj.weight", f"blk.{n}.nextn.enorm.weight", f"blk.{n}.nextn.hnorm.weight",
            f"blk.{n}.nextn.shared_head_norm.weight", f"blk.{n}.attn_q_a.weight", f"blk.{n}.exp_probs_b.bias",
            f"blk.{n}.ffn_gate_exps.weight"} <= names
    assert not any(t.startswith(("blk.0.", "blk.5.")) for t in names)  # no trunk block
    assert f.tensors[f"blk.{n}.nextn.eh_proj.weight"].ne == (512, 256)  # [e_proj | h_proj]: 2 * dim in
    assert f.tensors[f"blk.{n}.nextn.eh_proj.weight"].type_name == "Q8_0"
    # the model file itself is unchanged: no MTP tensor
    assert not any("nextn" in t or t.startswith("blk.6.") for t in GGUFFile(files["small"]).tensors)


def test_a_synthetic_release_with_mtp_makes_a_draft_that_runs(tmp_path):
    """tools/make_synthetic.py --mtp writes the release's mtp.0.* (FP8 e_proj and h_proj, FP4 experts): quantize
    --mtp makes a draft whose tensors are the checkpoint's (eh_proj = [e_proj | h_proj]), and greedy output drafted
    by it is plain decoding's."""
    sys.path.insert(0, str(ROOT / "tools"))
    import make_synthetic

    ck = tmp_path / "ck"
    make_synthetic.write_checkpoint(ck, "tiny", n_layers=4, n_experts=8, seed=2, mtp=True)
    model = quantized(ck, tmp_path / "model.gguf", "--type", "f32")
    draft = quantized(ck, tmp_path / "mtp.gguf", "--type", "f32", "--mtp")
    release = _release_values(ck)
    f = GGUFFile(draft)
    assert f.get("deepseek4.block_count") == 5 and f.get("deepseek4.nextn_predict_layers") == 1
    assert np.array_equal(f.tensors["blk.4.nextn.eh_proj.weight"].to_f32(),
                          np.concatenate([release["mtp.0.e_proj.weight"], release["mtp.0.h_proj.weight"]], axis=1))
    assert np.array_equal(f.tensors["blk.4.attn_q_a.weight"].to_f32(), release["mtp.0.attn.wq_a.weight"])
    assert np.array_equal(f.tensors["blk.4.ffn_down_exps.weight"].to_f32()[5], release["mtp.0.ffn.experts.5.w2.weight"])
    assert not any("nextn" in t for t in GGUFFile(model).tensors)
    m = load(model)
    prompt = _prompt(m)
    plain = list(m.generate(prompt, 24))
    for n in (1, 3):
        m.reset_stats()
        assert list(m.generate(prompt, 24, spec_type=sp.SpecOptions("mtp", n, str(draft), adaptive=False))) == plain
        assert m.stats()["drafted_tokens"] > 0


@pytest.mark.skipif(not os.environ.get("FLASHLITE_LLAMACPP_PYTHON"),
                    reason="FLASHLITE_LLAMACPP_PYTHON (a llama-cpp-python venv) is not set")
def test_llamacpp_loads_the_mtp_draft(files):
    script = ("import sys, llama_cpp\nllama_cpp.llama_backend_init()\n"
              "for mtp in (False, True):\n"
              "    mp = llama_cpp.llama_model_default_params(); mp.use_extra_bufts = False; mp.load_mtp = mtp\n"
              "    m = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), mp)\n"
              "    assert m, 'llama.cpp cannot load it'\n"
              "    print(llama_cpp.llama_model_n_layer(m)); llama_cpp.llama_model_free(m)\n")
    for name in ("mtp-small", "mtp-tiny", "small"):
        result = subprocess.run([os.environ["FLASHLITE_LLAMACPP_PYTHON"], "-c", script, str(files[name])],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split() == ["6", "6"]


def _release_values(folder: Path) -> dict:
    """The release checkpoint's tensors as float32 (int64 for tid2eid), FP8 and FP4 decoded."""
    from quant import fp8
    from quant.safetensors_source import Checkpoint

    ck = Checkpoint(folder)
    out = {}
    for name in ck.tensors:
        if name.endswith(".scale"):
            continue
        t = ck[name]
        a = t.array()
        scale = name[:-len(".weight")] + ".scale"
        if t.dtype == "F8_E4M3":
            out[name] = fp8.dequant_fp8(a, ck[scale].array())
        elif t.dtype in ("I8", "U8"):
            out[name] = fp8.dequant_fp4(a, ck[scale].array())
        elif t.dtype == "BF16":
            out[name] = fp8.bf16_to_f32(a)
        else:
            out[name] = a.astype(np.int64 if t.dtype == "I64" else np.float32)
    ck.close()
    return out


@pytest.mark.parametrize("name", ["small", "small-f32"])
def test_mtp_block_input_is_eh_proj_over_the_token_and_the_streams(models, files, name):
    """The block's input runs eh_proj as e_proj (the token's half, once per position) plus h_proj (per stream):
    its halves are eh_proj's column halves exactly (Q8_0 rows cut between blocks), and the input equals a float64
    eh_proj over [enorm(embed(x)) ; hnorm(h)] per stream, as far as the products' 8-bit activations allow."""
    m = models(name)
    head = m.draft_head(files["mtp-" + name])
    a = head.args
    full = GGUFFile(files["mtp-" + name]).tensors[f"blk.{head.layer}.nextn.eh_proj.weight"].to_f32()
    assert np.array_equal(head.e_proj.to_f32(), full[:, :a.dim])
    assert np.array_equal(head.h_proj.to_f32(), full[:, a.dim:])
    rng = np.random.default_rng(5)
    h = rng.standard_normal((3, a.hc_mult, a.dim)).astype(np.float32)
    ids = rng.integers(3, a.vocab_size, 3)

    def norm(x, w):
        x = x.astype(np.float64)
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + a.norm_eps) * w

    e = norm(m.net.embed_tokens(ids), head.enorm)
    x = np.concatenate([np.broadcast_to(e[:, None, :], h.shape), norm(h, head.hnorm)], axis=2)
    expected = x @ full.astype(np.float64).T
    tol = 1e-5 if name.endswith("f32") else 2e-2
    assert np.abs(head.block_input(h, ids) - expected).max() <= tol * np.abs(expected).max()


@pytest.mark.parametrize("fixture,name", [(SMALL, "small"), (TINY, "tiny")])
def test_mtp_block_is_the_trainers_mtp_block(models, files, fixture, name):
    """flashlite's MTP block on the f32 files equals tools/train_tiny.py's MTPBlock (DeepSeek's) on the release
    weights: logits of x_{i+2} from h_i and x_{i+1}, at once and position by position (its own window cache;
    60 positions pass tiny's window of 16)."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "tools"))
    import train_tiny as tt

    a = json.loads((fixture / "inference" / "config.json").read_text())
    own = tt.build_model(a).eval()
    tt.load_official(own, _release_values(fixture))
    ids = np.random.default_rng(0).integers(3, a["vocab_size"], 60)
    with torch.no_grad():
        x = torch.from_numpy(ids)[None]
        _, expected, _ = own(x, x[:, 1:])
    expected = expected[0].numpy()
    m = models(name + "-f32")
    head = m.draft_head(files["mtp-" + name + "-f32"])
    hidden = []
    m.forward(ids.tolist(), cache=m.new_cache(), logits="none", hidden=hidden)
    h = hidden[0]
    scale = np.abs(expected).max()
    logits, _ = head(h[:-1], ids[1:], np.arange(59), head.make_cache(), logits="all")
    assert np.abs(logits - expected).max() < 3e-6 * scale * 60
    cache = head.make_cache()
    steps = np.concatenate([head(h[i:i + 1], ids[i + 1:i + 2], np.arange(i, i + 1), cache)[0] for i in range(59)])
    assert np.abs(steps - expected).max() < 3e-6 * scale * 60
    assert (steps.argmax(1) == expected.argmax(1)).all()


@pytest.mark.parametrize("name,kv_format", [("tiny", "f32"), ("tiny", "fp8"), ("small", "fp8")])
def test_mtp_block_runs_the_planned_calls_bitwise(models, files, name, kv_format, monkeypatch):
    """The MTP block's catch-up batches and draft steps run the backend's planned layer call, with the bits of the
    block run op by op: past its window, and after rolling back chained drafts."""
    from flashlite.models import deepseek_v4 as v4

    m = models(name)
    head = m.draft_head(files["mtp-" + name])
    ids = np.random.default_rng(4).integers(3, m.vocab_size, 60)
    hidden = []
    m.forward(ids.tolist(), cache=m.new_cache(), logits="none", hidden=hidden)
    h = hidden[0]
    planned = []
    step = v4.backend.layer_step  # the seam the model calls
    monkeypatch.setattr(v4.backend, "layer_step", lambda *a: planned.append(a[6].shape[0]) or step(*a))

    def run():
        cache, out, hm = head.make_cache(kv_format), [], None
        for lo, hi in ((0, 7), (7, 20), (20, 21), (21, 30), (30, 45)):  # catch-ups of 7, 13 and 15 rows, a step
            logits, hm = head(h[lo:hi], ids[lo + 1:hi + 1], np.arange(lo, hi), cache, logits="all")
            out.append(logits)
            for j in range(3):  # chained drafts on the block's own streams, then rolled back
                logits, hm = head(hm[-1:], np.array([int(np.argmax(logits[-1]))]), np.arange(hi + j, hi + j + 1),
                                  cache)
                out.append(logits)
            cache.truncate(hi)
        return np.concatenate(out)

    plans = head.block.attn_plan, head.block.ffn_plan
    fused = run()
    head.block.attn_plan = head.block.ffn_plan = None
    try:
        defined = run()
    finally:
        head.block.attn_plan, head.block.ffn_plan = plans
    assert np.isfinite(fused).all()
    assert np.array_equal(fused, defined)
    assert {1, 7, 13, 15} <= set(planned)


@pytest.mark.parametrize("skipped", [40, 300])
def test_an_mtp_probe_runs_the_block_on_one_row_however_many_it_skipped(models, files, skipped):
    """A probe after rounds without drafts runs the whole MTP block on its last row only and makes the KV rows of
    at most a window's positions before it (all its attention sees), not of every position skipped; its draft is
    the block run in full over the positions its window holds."""
    m = models("small")
    head = m.draft_head(files["mtp-small"])
    window = head.args.window_size
    ids = np.random.default_rng(9).integers(3, m.vocab_size, 12 + skipped).tolist()
    cache = m.new_cache()
    drafter = sp.MTPDrafter(head, cache, m.lock)
    streams = {}  # the main model's last streams by position

    class Spy:  # what the drafter asks of the block: rows run in full, rows only caught up
        def __init__(self):
            self.full, self.kv_only, self.calls = [], [], []

        def __call__(self, h, token_ids, positions, layer, logits="last"):
            self.full.append(h.shape[0])
            out = head(h, token_ids, positions, layer, logits)
            self.calls.append((positions.copy(), out[0]))
            return out

        def catch_up(self, h, token_ids, positions, layer):
            self.kv_only.append(h.shape[0])
            head.catch_up(h, token_ids, positions, layer)

    def feed(lo, hi):
        captured = drafter.capture()
        m.forward(ids[lo:hi], cache=cache, logits="none", **captured)
        drafter.observe(captured, lo, hi - lo)
        streams.update(zip(range(lo, hi), captured["hidden"][0]))

    feed(0, 10)
    drafter.propose(ids[:11], 1)  # drafting on: the block has run over positions 0..9 (its rows 0..9)
    for p in range(10, 11 + skipped):  # then `skipped` rounds without drafts
        feed(p, p + 1)
    drafter.head = spy = Spy()
    drafter.propose(ids[:12 + skipped], 1)
    assert spy.full == [1]
    assert spy.kv_only == [min(skipped + 1, window) - 1]
    # the independent run: the whole block over the rows the probe's query sees, after zero rows it does not see
    (positions, logits), = spy.calls
    last = int(positions[0])
    seen = np.arange(max(0, last - window + 1), last + 1)
    main = [q if q < 10 else 10 + skipped - (last - q) for q in seen]  # the block's row q pairs main position main[q]
    run = head.make_cache(cache.kv_format)
    run.kv.restore(0, np.zeros((int(seen[0]), run.kv_row.nbytes), np.uint8))
    expected, _ = head(np.stack([streams[i] for i in main]), [ids[i + 1] for i in main], seen, run)
    assert np.array_equal(logits, expected)


# ------------------------------------------------------------------------- the commands

def test_run_and_chat_commands_take_llamacpps_options(files):
    runner = CliRunner()
    base = ["run", "-m", str(files["small"]), "-p", "def add(a, b):\n    return a + b\n\ndef add(", "-n", "24"]
    plain = runner.invoke(main, base)
    assert plain.exit_code == 0, plain.output
    for extra in (["--spec-type", "ngram", "--spec-draft-n-max", "6"],
                  ["--spec-type", "mtp", "-md", str(files["mtp-small"])],
                  ["--model-draft", str(files["mtp-small"])]):
        result = runner.invoke(main, base + extra)
        assert result.exit_code == 0, result.output
        assert result.stdout == plain.stdout
        assert "drafted" in result.stderr
    chat = ["chat", "-m", str(files["small"]), "-p", "Hello! Who are you?", "-n", "24", "--temp", "0"]
    plain = runner.invoke(main, chat, input="")
    spec = runner.invoke(main, chat + ["--spec-type", "mtp", "--spec-draft-n-max", "2", "-md", str(files["mtp-small"])],
                         input="")
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    assert spec.stdout == plain.stdout
    bad = runner.invoke(main, base + ["--spec-type", "mtp"])
    assert bad.exit_code != 0 and "MTP draft" in bad.output


# ------------------------------------------------------------------------- the MTP draft on a torch device

def test_the_mtp_block_on_a_torch_device_drafts_as_on_the_cpu(models, files):
    """With the main model on a device, its MTP block runs there too (weights uploaded, rows in the device's
    logs): on the f32 files the block's logits follow the CPU backend's to float32 rounding, catch-up included;
    greedy speculation on the device gives plain decoding's tokens with drafts accepted as on the CPU."""
    pytest.importorskip("torch")
    on_cpu = models("small-f32")
    on_dev = models("small-f32", device="torch-cpu", threads=1)
    draft = str(files["mtp-small-f32"])
    ids = _prompt(on_cpu, 40, 0, seed=3)
    got = {}
    for name, m in (("cpu", on_cpu), ("device", on_dev)):
        head, hidden, cache = m.draft_head(draft), [], m.new_cache()
        m.net(np.asarray(ids), cache, logits="none", hidden=hidden)
        h, rows = hidden[0], head.make_cache(cache.kv_format)
        head.catch_up(h[:30], ids[1:31], np.arange(30), rows)
        logits, _ = head(h[30:39], ids[31:40], np.arange(30, 39), rows, logits="all")
        assert isinstance(logits, np.ndarray)
        got[name] = logits
    delta = np.abs(got["device"] - got["cpu"]).max()
    print(f"MTP block logits, torch-cpu against cpu: max |delta| {delta:.3g}")
    assert delta <= 1e-4
    prompt = _prompt(on_dev)
    plain = list(on_dev.generate(prompt, 24))
    accepted = accepted_on_each({"cpu": on_cpu, "device": on_dev}, prompt, plain,
                                sp.SpecOptions("mtp", 3, draft, adaptive=False))
    assert accepted["device"] == accepted["cpu"] > 0, accepted
