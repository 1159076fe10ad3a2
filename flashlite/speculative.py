"""Speculative decoding: a drafter proposes the next tokens, the model verifies them in one forward pass.

A round takes the token y just decided (not yet fed), drafts d_1..d_k, and runs [y, d_1..d_k] through the model
as one batch: row j of the logits is the model's prediction after d_j (row 0 after y). The longest prefix the
model agrees with is accepted, the first disagreement (or, when every draft passes, row k) gives one more token,
and the KV cache rolls back past the rejected drafts (in place: ModelCache.rollback). So a round yields 1..k+1
tokens for one pass over the weights, whose dense part it reads once for all of them.

Output is unchanged:
- greedy: a draft is accepted when it is the token plain decoding picks from the same row; rows of a batch are
  bitwise those of feeding the tokens one by one, because the core's matmul quantizes each token's activations and
  computes each token's dots on their own whatever the batch size (and the attention, routing and norms are per
  token too). Drafts are capped at MAX_DRAFT = 14: y and the drafts make a verified batch of at most 15 tokens,
  which runs the planned layer calls of a decode step (deepseek_v4.STEP_MAX_TOKENS): one C call per layer.
- sampling: the standard rule (Leviathan et al. 2023; Chen et al. 2023): draft d from q is accepted with
  probability min(1, p(d) / q(d)) where p is the sampler's distribution (temperature, top-k/p, min-p, repetition
  penalty applied); on rejection the token is drawn from norm(max(0, p - q)). Deterministic drafters (n-gram, MTP
  argmax) have a one-hot q: accept with probability p(d), else draw from p with d removed.

Drafters: NgramDrafter (prompt lookup over the prompt and the output so far), MTPDrafter (V4's MTP block,
flashlite.mtp) and DSparkDrafter (a DSpark draft, flashlite.dspark). A drafter names what of the main model's forward
passes it reads (capture(): extra Model.forward arguments) and sees it for the rows the cache keeps (observe()).
DraftControl sizes each round's draft of one sequence from its measured acceptance rate and the model's measured
cost of verifying k drafts and of drafting them (DraftCosts, shared by the model's sequences), and turns drafting
off (probing again now and then) when no length beats plain decoding.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from flashlite import backends as backend

SPEC_TYPES = ("none", "ngram", "mtp", "dspark")
# llama.cpp's --spec-type names (common/speculative.cpp) for the same drafters
ALIASES = {"draft-mtp": "mtp", "draft-dspark": "dspark", "ngram-simple": "ngram", "ngram-map-k": "ngram",
           "ngram-map-k4v": "ngram", "ngram-mod": "ngram", "ngram-cache": "ngram"}
VERIFY_MAX_TOKENS = 16  # a verified batch stays below this (y and MAX_DRAFT drafts)
PRIOR_SLOPE = 0.25  # a verified token's cost, as a share of one token's pass, before two batch sizes are measured
MIN_SLOPE = 0.1  # the least share assumed, whatever the (noisy) measurements say
MAX_DRAFT = VERIFY_MAX_TOKENS - 2
DEFAULT_N_MAX = 4


def parse_spec_type(value: str | None) -> str:
    """'none', 'ngram', 'mtp' or 'dspark' from flashlite's or llama.cpp's name (None: 'none')."""
    if value is None:
        return "none"
    if not isinstance(value, str):
        raise ValueError(f"spec_type: expected one of {', '.join(SPEC_TYPES)}, got {value!r}")
    name = ALIASES.get(value.strip().lower(), value.strip().lower())
    if name not in SPEC_TYPES:
        raise ValueError(f"spec_type: expected one of {', '.join(SPEC_TYPES)} (or llama.cpp's "
                         f"{', '.join(sorted(ALIASES))}), got {value!r}")
    return name


def check_n_max(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_DRAFT:
        raise ValueError(f"spec_draft_n_max: expected an integer in 1..{MAX_DRAFT} (a verified batch stays below "
                         f"{VERIFY_MAX_TOKENS} tokens), got {value!r}")
    return int(value)


@dataclass
class SpecOptions:
    """How to speculate: `type` one of SPEC_TYPES, at most `n_max` drafts a round, `draft` the draft GGUF
    (-md: an MTP draft for 'mtp'), `adaptive` lets DraftControl shorten drafts or turn them off."""

    type: str = "none"
    n_max: int = DEFAULT_N_MAX
    draft: str | None = None
    adaptive: bool = True

    def __post_init__(self):
        self.type = parse_spec_type(self.type)
        self.n_max = check_n_max(self.n_max)


# ---------------------------------------------------------------------------------------------------
# drafters
# ---------------------------------------------------------------------------------------------------

class NgramDrafter:
    """Prompt lookup as llama.cpp's ngram-cache (common/ngram-cache.cpp, context cache): every n-gram of the
    sequence (prompt and output, n = n_min..n_max) counts the tokens that followed it. A draft grows a token at a
    time: the longest n-gram ending the sequence (with the drafts so far) whose continuations are confident gives
    its most frequent continuation (the most recent among equals); confident means at least MIN_SAMPLES[n]
    occurrences of which the token took at least MIN_SHARE[n] (llama.cpp's lax thresholds: a 1-gram must have been
    followed by the same token 2 times in 3, a 2-gram half of 2 times, a 3- or 4-gram once). The draft stops where
    no n-gram is confident, so its length varies (k at most). Free to run, strong where the output repeats its
    input (code edits, quotes, lists); where it does not, a bare 1-gram match no longer makes a draft that misses."""

    cost = None  # seconds the last propose() spent drafting (DraftControl's measure)
    context_rows = 0  # of the rows the model decodes, how many of the latest a draft reads: none
    MIN_SAMPLES = {1: 2, 2: 2, 3: 1, 4: 1}  # llama.cpp's draft_min_sample_size_lax
    MIN_SHARE = {1: 0.66, 2: 0.5, 3: 0.5, 4: 0.5}  # draft_min_percent_lax

    def __init__(self, n_min: int = 1, n_max: int = 4):
        if not 1 <= n_min <= n_max <= max(self.MIN_SAMPLES):
            raise ValueError(f"n-gram sizes: need 1 <= n_min <= n_max <= {max(self.MIN_SAMPLES)}, "
                             f"got {n_min}, {n_max}")
        self.n_min, self.n_max = n_min, n_max
        self._counts: list[dict] = [{} for _ in range(n_max + 1)]  # per n: n-gram -> {next token: count}
        self._seen: list[int] = []  # the sequence counted so far

    def _sync(self, tokens: Sequence[int]) -> None:
        seen = self._seen
        # not a continuation of what is counted (a generation's history only grows: its last counted token tells)
        if len(tokens) < len(seen) or (seen and (tokens[len(seen) - 1] != seen[-1] or tokens[0] != seen[0])):
            self._counts = [{} for _ in range(self.n_max + 1)]
            seen = self._seen = []
        start = len(seen)
        seen.extend(int(t) for t in tokens[start:])
        # the n-grams ending at j - 1 (seen[j - n:j]) count seen[j], the token that followed: j < len(seen) only,
        # so the n-gram that ends the sequence is not counted before its continuation is known
        for j in range(max(start, 1), len(seen)):
            t = seen[j]
            for n in range(self.n_min, min(self.n_max, j) + 1):
                follow = self._counts[n].setdefault(tuple(seen[j - n:j]), {})
                follow[t] = follow.pop(t, 0) + 1  # re-inserted: the latest continuation iterates last

    def _next(self, context: list[int]) -> int | None:
        """The confident continuation of the longest n-gram that ends `context` (None: none is)."""
        for n in range(min(self.n_max, len(context)), self.n_min - 1, -1):
            follow = self._counts[n].get(tuple(context[len(context) - n:]))
            if follow is None:
                continue
            best, top, total = None, 0, 0
            for t, c in follow.items():
                total += c
                if c >= top:  # ties go to the latest continuation
                    best, top = t, c
            if total >= self.MIN_SAMPLES[n] and top >= self.MIN_SHARE[n] * total:
                return best
        return None

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k drafts for what follows `tokens` (every token so far, the one just decided last)."""
        if k <= 0:
            return []
        t0 = time.perf_counter()
        new = len(tokens) - len(self._seen)
        self._sync(tokens)
        t1 = time.perf_counter()
        context = self._seen[len(self._seen) - self.n_max:]
        drafts = []
        while len(drafts) < k:
            t = self._next(context)
            if t is None:
                break
            drafts.append(t)
            context = context[1:] + [t] if len(context) == self.n_max else context + [t]
        # what drafting costs: the lookup, and counting the tokens a drafting round adds (up to k + 1: the accepted
        # drafts and the one decided); a probe counts the tokens of the rounds before it too, which is not the
        # drafts' cost
        self.cost = time.perf_counter() - t1 + (t1 - t0) * min(1.0, (k + 1) / new if new > 0 else 1.0)
        return drafts

    def capture(self) -> dict:
        return {}  # an n-gram drafter reads only the tokens

    def observe(self, captured: dict, start: int, rows: int) -> None:
        pass


