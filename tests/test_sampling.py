"""Sampler filters and stop handling, checked with fixed seeds against float64 numpy references."""
from __future__ import annotations

import numpy as np
import pytest

from flashlite.chat.sampling import Sampler, StopChecker

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -2.0, 1.5], dtype=np.float32)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _draws(sampler, n=20000, history=()):
    return np.bincount([sampler(LOGITS, history) for _ in range(n)], minlength=LOGITS.size) / n


def test_defaults_follow_the_model_card():
    s = Sampler()
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty) == (1.0, 1.0, 0, 0.0, 1.0)
    np.testing.assert_allclose(s.probs(LOGITS), _softmax(LOGITS.astype(np.float64)), rtol=1e-12)


def test_temperature_zero_is_argmax():
    s = Sampler(temperature=0, seed=1)
    assert [s(LOGITS) for _ in range(5)] == [5] * 5
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.standard_normal(1000).astype(np.float32)
        assert s(x) == int(np.argmax(x))


def test_temperature_scales_the_distribution():
    for t in (0.3, 0.7, 2.0):
        np.testing.assert_allclose(Sampler(temperature=t).probs(LOGITS), _softmax(LOGITS / t), rtol=1e-6)


def test_same_seed_same_draws_and_other_seed_differs():
    x = np.random.default_rng(3).standard_normal(129280).astype(np.float32)
    s1, s2, s3 = Sampler(seed=42, top_p=0.9), Sampler(seed=42, top_p=0.9), Sampler(seed=43, top_p=0.9)
    d1, d2, d3 = ([s(x) for _ in range(30)] for s in (s1, s2, s3))
    assert d1 == d2
    assert d1 != d3


def test_top_k_support():
    p = Sampler(top_k=3).probs(LOGITS)
    assert set(np.flatnonzero(p)) == {5, 0, 7}
    np.testing.assert_allclose(p[[5, 0, 7]], _softmax(LOGITS[[5, 0, 7]].astype(np.float64)), rtol=1e-12)
    freq = _draws(Sampler(top_k=3, seed=7))
    assert set(np.flatnonzero(freq)) <= {5, 0, 7}
    np.testing.assert_allclose(freq, p, atol=0.015)


def test_top_p_support_is_the_smallest_prefix_reaching_p():
    base = _softmax(LOGITS.astype(np.float64))
    order = np.argsort(-base)
    for top_p in (0.3, 0.6, 0.8, 0.95):
        n = int(np.searchsorted(np.cumsum(base[order]), top_p) + 1)  # first rank whose cumulative mass >= top_p
        p = Sampler(top_p=top_p).probs(LOGITS)
        assert set(np.flatnonzero(p)) == set(order[:n].tolist()), top_p
        np.testing.assert_allclose(p[order[:n]], base[order[:n]] / base[order[:n]].sum(), rtol=1e-12)
    freq = _draws(Sampler(top_p=0.6, seed=11))
    assert set(np.flatnonzero(freq)) <= set(order[:2].tolist())


def test_min_p_support():
    base = _softmax(LOGITS.astype(np.float64))
    for min_p in (0.05, 0.2, 0.5):
        keep = set(np.flatnonzero(base >= min_p * base.max()).tolist())
        assert set(np.flatnonzero(Sampler(min_p=min_p).probs(LOGITS))) == keep
    freq = _draws(Sampler(min_p=0.3, seed=5), n=5000)
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(base >= 0.3 * base.max()).tolist())


def test_draws_follow_the_distribution():
    freq = _draws(Sampler(temperature=0.8, seed=123), n=40000)
    expected = _softmax(LOGITS.astype(np.float64) / 0.8)
    chi2 = (40000 * (freq - expected) ** 2 / expected).sum()
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001


def test_repetition_penalty_direction():
    s = Sampler(repetition_penalty=1.5)
    base = Sampler().probs(LOGITS)
    p = s.probs(LOGITS, history=[5, 4, 5])
    assert p[5] < base[5]  # positive logit divided
    assert p[4] < base[4]  # negative logit multiplied
    ref = LOGITS.astype(np.float64).copy()
    ref[5] /= 1.5
    ref[4] *= 1.5
    np.testing.assert_allclose(p, _softmax(ref), rtol=1e-12)
    assert Sampler(temperature=0, repetition_penalty=10)(LOGITS, history=[5]) == 0
    assert Sampler(repetition_penalty=0.5).probs(LOGITS, history=[3])[3] == base[3]  # logit 0 stays 0


def test_bad_parameters_are_named():
    for kwargs, name in (({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
                         ({"min_p": 2}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty")):
        with pytest.raises(ValueError, match=name):
            Sampler(**kwargs)
    with pytest.raises(ValueError, match="logits"):
        Sampler()(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="history"):
        Sampler(repetition_penalty=1.2)(LOGITS, history=[99])


def test_stop_string_split_across_tokens_is_held_and_cut():
    stop = StopChecker(stop=["\nUser:"], max_tokens=100, eos_ids=[1])
    shown = []
    for i, piece in enumerate(["Hello", " there", "\n", "Us", "er:", " more"]):
        text, reason = stop.feed(10 + i, piece)
        shown.append(text)
        if reason:
            break
    assert shown == ["Hello", " there", "", "", ""] and reason == "stop"
    assert stop.finish_reason == "stop"


def test_false_stop_prefix_is_released():
    stop = StopChecker(stop=["</end>"])
    assert stop.feed(5, "a </e") == ("a ", None)
    assert stop.feed(6, "x") == ("</ex", None)


def test_eos_and_max_tokens():
    stop = StopChecker(stop=["ZZ"], eos_ids=[1])
    assert stop.feed(5, "abZ") == ("ab", None)
    assert stop.feed(1, "<｜end▁of▁sentence｜>") == ("Z", "stop")
    stop = StopChecker(max_tokens=2)
    assert stop.feed(5, "a") == ("a", None)
    assert stop.feed(6, "b") == ("b", "length")
    with pytest.raises(RuntimeError):
        stop.feed(7, "c")
    with pytest.raises(ValueError, match="max_tokens"):
        StopChecker(max_tokens=0)
    with pytest.raises(ValueError, match="stop"):
        StopChecker(stop=[""])
