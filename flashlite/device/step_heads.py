"""A decode step's attention heads over the KV cache's fixed-capacity rings, as a step-graph segment (issue 15,
docs/gpu.md "CUDA graphs").

Op by op (Attention.heads) the heads' shapes follow the position: the window holds up to window_size rows, the
compressed rows grow, the compressor pools a row only when a window closes, the indexer scores only past index_topk
visible rows. A captured graph needs the same shapes and memory at every replay, so here, for one token at
position p, everything is computed over fixed widths and the position enters only through small inputs the host
copies in before the replay:

- the window: its window_size slots in the KV log's ring (DeviceRowLog: position p at slot p % capacity), read
  in full, the slots of positions below 0 outside the softmax's range;
- each compressor: its kv and score rows appended at p's slot, a row pooled every step from the 2r (overlap) or r
  slots that end at p, as if a window closed there, and written into the compressed rows' ring at the next row's
  slot by a mask (`closing`), which keeps the slot's bytes otherwise;
- the ratio-128 layers' compressed rows: every slot of the ring, those at or past the visible count masked;
- the ratio-4 layers' indexer: the queries scored against every slot of the indexer rows' ring, those past the
  count at -inf before the top-k, and the scored picks taken only past index_topk visible rows (before that, the
  visible rows in order, as op by op) by a mask, so the indexer's products are computed at every step;
- RoPE's cos and sin at p and at the pooled row's first position, the slots and counts: inputs.

The functions are the model's (Compressor.finish_rows, Indexer.queries, the backend's compress_pool,
indexer_topk, attention_sink); only the widths and masks differ. The rows masked out of a softmax add exact zeros
to its sums, but the sums run over more terms, grouped differently: the logits agree with op by op to float32
rounding, not bit for bit (tests/test_step_graphs.py).

A ring that doubles (its log outgrew it: the compressed rows at each doubling of the context, the window's once
the rewind's reach fills) moves, and the segment is captured again: log2 of the context times per layer.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from flashlite import backends as backend
from flashlite.backends.torch_device import load_rows, round_rows, store_rows
from flashlite.kv_cache import KV_FORMATS, row_formats

# what a compressor's step takes from the host, in this order (StepHeads.positional)
_COMPRESSOR_INPUTS = ("append slot", "pool slots", "pool valid", "ape row", "closing", "row slot", "row cos",
                      "row sin", "visible")


class StepHeads:
    """One layer's attention heads for a decode step of one token, in a step-graph segment per KV format (the
    rows' formats decide the packing inside)."""

    def __init__(self, graphs, attn):
        self.attn = attn
        a = attn.args
        # the projections (Attention.project) in a segment of their own, the indexer's products at every step
        # (whether they count is the mask's business); None where a weight of theirs is on the host
        weights = [attn.wq_a, attn.wkv, attn.wq_b]
        if attn.compressor is not None:
            weights += [attn.compressor.wkv, attn.compressor.wgate]
        ix = attn.indexer
        if ix is not None:
            weights += [ix.weights_proj, ix.wq_b, ix.compressor.wkv, ix.compressor.wgate]
        self.project = functools.partial(attn.project, crowded=np.arange(int(ix is not None)))
        self.project_segment = graphs.segment(self.project, f"blk.{attn.layer} attention projections", weights)
        n_states = (attn.compressor is not None) + (attn.indexer is not None)
        # how many arrays positional() gives and how many rings a layer has (LayerCache.logs)
        self.n_positional, self.n_rings = 2 + len(_COMPRESSOR_INPUTS) * n_states, 1 + 3 * n_states
        self.segments = {
            fmt: graphs.segment(functools.partial(self.compute, row_formats(a.head_dim, a.index_head_dim,
                                                                            a.rope_head_dim, fmt)),
                                f"blk.{attn.layer} attention heads ({fmt} KV)", [])
            for fmt in KV_FORMATS}

    def __call__(self, x, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, cache):
        """Attention.heads for one token x [1, D]: the heads' outputs [G, 1, H/G, hd], the cache advanced by it."""
        q, kv, *products = (self.project_segment or self.project)(x, cos, sin)
        p = int(positions[0])
        rings = self.rings(cache)  # first: a ring that doubles changes the slots
        o = self.segments[cache.kv_format](q, kv, *products, cos, sin, *self.positional(p, cache), state=rings)
        self.advance(p, cache)
        return o

    @staticmethod
    def rings(cache) -> tuple:
        """The layer's rings, with room for the step's rows (a ring that doubles here moves: before positional())."""
        logs = cache.logs()
        for log in logs:
            log.reserve(1)
        return tuple(log.buffer for log in logs)

    @staticmethod
    def advance(p: int, cache) -> None:
        """The logs' ends moved past the rows the step at p wrote into the rings."""
        cache.kv.end += 1
        for s in cache.states():
            s.kv.end += 1
            s.score.end += 1
            s.rows.end += (p + 1) % s.ratio == 0

    def positional(self, p: int, cache) -> list[np.ndarray]:
        """What position p decides, as small host arrays the segment takes among its inputs: the window's slots
        and the range of them that holds positions, then for each compressor _COMPRESSOR_INPUTS."""
        w = self.attn.args.window_size
        out = [cache.kv.slots(np.arange(p - w + 1, p + 1)), np.array([[max(0, w - 1 - p), w]], np.int64)]
        for s in cache.states():
            r = s.ratio
            if s.kv.capacity != s.score.capacity:
                raise AssertionError(f"a compressor's kv and score rings differ ({s.kv.capacity}, {s.score.capacity})")
            pooled = np.arange(p + 1 - (2 if s.overlap else 1) * r, p + 1)
            row = s.rows.end  # the row a window closing at p writes
            row_cos, row_sin = self.attn.rope.cos_sin(np.array([row * r]))
            out += [s.kv.slots([p]), s.kv.slots(pooled), pooled >= 0, np.array([p % r]), np.array([(p + 1) % r == 0]),
                    s.rows.slots([row]), row_cos, row_sin, np.array([(p + 1) // r])]
        return out

    def compute(self, formats, q, kv, *rest):
        """The segment's function: inputs as __call__ passes them, then the layer's rings (LayerCache.logs's order),
        written in place."""
        at, a = self.attn, self.attn.args
        kv_fmt, index_fmt = formats
        n_products = (2 if at.compressor is not None else 0) + (4 if at.indexer is not None else 0)
        products, (cos, sin, window_slots, window_range), rest = \
            rest[:n_products], rest[n_products:n_products + 4], rest[n_products + 4:]
        n_states = (at.compressor is not None) + (at.indexer is not None)
        steps = [rest[i * len(_COMPRESSOR_INPUTS):(i + 1) * len(_COMPRESSOR_INPUTS)] for i in range(n_states)]
        window_ring, *rings = rest[n_states * len(_COMPRESSOR_INPUTS):]
        window_ring.index_copy_(0, window_slots[-1:], store_rows(kv_fmt, kv))
        window = load_rows(kv_fmt, window_ring[window_slots])
        rows = idx = None
        if at.compressor is not None:
            visible = self._compress(at.compressor, products[:2], steps[0], rings[:3], kv_fmt, False)
            compressed = rings[2]
            if at.indexer is None:  # ratio 128: every visible row, in order
                slots = torch.arange(compressed.shape[0], device=q.device)
                picks = torch.where(slots < visible, slots, -1)[None]
            else:
                picks = self._index(q.device, products[2:], steps[1], rings[3:], index_fmt, cos, sin, visible)
            if kv_fmt.kind is None:  # float32 rows: the ring itself (its slots are the rows' positions)
                rows, idx = compressed, picks
            else:  # packed rows: the picked ones unpacked
                rows = load_rows(kv_fmt, compressed[picks.clamp_min(0).reshape(-1)])
                idx = torch.where(picks >= 0, torch.arange(picks.shape[1], device=q.device)[None], -1)
        if rows is None:
            rows = torch.empty((0, a.head_dim), device=q.device)
            idx = torch.empty((1, 0), dtype=torch.int64, device=q.device)
        return backend.attention_sink(q, window, window_range, rows, idx, at.attn_sink, a.head_dim ** -0.5,
                                      f"fl_attn_sink (layer {at.layer})", None, a.o_groups)

    @staticmethod
    def _compress(compressor, products, step, rings, row_fmt, rotated: bool) -> torch.Tensor:
        """The compressor's step into its rings (kv, score, rows): the token's projections appended, a row pooled
        from the slots ending at p and kept where a window closes. Returns the visible rows' count [1]."""
        append, pool, valid, ape_row, closing, row_slot, row_cos, row_sin, visible = step
        kv_ring, score_ring, rows_ring = rings
        kv, score = products
        kv_ring.index_copy_(0, append, kv)
        score_ring.index_copy_(0, append, score + compressor.ape[ape_row])
        # positions below 0 (before the first window): out of the softmax, as the first row's missing previous half
        kvs = torch.where(valid[:, None], kv_ring[pool], 0.0)
        scores = torch.where(valid[:, None], score_ring[pool], -math.inf)
        pooled = backend.compress_pool(1, compressor.ratio, compressor.head_dim, compressor.overlap, True, kvs, scores,
                                       compressor.wkv.name)
        row = store_rows(row_fmt, compressor.finish_rows(pooled, row_cos, row_sin, rotated))
        rows_ring.index_copy_(0, row_slot, torch.where(closing[:, None], row, rows_ring[row_slot]))
        return visible

    def _index(self, device, products, step, rings, index_fmt, cos, sin, visible) -> torch.Tensor:
        """The ratio-4 layer's picks [1, index_topk] (-1 pads): the indexer's compressor stepped into its rings,
        then past index_topk visible rows the best scored ones, before that the visible ones in order."""
        ix, a = self.attn.indexer, self.attn.args
        rotated = index_fmt.kind is not None
        self._compress(ix.compressor, products[:2], step, rings, index_fmt, rotated)
        head_weights, q = products[2:]
        q = ix.queries(q.reshape(1, a.index_n_heads, a.index_head_dim), cos, sin,
                       functools.partial(round_rows, index_fmt) if rotated else None)
        keys = load_rows(index_fmt, rings[2])
        scored = backend.indexer_topk(q, keys, head_weights * np.float32(a.index_n_heads ** -0.5), visible,
                                      a.index_topk, a.index_head_dim ** -0.5)
        k = torch.arange(a.index_topk, device=device)[None]
        return torch.where(visible > a.index_topk, scored, torch.where(k < visible, k, -1))
