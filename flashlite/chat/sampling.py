"""Next-token sampling from a logits vector, and the stop conditions of a generation loop.

Order of the filters (as HF transformers and llama.cpp apply them): repetition penalty on the raw logits,
temperature, top-k, softmax, top-p, min-p, renormalize, one draw from a seeded numpy Generator. Defaults are the
model card's (temperature 1.0, top-p 1.0: plain sampling from the model's distribution); temperature 0 is greedy.
"""
from __future__ import annotations

import numpy as np


class Sampler:
    """Picks a token id from float32 logits; the same seed and inputs give the same draws."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int | None = None):
        if not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature: {temperature} must be a finite number >= 0")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: {top_p} must be in (0, 1]")
        if int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k: {top_k} must be an integer >= 0 (0 disables it)")
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p: {min_p} must be in [0, 1]")
        if not np.isfinite(repetition_penalty) or repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty: {repetition_penalty} must be a finite number > 0")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.min_p = float(min_p)
        self.repetition_penalty = float(repetition_penalty)
        self.rng = np.random.default_rng(seed)

    def _penalized(self, logits: np.ndarray, history) -> np.ndarray:
        """CTRL's penalty on tokens already seen: positive logits are divided by it, negative ones multiplied."""
        x = logits.astype(np.float64)
        if self.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            if seen.min() < 0 or seen.max() >= x.size:
                raise ValueError(f"history: token ids must be in [0, {x.size})")
            v = x[seen]
            x[seen] = np.where(v > 0, v / self.repetition_penalty, v * self.repetition_penalty)
        return x

    def probs(self, logits: np.ndarray, history=()) -> np.ndarray:
        """The float64 distribution the next draw uses (one-hot at the argmax for temperature 0)."""
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.size == 0:
            raise ValueError(f"logits: expected a non-empty 1-D vector, got shape {logits.shape}")
        x = self._penalized(logits, history)
        if np.isnan(x).any():
            raise ValueError("logits: contain NaN")
        if self.temperature == 0:
            p = np.zeros(x.size)
            p[int(np.argmax(x))] = 1.0
            return p
        x = x / self.temperature
        if 0 < self.top_k < x.size:
            cut = np.partition(x, x.size - self.top_k)[x.size - self.top_k]
            x = np.where(x >= cut, x, -np.inf)
        p = np.exp(x - x.max())
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            before = np.cumsum(p[order]) - p[order]  # mass strictly above each token in the ranking
            drop = order[before >= self.top_p]
            p[drop] = 0.0
        if self.min_p > 0.0:
            p[p < self.min_p * p.max()] = 0.0
        return p / p.sum()

    def __call__(self, logits: np.ndarray, history=()) -> int:
        """The next token id."""
        if self.temperature == 0:
            return int(np.argmax(self._penalized(np.asarray(logits), history)))
        p = self.probs(logits, history)
        cdf = np.cumsum(p)
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), p.size - 1))


class StopChecker:
    """Decides when generation ends (EOS id, a stop string, max tokens) and which text may be shown so far.

    Text that could be the start of a stop string is held back; the stop string itself is never shown."""

    def __init__(self, stop: list[str] | tuple[str, ...] = (), max_tokens: int | None = None,
                 eos_ids: list[int] | tuple[int, ...] = ()):
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop: stop strings must be non-empty strings, got {stop!r}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens: {max_tokens} must be >= 1 (or None for no limit)")
        self.stop = tuple(stop)
        self.max_tokens = max_tokens
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.n_tokens = 0
        self.finish_reason: str | None = None
        self._held = ""

    def feed(self, token_id: int, text: str) -> tuple[str, str | None]:
        """Account for one generated token and its decoded text; returns (text to show, finish reason or None)."""
        if self.finish_reason is not None:
            raise RuntimeError("StopChecker.feed: generation already finished")
        self.n_tokens += 1
        if int(token_id) in self.eos_ids:
            return self._end("stop", self._held)
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            return self._end("stop", buf[:min(hits)])
        if self.max_tokens is not None and self.n_tokens >= self.max_tokens:
            return self._end("length", buf)
        keep = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if s.startswith(buf[-n:]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], None

    def flush(self) -> str:
        """Text still held when generation ends for another reason (e.g. the caller stops)."""
        held, self._held = self._held, ""
        return held

    def _end(self, reason: str, text: str) -> tuple[str, str]:
        self.finish_reason = reason
        self._held = ""
        return text, reason
