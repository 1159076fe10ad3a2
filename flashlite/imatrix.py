"""Importance matrices collected from the forward pass, as llama.cpp's llama-imatrix collects them: for every weight
matrix the forward multiplies, the sum over a calibration text of each input column's squared activation, and
the number of input rows summed (per expert for the stacked routed experts, counting the tokens routed to each
expert; the down projection's input is the SwiGLU output). Written in llama-imatrix's GGUF format by
quant.imatrix.write_imatrix, under the GGUF tensor names: `flashlite quantize --imatrix` and llama.cpp's
quantizer read it.

As llama-imatrix, the text is cut into chunks of ctx tokens (the tail that fills no chunk is left out), each
evaluated as a fresh sequence with its first token replaced by BOS where the model adds one. Where this differs:
- every matrix is collected, output.weight (llama-imatrix --process-output) and output_hc_fn.weight included;
- attn_output_a, multiplied per output group (llama.cpp holds it as [k, rank, groups] and stores one row of sums
  per group, which its own quantizer then refuses for the 2-D tensor of the file), gets one row: the sums over all
  groups' inputs, counting tokens x groups rows;
- the indexer's projections (indexer.proj, indexer.attn_q_b), which this forward only computes for the queries
  that see more compressed rows than the indexer keeps, are taken at every token.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np

from flashlite import quality
from flashlite.models import deepseek_v4
from quant.imatrix import Imatrix


class Collector:
    """Sums of squared inputs per weight matrix (float64), per expert for stacked experts."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}    # name -> [experts, columns]
        self.counts: dict[str, np.ndarray] = {}  # name -> [experts]

    def __call__(self, w, x: np.ndarray, expert: int | None) -> None:
        x = np.asarray(x).reshape(-1, w.k)
        if not x.shape[0]:
            return
        n_expert = w.ne[2] if len(w.ne) == 3 else 1
        if w.name not in self.sums:
            self.sums[w.name] = np.zeros((n_expert, w.k), np.float64)
            self.counts[w.name] = np.zeros(n_expert, np.float64)
        x = x.astype(np.float64)
        if not np.isfinite(x).all():
            raise FloatingPointError(f"non-finite activations at the input of {w.name}")
        e = 0 if expert is None else int(expert)
        self.sums[w.name][e] += np.einsum("ij,ij->j", x, x)
        self.counts[w.name][e] += x.shape[0]

    def imatrix(self, datasets: Sequence[str] = (), chunk_count: int = 0, chunk_size: int = 0) -> Imatrix:
        """The collected sums as quant.imatrix.Imatrix (float32, as the file stores them)."""
        im = Imatrix(datasets=list(datasets), chunk_count=chunk_count, chunk_size=chunk_size)
        for name in sorted(self.sums):
            im.sums[name] = self.sums[name].astype(np.float32)
            im.counts[name] = self.counts[name].astype(np.float32)
        return im


@contextmanager
def observing(collector: Callable):
    """Let `collector` see every weight matrix's input while the block runs (one at a time)."""
    if deepseek_v4.OBSERVER is not None:
        raise RuntimeError("an importance matrix is already being collected")
    deepseek_v4.OBSERVER = collector
    try:
        yield collector
    finally:
        deepseek_v4.OBSERVER = None


def collect(model, text: str | Sequence[int], ctx: int = quality.DEFAULT_CTX, n_chunks: int | None = None,
            dataset: str = "", progress: Callable[[int, int, float], None] | None = None) -> Imatrix:
    """The importance matrix of `model` (a flashlite Model loaded without ram_budget) over `text` (a string, or
    token ids as quality.text_tokens makes them), in chunks of ctx tokens (at most n_chunks).
    `progress(done, total, perplexity so far)` is called after every chunk (the perplexity over the second half
    of the chunks, as llama-imatrix prints it)."""
    if model.net.offload is not None:
        raise ValueError("an importance matrix is collected with every expert in memory: load the model without "
                         "ram_budget")
    ids = quality.text_tokens(model, text) if isinstance(text, str) else model.token_ids(text)
    if ctx > model.ctx:
        raise ValueError(f"a context of {ctx} exceeds the model's {model.ctx}")
    bos = model.tokenizer.bos_id if quality.add_bos(model) else None
    chunks = quality.make_chunks(ids, ctx, n_chunks, bos, min_chunks=1)
    collector = Collector()
    scores = quality.TokenScores()
    first = ctx // 2
    with model.lock, observing(collector):
        for i, chunk in enumerate(chunks):
            logits = model.logits(chunk)[first:ctx - 1]
            scores.add(logits, chunk[first + 1:])
            if progress is not None:
                progress(i + 1, len(chunks), quality.summarize(scores, i + 1, ctx).ppl)
    return collector.imatrix([dataset] if dataset else [], len(chunks), ctx)


def write(path: str | os.PathLike, im: Imatrix) -> None:
    from quant.imatrix import write_imatrix

    write_imatrix(path, im)
