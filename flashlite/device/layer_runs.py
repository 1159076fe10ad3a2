"""Consecutive layers of a decode step as one step-graph segment (issue 15, docs/gpu.md "CUDA graphs").

Where every part of a layer is on the device (no weight left on the host by hybrid placement, no disk prefetch of
the next layer's experts), its attention collapse, projections, heads over the KV rings, output and MoE sublayer
have no reason to be separate segments: a run of such layers is one, the head with it when the run ends the model
and the head is on the device. On CUDA a step of a resident model is then one graph launch. A layer whose MoE
sublayer has a weight on the host (or prefetches) ends a run after its attention sublayer; its MoE runs op by op,
with the host's work, and the next layer starts the next run.

The functions are the layers' own (Block.attn_collapse, Attention.project, StepHeads.compute, Block.attn_finish,
Block.ffn_sublayer, Transformer.head_logits), in Block's order; the host does what StepHeads does for one layer
(the rings' room, the positional inputs, the logs' ends) for each layer of the run.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from flashlite.kv_cache import KV_FORMATS, row_formats


class LayerRun:
    """blocks (consecutive, each with its StepHeads) as one segment per KV format; head: the model's head_logits
    when the run ends the model (then a run returns the streams and the logits); attention_only: the last block's
    attention sublayer alone (its MoE sublayer is the caller's, op by op)."""

    def __init__(self, graphs, blocks: list, head=None, attention_only: bool = False):
        self.blocks, self.head, self.attention_only = blocks, head, attention_only
        self.heads = [b.attn.step_heads for b in blocks]  # kept here: the blocks' own are unset (see use_step_graphs)
        self.ropes = list(dict.fromkeys(b.attn.rope for b in blocks))
        a = blocks[0].attn.args
        name = f"blk.{blocks[0].layer}-{blocks[-1].layer}" + (" and head" if head is not None else "") + \
            (f" (blk.{blocks[-1].layer}'s attention)" if attention_only else "")
        self.segments = {fmt: graphs.segment(functools.partial(self.compute, row_formats(
            a.head_dim, a.index_head_dim, a.rope_head_dim, fmt)), f"{name} ({fmt} KV)", []) for fmt in KV_FORMATS}

    @property
    def start(self) -> int:
        return self.blocks[0].layer

    @property
    def stop(self) -> int:
        return self.blocks[-1].layer + 1

    def __call__(self, h, positions: np.ndarray, token_ids: np.ndarray, caches: list):
        """The run's layers for one token (the streams h [1, hc, D]), their caches advanced: (the streams after the
        last, the mean of the streams entering each layer [layers, 1, D] (a DSpark draft's taps), and with the head
        its logits)."""
        p = int(positions[0])
        tables = [t for rope in self.ropes for t in rope.cos_sin(positions)]
        # Layers of one kind (RoPE, compress ratio, ring capacities) share their positional inputs: made once a step
        # for each kind, not for each of V4-Flash's 43 layers (11-19 us of numpy a compressed layer).
        positional, rings, kinds, self.layer_inputs = [], [], {}, []
        for heads, cache in zip(self.heads, caches):
            layer_rings = heads.rings(cache)  # first: a ring that doubles changes the slots
            rings += layer_rings
            kind = (heads.attn.rope, heads.attn.ratio, tuple(r.shape[0] for r in layer_rings))
            if kind not in kinds:
                kinds[kind] = len(positional)
                positional += heads.positional(p, cache)
            self.layer_inputs.append(kinds[kind])
        # the kinds follow from the rings' shapes, so a segment bound to these rings reads them the same way
        out = self.segments[caches[0].kv_format](h, token_ids, *tables, *positional, state=tuple(rings))
        for heads, cache in zip(self.heads, caches):
            heads.advance(p, cache)
        return out

    def compute(self, formats, h, token_ids, *rest):
        """The segment's function: inputs as __call__ passes them, then every layer's rings in place."""
        tables, rest = rest[:2 * len(self.ropes)], rest[2 * len(self.ropes):]
        n_positional = len(rest) - sum(heads.n_rings for heads in self.heads)
        positional, rings = rest[:n_positional], rest[n_positional:]
        entering = []
        for block, heads, at in zip(self.blocks, self.heads, self.layer_inputs):
            entering.append(h.mean(axis=1))
            r = self.ropes.index(block.attn.rope)
            cos, sin = tables[2 * r:2 * r + 2]
            mine = positional[at:at + heads.n_positional]
            layer_rings, rings = rings[:heads.n_rings], rings[heads.n_rings:]
            x, post, comb = block.attn_collapse(h)
            q, kv, *products = heads.project(x, cos, sin)
            o = heads.compute(formats, q, kv, *products, cos, sin, *mine, *layer_rings)
            h = block.attn_finish(h, post, comb, o, cos, sin)
            if not (self.attention_only and block is self.blocks[-1]):
                h = block.ffn_sublayer(h, token_ids)
        entering = torch.stack(entering)
        return (h, entering) if self.head is None else (h, entering, self.head(h))
