"""Perplexity over a text and the KL divergence of a model's next-token distributions from a base model's, computed
as llama.cpp's llama-perplexity computes them.

The text is tokenized once (a BOS first when the GGUF's tokenizer.ggml.add_bos_token says so; special tokens in
the text are plain text, as llama-perplexity's tokenizer call treats them) and cut into chunks of `ctx` tokens
(the tail that fills no chunk is left out); each chunk is a fresh sequence (its first token replaced by BOS where
BOS is added) and only the second half of it is scored: the logits at positions ctx/2 .. ctx-2 predict the tokens
after them, ctx - 1 - ctx/2 scores per chunk, so that every scored token has at least ctx/2 tokens of context.
llama-perplexity asks for at least 2 * ctx tokens of text; so does this.

Perplexity is exp(mean negative log-likelihood) with llama's uncertainty: PPL * sqrt(var(nll) / (n - 1)). With a
base model (the KL divergence mode: llama-perplexity --kl-divergence): per scored token the KL divergence
sum_i p_base,i * (log p_base,i - log p_i) over the whole vocabulary, whether both models' top token is the same
("same top p"), and delta-p = p(actual next token) - p_base(actual next token); the summary is llama's: mean KLD
with its uncertainty, median, percentiles and maximum, top-1 agreement with sqrt(f (1 - f) / (n - 1)), the RMS of
delta-p with its uncertainty, and the ratio of the two perplexities. One difference: llama-perplexity reads the
base model's log-probabilities back from its --kl-divergence-base file, where they are stored in 16 bits (steps of
at most 16/65535 nats) and probabilities below e^-16 are dropped; here both distributions are exact (float64 from
each model's float32 logits).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_CTX = 512


def add_bos(model) -> bool:
    """Whether the model's tokenizer puts a BOS first (the GGUF's tokenizer.ggml.add_bos_token, default no)."""
    return bool(model.file.get("tokenizer.ggml.add_bos_token", False))


def text_tokens(model, text: str) -> np.ndarray:
    """The text's token ids as llama-perplexity tokenizes it: BOS first if the model adds one, special tokens not
    parsed."""
    ids = model.tokenizer.encode(text, allow_special=False)
    if add_bos(model):
        ids = [model.tokenizer.bos_id] + ids
    return np.asarray(ids, np.int64)


def read_text(path: str | os.PathLike) -> str:
    """A text file as UTF-8 (invalid bytes replaced, as llama.cpp reads bytes): ValueError if it is empty."""
    with open(path, "rb") as fh:
        text = fh.read().decode("utf-8", "replace")
    if not text:
        raise ValueError(f"{os.fspath(path)}: the text file is empty")
    return text


def make_chunks(ids: Sequence[int], ctx: int, n_chunks: int | None = None, bos: int | None = None,
                min_chunks: int = 2) -> list[np.ndarray]:
    """The token ids cut into chunks of ctx (at most n_chunks of them); each chunk's first token replaced by `bos`
    when given. ValueError when the ids fill fewer than min_chunks chunks (llama-perplexity wants 2)."""
    ids = np.asarray(ids, np.int64)
    if ctx < 3:
        raise ValueError(f"ctx must be at least 3 (half of each chunk is context, half is scored), got {ctx}")
    if n_chunks is not None and n_chunks < 1:
        raise ValueError(f"the number of chunks must be at least 1, got {n_chunks}")
    if ids.size < min_chunks * ctx:
        raise ValueError(f"the text is {ids.size} tokens; a context of {ctx} needs at least {min_chunks * ctx} "
                         f"({min_chunks} chunks): give a longer text or a smaller context (-c)")
    count = ids.size // ctx if n_chunks is None else min(n_chunks, ids.size // ctx)
    chunks = []
    for i in range(count):
        chunk = ids[i * ctx:(i + 1) * ctx].copy()
        if bos is not None:
            chunk[0] = bos
        chunks.append(chunk)
    return chunks


def scored_logits(model, chunk: np.ndarray, batch: int | None = None) -> np.ndarray:
    """The logits [ctx - 1 - ctx/2, vocab] of a chunk, evaluated as a fresh sequence in forward calls of `batch`
    tokens (default: the whole chunk in one), at the positions that are scored (ctx/2 .. ctx-2). The batch changes
    the speed, not the numbers: every product rounds the activations to Q8_0 or Q8_K first, as llama.cpp's CPU
    backend does, and gives each token the bits it would get alone."""
    first = chunk.size // 2
    return model.logits(chunk, chunk=batch)[first:chunk.size - 1]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p in float64 over the last axis."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclass
class TokenScores:
    """Per scored token: negative log-likelihood, and with a base model its nll, the KL divergence, delta-p and
    whether the top tokens agree."""

    nll: list = field(default_factory=list)
    nll_base: list = field(default_factory=list)
    kld: list = field(default_factory=list)
    p_diff: list = field(default_factory=list)
    same_top: list = field(default_factory=list)

    def add(self, logits: np.ndarray, targets: np.ndarray, base_logits: np.ndarray | None = None) -> None:
        logp = log_softmax(logits)
        rows = np.arange(targets.size)
        nll = -logp[rows, targets]
        self.nll.append(nll)
        if base_logits is None:
            return
        if base_logits.shape != logits.shape:
            raise ValueError(f"the base model's logits have shape {base_logits.shape}, the model's {logits.shape} "
                             f"(another vocabulary?)")
        logp_base = log_softmax(base_logits)
        nll_base = -logp_base[rows, targets]
        self.nll_base.append(nll_base)
        self.kld.append(np.sum(np.exp(logp_base) * (logp_base - logp), axis=-1))
        self.p_diff.append(np.exp(-nll) - np.exp(-nll_base))
        self.same_top.append(np.argmax(logits, axis=-1) == np.argmax(base_logits, axis=-1))

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) if v else np.empty(0) for k, v in vars(self).items()}


def _mean_and_uncertainty(values: np.ndarray, min_count: int = 10) -> tuple[float, float]:
    """llama's mean_and_uncertainty: the mean and sqrt(var / (n - 1)), 0 for n <= min_count."""
    n = values.size
    if n < 1:
        return 0.0, 0.0
    mean = float(values.sum() / n)
    var = float((values * values).sum() / n) - mean * mean
    return mean, (math.sqrt(var / (n - 1)) if var > 0 and n > min_count else 0.0)