class MTPState:
    """The MTP block's decode state for one sequence (kept on the model's ModelCache, so a conversation's next
    turn keeps it): its window of KV rows, one per position it ran over (`row_main[r]` the main position of row
    r), and the main model's last streams of positions it has not run over yet (`hidden`)."""

    def __init__(self, head, kv_format: str):
        self.head = head
        self.layer = head.make_cache(kv_format)
        self.row_main: list[int] = []
        self.hidden: dict[int, np.ndarray] = {}

    @property
    def rows(self) -> int:
        return len(self.row_main)

    def clear(self) -> None:
        self.layer.clear()
        self.row_main = []
        self.hidden = {}

    def sync(self, pos: int) -> None:
        """The main cache holds pos tokens: forget rows whose pair token is not among them (row i needs x_{i+1})
        and streams of positions it does not hold."""
        self.hidden = {i: h for i, h in self.hidden.items() if i < pos}
        keep = int(np.searchsorted(np.asarray(self.row_main, np.int64), pos - 1))  # rows at main positions <= pos - 2
        if keep < self.rows:
            self.truncate(keep)

    def truncate(self, rows: int) -> None:
        if rows == 0 or self.layer.kv.start > max(0, rows - self.layer.window + 1):
            self.clear()
            return
        self.layer.truncate(rows)
        del self.row_main[rows:]

    def observe(self, hidden: np.ndarray, start: int) -> None:
        """The main model's streams [T, hc, dim] of positions start..start+T-1 (only the last window's matter)."""
        window = self.layer.window
        first = max(0, hidden.shape[0] - window)
        for i in range(first, hidden.shape[0]):
            self.hidden[start + i] = hidden[i]
        if len(self.hidden) > 2 * window:
            for i in sorted(self.hidden)[:-window]:
                del self.hidden[i]