@dataclass
class KLStats:
    """llama-perplexity's KL divergence statistics (fractions, not percent)."""

    ppl_base: float
    ppl_base_err: float
    ln_ppl_ratio: float      # mean ln(PPL(Q) / PPL(base))
    ln_ppl_ratio_err: float
    kld_mean: float
    kld_mean_err: float
    kld_median: float
    kld_p90: float
    kld_p95: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    same_top: float          # top-1 agreement ("same top p")
    same_top_err: float
    p_diff_mean: float
    p_diff_mean_err: float
    p_diff_rms: float        # RMS of delta-p
    p_diff_rms_err: float
    p_diff_max: float        # the largest |delta-p|


@dataclass
class PerplexityResult:
    ppl: float
    ppl_err: float
    count: int               # scored tokens
    chunks: int
    ctx: int
    kl: KLStats | None = None

    def lines(self) -> list[str]:
        """The summary as llama-perplexity prints it (percent where it uses percent)."""
        out = [f"Final estimate: PPL = {self.ppl:.4f} +/- {self.ppl_err:.5f}  "
               f"({self.chunks} chunks of {self.ctx} tokens, {self.count} scored)"]
        k = self.kl
        if k is not None:
            out += [f"Mean PPL(base)                : {k.ppl_base:10.6f} ± {k.ppl_base_err:10.6f}",
                    f"Mean ln(PPL(Q)/PPL(base))     : {k.ln_ppl_ratio:10.6f} ± {k.ln_ppl_ratio_err:10.6f}",
                    f"Mean    KLD: {k.kld_mean:10.6f} ± {k.kld_mean_err:10.6f}",
                    f"Maximum KLD: {k.kld_max:10.6f}",
                    f"99.9%   KLD: {k.kld_p999:10.6f}",
                    f"99.0%   KLD: {k.kld_p99:10.6f}",
                    f"95.0%   KLD: {k.kld_p95:10.6f}",
                    f"Median  KLD: {k.kld_median:10.6f}",
                    f"Mean    Δp: {100 * k.p_diff_mean:6.3f} ± {100 * k.p_diff_mean_err:5.3f} %",
                    f"Maximum |Δp|: {100 * k.p_diff_max:6.3f}%",
                    f"RMS Δp    : {100 * k.p_diff_rms:6.3f} ± {100 * k.p_diff_rms_err:5.3f} %",
                    f"Same top p: {100 * k.same_top:6.3f} ± {100 * k.same_top_err:5.3f} %"]
        return out


def summarize(scores: TokenScores, chunks: int, ctx: int) -> PerplexityResult:
    """The statistics of llama-perplexity from per-token scores."""
    a = scores.arrays()
    nll, n = a["nll"], a["nll"].size
    if n < 2:
        raise ValueError(f"{n} scored token(s): too few for a perplexity")
    mean = float(nll.sum() / n)
    var = float((nll * nll).sum() / n) - mean * mean
    ppl = math.exp(mean)
    result = PerplexityResult(ppl, ppl * math.sqrt(max(var, 0.0) / (n - 1)), n, chunks, ctx)
    if a["kld"].size:
        result.kl = _kl_stats(a, ppl)
    return result