def draft_state(head, cache, make):
    """The state a drafter keeps for `head` on the sequence's cache (cache.draft_states, one per head), made by
    make(head, kv_format) when missing or left by another head, and brought to the cache's position."""
    states = getattr(cache, "draft_states", None)
    if states is None:
        states = cache.draft_states = {}
    state = states.get(id(head))
    if state is None or state.head is not head:
        state = states[id(head)] = make(head, cache.kv_format)
    state.sync(cache.pos)
    return state


class MTPDrafter:
    """Drafts with V4's MTP block (flashlite.mtp.MTPHead): one block run per draft, chained on its own streams."""

    cost = None  # seconds the last propose() spent drafting (DraftControl's measure)

    def __init__(self, head, cache, lock):
        self.head, self.lock = head, lock
        self.state = draft_state(head, cache, MTPState)

    @property
    def context_rows(self) -> int:
        return self.state.layer.window  # a catch-up reads the streams of the last window's positions

    def capture(self) -> dict:
        return {"hidden": []}

    def observe(self, captured: dict, start: int, rows: int) -> None:
        self.state.observe(captured["hidden"][0][:rows], start)

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k drafts after `tokens` (y, the token just decided, last: main position len(tokens) - 1): the
        KV rows of the positions up to len(tokens) - 2 not run yet that its window holds (their pair tokens are
        known), then the block on the last of them, which gives draft 1; then k - 1 single steps on the block's own streams, rolled back afterwards."""
        s = self.state
        last = len(tokens) - 2  # the row that pairs h_last with y predicts the token after y
        if k <= 0 or last not in s.hidden:
            return []
        done = s.row_main[-1] if s.row_main else -1
        # the last row's query sees the window's rows before it and nothing earlier, nor does any later query: a
        # catch-up after rounds without drafts runs over one window of positions at most, however many it skipped
        todo = sorted(i for i in s.hidden if done < i <= last)[-s.layer.window:]
        h = backend.concat([s.hidden[i][None] for i in todo], axis=0)  # where the model computes
        ids = np.array([tokens[i + 1] for i in todo], np.int64)
        drafts = []
        with self.lock:
            t0 = time.perf_counter()
            positions = np.arange(s.rows, s.rows + len(todo))
            # the rows before the last are only seen, so only their KV rows are made (most of the block's work,
            # its attention and MoE, is the last row's alone); the last row gives draft 1
            if len(todo) > 1:
                self.head.catch_up(h[:-1], ids[:-1], positions[:-1], s.layer)
            t1 = time.perf_counter()
            logits, hm = self.head(h[-1:], ids[-1:], positions[-1:], s.layer, logits="last")
            caught_up, first = t1 - t0, time.perf_counter() - t1
            s.row_main.extend(todo)
            for i in [i for i in s.hidden if i <= last]:
                del s.hidden[i]
            valid = s.rows
            self.trim()
            t0 = time.perf_counter()
            for step in range(k):
                d = int(np.argmax(logits[-1]))
                drafts.append(d)
                if step + 1 == k:
                    break
                pos = valid + step
                logits, hm = self.head(hm[-1:], np.array([d]), np.arange(pos, pos + 1), s.layer, logits="last")
            s.layer.truncate(valid)
            # what drafting costs: the steps, the last row's block, and the catch-up as a round that drafts makes
            # it (the KV rows of up to k accepted drafts: a probe's longer catch-up counts k of its rows, since
            # the control weighs rounds that keep drafting; the rest of it is the round's own, not the drafts')
            rows = len(todo) - 1
            self.cost = time.perf_counter() - t0 + first + (caught_up * min(1.0, k / rows) if rows else 0.0)
        return drafts

    def trim(self) -> None:
        """Drop the rows no rollback of a round reaches (the window plus slack stays)."""
        s = self.state
        s.layer.trim(max(0, s.rows - 2 * VERIFY_MAX_TOKENS))


# ---------------------------------------------------------------------------------------------------
# how long to draft
# ---------------------------------------------------------------------------------------------------

class DraftCosts:
    """What rounds cost on a model with one drafter and its options: the seconds of verifying a batch of m tokens,
    of drafting one token, and of the rest of a round (picking the tokens, rolling back, the drafter's
    bookkeeping: measured apart for rounds with and without drafts), as medians of the last KEEP measurements.
    They are the model's and the machine's, not a text's, so every sequence of the model shares them: a
    generation starts from what the earlier ones measured instead of guessing (a verified token at a quarter of a
    pass, the rest of a round free), which in a short answer decides a large share of its rounds.

    Sequences may run on different threads (the server's), each recording its rounds here: `lock` guards every
    read and write of the measurements, so that a median is never taken over a list another thread is trimming;
    it is held for a few list operations only, never across a forward pass."""

    KEEP = 9  # measurements per batch size the medians take
    FIRST_DECAY = 0.98  # the pooled first-draft outcomes: about the last 50 drafting rounds of all sequences

    def __init__(self):
        self.lock = threading.Lock()
        self.first = [0.0, 0.0]  # decayed passes and tries of the first draft, over every sequence's rounds
        self.verify: dict[int, list[float]] = {}  # tokens in the batch -> recent seconds
        self.med: dict[int, float] = {}  # their medians
        self.draft: list[float] = []  # recent seconds per drafted token
        self.draft_med = 0.0
        self.rest: tuple[list[float], list[float]] = ([], [])  # recent seconds beyond pass and drafts: plain, drafting
        self.rest_med = [0.0, 0.0]

    def record(self, drafted: int, verify_seconds: float, draft_seconds: float,
               round_seconds: float | None = None) -> None:
        with self.lock:
            if round_seconds is not None:
                rest = self.rest[drafted > 0]
                rest.append(max(0.0, round_seconds - verify_seconds - draft_seconds))
                del rest[:-self.KEEP]
                self.rest_med[drafted > 0] = _median(rest)
            times = self.verify.setdefault(drafted + 1, [])
            times.append(verify_seconds)
            del times[:-self.KEEP]
            self.med[drafted + 1] = _median(times)
            if drafted:
                self.draft.append(draft_seconds / drafted)
                del self.draft[:-self.KEEP]
                self.draft_med = _median(self.draft)

    def could_pay(self, n_max: int, sure: int) -> bool:
        """Whether drafting k tokens that all passed could beat plain decoding for some k in 1..n_max, with the
        batches and the drafts at the fastest of their recent measurements (plain decoding at its median): on a
        machine shared with other work a batch now and then takes a scheduler slice (ten passes on a small model),
        and such figures must not end the probing. True until a probe's batch (2 tokens) and a draft have been
        measured `sure` times each."""
        with self.lock:
            if len(self.verify.get(2, ())) < sure or len(self.draft) < sure:
                return True
            fastest = {m: (self.med[m] if m == 1 else min(times)) for m, times in self.verify.items()}
            rates = self._per_second([k + 1.0 for k in range(n_max + 1)], fastest, min(self.draft))
            return max(rates[1:]) > rates[0]

    def record_first(self, passed: bool) -> None:
        with self.lock:
            self.first = [self.FIRST_DECAY * self.first[0] + passed, self.FIRST_DECAY * self.first[1] + 1]

    def first_prior(self) -> float:
        """The rate at which first drafts passed in this model's recent rounds, all sequences together, with one
        pass in two tries added (1/2 before any): where a new sequence's own estimate starts. On a model whose
        drafter seldom passes, a sequence that started from 1/2 drafted its first rounds at a loss, most of what
        a short answer loses against plain decoding; the sequence's own outcomes outweigh it within a few rounds."""
        with self.lock:
            return (self.first[0] + 1.0) / (self.first[1] + 2.0)

    def tokens_per_second(self, n_max: int, tokens: list[float]) -> list[float]:
        """Tokens per second of k = 0..n_max drafts a round, tokens[k] the tokens such a round is expected to
        yield: seconds(k) = verify(k + 1 tokens) + k * draft(one token) + rest(k > 0)."""
        with self.lock:
            return self._per_second(tokens[:n_max + 1], self.med, self.draft_med)

    def _per_second(self, tokens: list[float], med: dict[int, float], draft: float) -> list[float]:
        """tokens[k] / seconds(k) for k = 0..len(tokens) - 1, the batches' seconds from `med` (_seconds) and a
        drafted token's from `draft` (the caller holds `lock`)."""
        return [tokens[0] / (self._seconds(1, med) + self.rest_med[0])] + \
            [tokens[k] / (self._seconds(k + 1, med) + k * draft + self.rest_med[1]) for k in range(1, len(tokens))]

    def seconds(self, m: int) -> float:
        """Estimated seconds of verifying a batch of m tokens (the caller holds `lock`): the median of the last
        measurements of m, else linear in m through the sizes measured (a quarter of a pass per token before two
        sizes are); never below one token's pass plus MIN_SLOPE of it per further token, so that noise on a loaded
        machine does not make drafted tokens look free."""
        return self._seconds(m, self.med)

    @staticmethod
    def _seconds(m: int, med: dict[int, float]) -> float:
        """seconds(m) from the seconds per measured batch size `med`."""
        known = sorted(med)
        if not known:
            t1, slope = 1.0, PRIOR_SLOPE  # nothing measured: in units of one pass
        elif len(known) == 1:
            t1 = med[known[0]] / (1 + PRIOR_SLOPE * (known[0] - 1))
            slope = PRIOR_SLOPE * t1
        else:
            lo, hi = known[0], known[-1]
            slope = (med[hi] - med[lo]) / (hi - lo)
            t1 = med[1] if 1 in med else max(med[lo] - slope * (lo - 1), 1e-9)
        slope = max(slope, MIN_SLOPE * t1)
        if m == 1 and 1 in med:
            return med[1]
        if m in med:
            return max(med[m], t1 + MIN_SLOPE * t1 * (m - 1))
        near = min(known, key=lambda x: abs(x - m)) if known else 1
        guess = (med[near] + slope * (m - near)) if known else t1 + slope * (m - 1)
        return max(guess, t1 + MIN_SLOPE * t1 * (m - 1))