def _kl_stats(a: dict[str, np.ndarray], ppl: float) -> KLStats:
    nll, nll_base, kld, p_diff = a["nll"], a["nll_base"], a["kld"], a["p_diff"]
    n = nll.size
    log_ppl, log_ppl_err = _mean_and_uncertainty(nll)
    log_base, log_base_err = _mean_and_uncertainty(nll_base)
    cov = 0.0
    if n >= 10:
        cov = (float((nll * nll_base).sum() / n) - float(nll.sum() / n) * float(nll_base.sum() / n)) / (n - 1)
    ratio_err = math.sqrt(max(log_ppl_err ** 2 + log_base_err ** 2 - 2 * cov, 0.0))
    kld_mean, kld_err = _mean_and_uncertainty(kld)
    dp_mean, dp_err = _mean_and_uncertainty(p_diff)
    mse, mse_err = _mean_and_uncertainty(p_diff * p_diff)
    rms = math.sqrt(mse)
    same = float(np.mean(a["same_top"]))
    pct = np.percentile(kld, [50, 90, 95, 99, 99.9])
    base = math.exp(log_base)
    return KLStats(
        ppl_base=base, ppl_base_err=base * log_base_err,
        ln_ppl_ratio=log_ppl - log_base, ln_ppl_ratio_err=ratio_err,
        kld_mean=kld_mean, kld_mean_err=kld_err, kld_median=float(pct[0]), kld_p90=float(pct[1]),
        kld_p95=float(pct[2]), kld_p99=float(pct[3]), kld_p999=float(pct[4]), kld_max=float(kld.max()),
        same_top=same, same_top_err=math.sqrt(same * (1 - same) / (n - 1)),
        p_diff_mean=dp_mean, p_diff_mean_err=dp_err,
        p_diff_rms=rms, p_diff_rms_err=0.5 / rms * mse_err if rms > 0 else 0.0,
        p_diff_max=float(np.abs(p_diff).max()))


def base_logits(base, chunks: Sequence[np.ndarray], progress: Callable[[int, int], None] | None = None,
                batch: int | None = None) -> list[np.ndarray]:
    """The base model's scored logits for each chunk (to reuse against several models: pass the list as
    perplexity's kl_base)."""
    out = []
    for i, chunk in enumerate(chunks):
        out.append(scored_logits(base, chunk, batch))
        if progress is not None:
            progress(i + 1, len(chunks))
    return out


def perplexity(model, text: str | Sequence[int], ctx: int = DEFAULT_CTX, n_chunks: int | None = None,
               kl_base=None, progress: Callable[[int, int, PerplexityResult | None], None] | None = None,
               batch: int | None = None) -> PerplexityResult:
    """Perplexity of `model` (a flashlite Model) over `text` (a string, or token ids already tokenized as
    text_tokens does), in chunks of ctx tokens (at most n_chunks), as llama-perplexity computes it; with
    `kl_base` (another Model on the same vocabulary, or base_logits' list for the same chunks) the KL divergence
    statistics too. `progress(done, total, running result)` is called after every chunk. `batch`: tokens per
    forward call (default: a chunk in one call; 1 measures the decode path, see scored_logits)."""
    if isinstance(text, str):
        ids = text_tokens(model, text)
    else:
        ids = model.token_ids(text) if len(text) else np.empty(0, np.int64)
    if ctx > model.ctx:
        raise ValueError(f"a context of {ctx} exceeds the model's {model.ctx}")
    bos = model.tokenizer.bos_id if add_bos(model) else None
    chunks = make_chunks(ids, ctx, n_chunks, bos)
    if isinstance(kl_base, list) and len(kl_base) < len(chunks):
        raise ValueError(f"kl_base holds the logits of {len(kl_base)} chunks, the text has {len(chunks)}")
    if kl_base is not None and not isinstance(kl_base, list) and kl_base.vocab_size != model.vocab_size:
        raise ValueError(f"the base model's vocabulary has {kl_base.vocab_size} tokens, the model's "
                         f"{model.vocab_size}")
    scores = TokenScores()
    first = ctx // 2
    for i, chunk in enumerate(chunks):
        logits = scored_logits(model, chunk, batch)
        targets = chunk[first + 1:]
        if kl_base is None:
            base = None
        elif isinstance(kl_base, list):
            base = kl_base[i]
        else:
            base = scored_logits(kl_base, chunk, batch)
        scores.add(logits, targets, base)
        if progress is not None:
            progress(i + 1, len(chunks), summarize(scores, i + 1, ctx))
    return summarize(scores, len(chunks), ctx)