class DraftControl:
    """Chooses one sequence's draft length k in 0..n_max each round by the expected tokens per second:

        tokens(k) = 1 + sum_{j<=k} a_1 a_2 .. a_j     (accepted drafts + the one decided token)
        seconds(k) = verify(k + 1 tokens) + k * draft(one token) + rest(k > 0)

    where a_j is the rate at which draft j passes once drafts 1..j-1 did (decayed counts, each position shrunk
    towards the one before it, so that a position seldom reached borrows its estimate; draft 1 towards the rate
    of the model's recent first drafts, `costs.first_prior`, 1/2 before any), and the seconds are `costs`
    (DraftCosts: the model's, shared by its sequences; rest is a sizable share of a pass on
    a small model, which a control that left it out took for free and so kept drafting where plain decoding was
    faster). What drafts pass depends on the text (prompt lookup passes where the answer repeats its prompt, not
    elsewhere), so the acceptance counts and the probing below are the sequence's own: concurrent sequences of one
    model share only where a new estimate starts, and one's start does not reset another's. Before anything is
    measured this makes k = 1, and lengths grow as drafts prove themselves. k = 0 is plain decoding; while it
    wins, a round of one draft after `probe` plain rounds keeps the estimates fresh, the gap doubling after each
    probe that leaves drafting off (up to MAX_PROBE_GAP: a probe of V4's MTP block first makes the KV rows of the
    positions it skipped, a window of them at most, and the probe's draft is the round's extra work), and at
    MAX_PROBE_GAP at once where drafts that all passed would still lose (a drafter that costs a pass per token);
    the rounds before a probe are known to be plain (plain_ahead), so the caller runs them as plain decoding does.
    While drafting wins, a plain round every `measure_plain` rounds measures the cost of one token.
    adaptive=False always asks for n_max."""

    DECAY = 0.9
    MAX_PROBE_GAP = 512  # plain rounds between probes at most
    SURE = 3  # measurements of a probe's costs before they may end the probing

    def __init__(self, n_max: int, adaptive: bool = True, probe: int = 16, measure_plain: int = 32,
                 costs: DraftCosts | None = None):
        self.n_max, self.adaptive, self.probe, self.measure_plain = n_max, adaptive, probe, measure_plain
        self.costs = DraftCosts() if costs is None else costs
        self.rounds = 0
        self.hits = [0.0] * (n_max + 1)
        self.trials = [0.0] * (n_max + 1)
        self.probe_gap = self.until_probe = probe  # plain rounds between probes, and before the next
        self.choice = None  # the last choice, kept until a measurement changes

    def rates(self) -> list[float]:
        """a_j for j = 1..n_max (index 0 unused): draft 1 starts from the model's recent first-draft rate, with the
        weight of two tries."""
        a = [0.0] * (self.n_max + 1)
        prev, weight = self.costs.first_prior(), 2.0
        for j in range(1, self.n_max + 1):
            a[j] = prev = (self.hits[j] + weight * prev) / (self.trials[j] + weight)
            weight = 1.0
        return a

    @property
    def acceptance(self) -> float:
        return sum(self.hits[1:]) / sum(self.trials[1:]) if sum(self.trials[1:]) else 0.5

    def next_k(self) -> int:
        if not self.adaptive:
            return self.n_max
        self.rounds += 1
        if self.choice is None:
            a = self.rates()
            tokens, reach = [1.0], 1.0
            for k in range(1, self.n_max + 1):
                reach *= a[k]
                tokens.append(tokens[-1] + reach)
            per_second = self.costs.tokens_per_second(self.n_max, tokens)
            self.choice = max(range(self.n_max + 1), key=lambda k: (per_second[k], -k))  # ties: the shorter
            if self.choice == 0 and not self.costs.could_pay(self.n_max, self.SURE):
                # no acceptance could make drafting win at these costs: a probe would only lose a round, so probe
                # at the longest gap, just often enough to notice the costs change
                self.probe_gap = self.until_probe = self.MAX_PROBE_GAP
        best_k = self.choice
        if best_k:
            self.probe_gap = self.until_probe = self.probe
            # a plain round now and then measures what drafting has to beat
            return 0 if self.rounds % self.measure_plain == 2 else best_k
        self.until_probe -= 1
        if self.until_probe > 0:
            return 0
        self.until_probe = self.probe_gap = min(2 * self.probe_gap, self.MAX_PROBE_GAP)
        return 1

    def plain_ahead(self) -> int:
        """After a round of next_k() == 0: how many rounds after it are plain for sure (those before the next
        probe while drafting is off; none while drafting wins), counted as taken. The caller decodes them as
        plain decoding does, without drafting, timing or recording: what they would measure is what the round
        before them did, and their bookkeeping is what made a control that has turned drafting off cost 2-4% more
        than plain decoding on a small model."""
        if not self.adaptive or self.choice != 0 or self.until_probe <= 1:
            return 0
        n = self.until_probe - 1
        self.until_probe = 1
        self.rounds += n
        return n

    def record(self, drafted: int, accepted: int, verify_seconds: float, draft_seconds: float,
               round_seconds: float | None = None) -> None:
        """A round's outcome and measures; round_seconds, when given, the whole round's (drafting, the pass, picking
        the tokens, rolling back, the drafter's bookkeeping)."""
        self.costs.record(drafted, verify_seconds, draft_seconds, round_seconds)
        if drafted or self.choice != 0:  # while drafting is off, only a probe's outcome can turn it on
            self.choice = None
        if drafted:
            self.costs.record_first(accepted > 0)
            tried = min(drafted, accepted + 1)  # drafts 1..accepted passed, the next one (if any) failed
            for j in range(1, self.n_max + 1):
                self.hits[j] = self.DECAY * self.hits[j] + (j <= accepted)
                self.trials[j] = self.DECAY * self.trials[j] + (j <= tried)


# ---------------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------------

def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def _draw(p: np.ndarray, rng) -> int:
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), p.size - 1))


def accept(rows: np.ndarray, drafts: Sequence[int], history: list[int], sampler, q=None) -> list[int]:
    """The tokens a round yields: the accepted drafts, then one token from the first rejecting row (or from the
    last row when every draft passes). rows[j] are the logits after draft j (row 0 after the token before the
    drafts); history (every token so far) is extended with them. sampler: None (greedy on the raw logits, as
    Model.generate), or a flashlite Sampler (its greedy pick at temperature 0, else the speculative-sampling rule
    over its distribution). q: the drafter's distribution per draft (None: one-hot at the draft)."""
    out = []
    for j, d in enumerate(drafts):
        if sampler is None or sampler.temperature == 0:
            t = int(np.argmax(rows[j])) if sampler is None else sampler(rows[j], history)
            if t != d:
                history.append(t)
                out.append(t)
                return out
        else:
            p = sampler.probs(rows[j], history)
            qd = 1.0 if q is None or q[j] is None else float(q[j][d])
            if sampler.rng.random() * qd >= p[d]:  # rejected: min(1, p/q) failed
                residual = p.copy()
                if q is None or q[j] is None:
                    residual[d] = 0.0
                else:
                    residual = np.maximum(p - q[j], 0.0)
                t = _draw(residual, sampler.rng) if residual.sum() > 0 else int(d)
                history.append(t)
                out.append(t)
                return out
        history.append(int(d))
        out.append(int(d))
    row = rows[len(drafts)]
    t = int(np.argmax(row)) if sampler is None else sampler(row, history)
    history.append(t)
    out.append(t)
    return out


class WithoutHistory:
    """A Sampler that ignores the history it is given (Model.generate calls its sampler on the row alone, so no
    repetition penalty sees the sequence)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.temperature, self.rng = sampler.temperature, sampler.rng

    def __call__(self, logits, history=()):
        return self.sampler(logits)

    def probs(self, logits, history=()):
        return self.sampler.probs(logits)


# what rounds cost, per model and drafter (DraftCosts): concurrent and later sequences of one model feed and read
# the same measures
_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COSTS_LOCK = threading.Lock()


def draft_costs(model, options: SpecOptions) -> DraftCosts:
    """The DraftCosts that `model`'s sequences with `options` share."""
    with _COSTS_LOCK:
        per_model = _COSTS.setdefault(model, {})
        key = (options.type, options.draft, options.n_max, options.adaptive)
        if key not in per_model:
            per_model[key] = DraftCosts()
        return per_model[key]


class Speculator:
    """Speculative decoding of one sequence in `cache` (the model's forward passes take model.lock)."""

    def __init__(self, model, cache, options: SpecOptions, sampler=None):
        self.model, self.cache, self.options, self.sampler = model, cache, options, sampler
        if options.type == "ngram":
            self.drafter = NgramDrafter()
        elif options.type == "mtp":
            self.drafter = MTPDrafter(model.draft_head(options.draft, "mtp"), cache, model.lock)
        elif options.type == "dspark":
            from flashlite.dspark import DSparkDrafter

            self.drafter = DSparkDrafter(model.draft_head(options.draft, "dspark"), cache, model.lock)
        else:
            raise ValueError(f"spec_type {options.type!r}: no drafter")
        self.control = DraftControl(options.n_max, options.adaptive, costs=draft_costs(model, options))
        self.drafted = self.accepted = 0  # this sequence's (the model's stats() count every sequence's)

    def tokens(self, feed: Sequence[int], history: list[int]) -> Iterator[int]:
        """Prefill `feed` (the prompt after what the cache holds), then yield tokens one at a time, as decoding
        them one by one would (greedy: the same tokens). `history` (every token so far, the prompt included) is
        extended as tokens are yielded. On close, the cache is left holding what plain decoding would: the prompt
        and every yielded token but the last."""
        model, cache, drafter = self.model, self.cache, self.drafter
        captured = drafter.capture()
        with model.lock:
            start = cache.pos
            row = model.forward(feed, cache=cache, logits="last", **captured)[-1]
        drafter.observe(captured, start, len(feed))
        base = cache.pos
        yielded = 0
        try:
            y = int(np.argmax(row)) if self.sampler is None else self.sampler(row, history)
            history.append(y)
            yielded += 1
            yield y
            while True:
                k = min(self.control.next_k(), max(0, model.ctx - cache.pos - 1))
                t0 = time.perf_counter()
                drafts = drafter.propose(history, k)
                t1 = time.perf_counter()
                captured = drafter.capture()
                with model.lock:
                    q_pos = cache.pos
                    rows = model.forward([y] + drafts, cache=cache, logits="all" if drafts else "last",
                                         **captured)
                    t2 = time.perf_counter()
                    out = accept(rows, drafts, history, self.sampler)
                    a = len(out) - 1
                    if a < len(drafts):
                        model.truncate(q_pos + 1 + a, cache=cache)
                    model.count_speculation(len(drafts), a)
                    self.drafted += len(drafts)
                    self.accepted += a
                drafter.observe(captured, q_pos, a + 1)
                # a drafter's cost is what drafting costs a round that keeps drafting; the rest of its propose()
                # (catching up on positions decided while drafting was off: a probe's) is left out of the
                # measures, else the probes' rest would keep drafting off where drafts pass
                draft = t1 - t0 if drafter.cost is None else drafter.cost
                self.control.record(len(drafts), a, t2 - t1, draft, draft + time.perf_counter() - t1)
                for t in out:
                    yielded += 1
                    yield t
                y = out[-1]
                if not drafts:
                    for y in self.plain(y, self.control.plain_ahead(), history):
                        yielded += 1
                        yield y
        finally:
            plain = base + yielded - 1  # plain decoding holds every yielded token but the last
            if yielded and cache.pos > plain:
                with model.lock:
                    model.truncate(plain, cache=cache)

    def plain(self, y: int, rounds: int, history: list[int]) -> Iterator[int]:
        """`rounds` rounds of plain decoding after y, as Model.generate runs them: the forward pass and the pick,
        no drafting, timing or recording; the drafter sees the rows of the last `context_rows` of them (all that a
        draft after them reads)."""
        model, cache, drafter = self.model, self.cache, self.drafter
        for i in range(rounds):
            captured = drafter.capture() if rounds - i <= drafter.context_rows else {}
            with model.lock:
                start = cache.pos
                row = model.forward([y], cache=cache, logits="last", **captured)[-1]
                model.count_speculation(0, 0)
            if captured:
                drafter.observe(captured, start, 1)
            y = int(np.argmax(row)) if self.sampler is None else self.sampler(row, history)
            history.append(y)
            yield y
