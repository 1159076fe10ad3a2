"""DSpark drafts for DeepSeek V4 (the draft head of the -0731 checkpoint, its `mtp.0..2` tensors), read from the GGUF
llama.cpp's converter writes for them (conversion/deepseek.py DeepseekV4DSparkModel, architecture "dflash") and run
as llama.cpp runs them (src/models/dflash.cpp graph_dsv4, common/speculative.cpp draft-dspark); docs/speculative.md.

The draft reads the target's hidden states: at every position p the target processed, the mean over the hc streams
that enter each of its blocks `dflash.target_layers` (llama.cpp's layer-input taps, L = n_layers the last block's
output), concatenated into one feature row f_p. It keeps per stage s a window of KV rows of its own:

    g_p = enc_norm(fc f_p)                          (rms norm with weight enc.output_norm)
    kv_s(p) = rope_p(kv_norm_s(wkv_s g_p))          each stage's K = V row at position p

To draft k tokens after y, the token just decided at position p0 (its target features not known yet), the block
[y, MASK, ..., MASK] (k tokens, MASK = tokenizer.ggml.mask_token_id) at positions p0..p0+k-1 runs through the
stages (full V4 blocks: hyper-connections, window attention with sinks, score-routed MoE with the shared expert) on
the target's embedding, its attention without the causal mask (each block row sees the whole block and the window
of context rows before it); then z = hc_head(h), logits = head(rms_norm(z, output_norm)) with the target's head,
and the Markov head chains the block's rows:

    prev_0 = y;  c_i = logits_i + markov_w2 markov_w1[prev_i];  d_i = argmax c_i;  prev_{i+1} = d_i

The drafts are d_0..d_{k-1}; the block's rows are dropped afterwards. The confidence head (conf_proj, read by
llama.cpp's --spec-draft-p-min only) is not used.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np

from flashlite import backends as backend
from flashlite.gguf_file import WHOLE, GGUFFile
from flashlite.kv_cache import LayerCache
from flashlite.models import deepseek_v4 as v4
from flashlite.models.deepseek_v4 import HyperHead, ModelArgs, RoPE, linear, rms_norm
from flashlite.models.v4_spec import DSPARK_ARCH, dspark_tensors, layer_tensors
from flashlite.speculative import draft_state

ARCH = DSPARK_ARCH  # the draft's keys are `dflash.*`
_SHAPE_KEYS = ("dim", "hc_mult", "head_dim", "rope_head_dim", "n_heads", "window_size")


def is_dspark_draft(f: GGUFFile) -> bool:
    """Whether a GGUF is a DSpark draft (llama.cpp's test: a dflash model with a Markov head)."""
    return f.get("general.architecture") == ARCH and "markov_w1.weight" in f.tensors


class DSparkHead:
    """The DSpark draft of a GGUF, bound to the main model (flashlite.model.Model) whose embedding, head and hidden
    states it uses."""

    def __init__(self, path: str | os.PathLike, main):
        self.path = os.fspath(path)
        f = self.file = GGUFFile(path)
        if not is_dspark_draft(f):
            raise ValueError(f"{self.path}: not a DSpark draft GGUF (general.architecture '{ARCH}' with "
                             "markov_w1.weight, as llama.cpp's convert_hf_to_gguf.py writes for a DSpark checkpoint)")
        m = main.args
        a = self.args = ModelArgs.from_gguf(f, arch=ARCH, vocab_size=m.vocab_size)
        differ = [k for k in _SHAPE_KEYS if getattr(a, k) != getattr(m, k)]
        if differ:
            what = ", ".join(f"{k} {getattr(a, k)} vs {getattr(m, k)}" for k in differ)
            raise ValueError(f"{self.path}: a DSpark draft of another model than {main.file.path} ({what})")
        if any(a.compress_ratios) or a.n_hash_layers:
            raise ValueError(f"{self.path}: DSpark stages have compress ratio 0 and no hash routing "
                             f"(got {ARCH}.attention.compress_ratios {list(a.compress_ratios)}, "
                             f"{ARCH}.hash_layer_count {a.n_hash_layers})")
        layers = f.get(f"{ARCH}.target_layers")
        if (not isinstance(layers, list) or not layers
                or not all(isinstance(x, int) and 0 <= x <= m.n_layers for x in layers)):
            raise ValueError(f"{self.path}: {ARCH}.target_layers: expected a list of block indices in "
                             f"0..{m.n_layers} of the target, got {layers!r}")
        self.target_layers = [int(x) for x in layers]
        self.block_size = f.get(f"{ARCH}.block_size")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"{self.path}: {ARCH}.block_size: expected a positive integer, got {self.block_size!r}")
        self.mask_id = f.get("tokenizer.ggml.mask_token_id")
        if not isinstance(self.mask_id, int) or not 0 <= self.mask_id < m.vocab_size:
            raise ValueError(f"{self.path}: tokenizer.ggml.mask_token_id: expected a token id in "
                             f"0..{m.vocab_size - 1}, got {self.mask_id!r}")
        if f.get(f"{ARCH}.sample_from_anchor", True) is not True:
            raise ValueError(f"{self.path}: {ARCH}.sample_from_anchor false (a bonus-anchor draft) is not supported")
        self.causal = f.get(f"{ARCH}.attention.causal", False) is True
        rope = RoPE(a.rope_head_dim, a.rope_theta)
        # on a device (main.device) the stages, the feature projection and the norms go where the main model's
        # weights are, and the context rows where its cache's are; the Markov head stays on the host, where the
        # draft logits come for the chaining
        self.device = main.device
        upload = backend.uploader(self.device)
        self.stages = []
        for s in range(a.n_layers):
            spec = {f"blk.{s}." + k: use for k, use in layer_tensors(a, s).items()}
            w = {name[len(f"blk.{s}."):]: upload(f.load(name, ne, use)) for name, (ne, use) in spec.items()}
            self.stages.append(v4.build_block(a, s, w, rope, None))
        rank = f.tensors["markov_w1.weight"].ne[0]
        own = dspark_tensors(a, len(self.target_layers), rank)  # a.vocab_size is the target's

        def load(name):
            return f.load(name, *own[name])

        self.fc = upload(load("fc.weight"))
        self.fc_scale = self._scale(f, "fc.scale")
        self.enc_norm = upload(load("enc.output_norm.weight"))
        self.norm = upload(load("output_norm.weight"))
        self.hc_head = HyperHead(a, *(upload(load(f"output_hc_{part}.weight")) for part in ("fn", "base", "scale")))
        self.markov_w1 = load("markov_w1.weight")  # rows by token: [vocab, rank]
        self.markov_w2 = load("markov_w2.weight")
        self.markov_scale = self._scale(f, "markov_w2.scale")
        self.main = main.net

    @staticmethod
    def _scale(f: GGUFFile, name: str) -> float:
        """A matrix's optional per-tensor scale (llama.cpp's build_lora_mm multiplies the product by it)."""
        return float(f.load(name, (1,), WHOLE)[0]) if name in f.tensors else 1.0

    def make_caches(self, kv_format: str = "f32") -> list[LayerCache]:
        a = self.args
        row_log = backend.row_log(self.device, kv_format)
        return [LayerCache(a.head_dim, a.window_size, 0, a.index_head_dim, a.rope_head_dim, kv_format, row_log)
                for _ in self.stages]

    def features(self, taps: dict) -> np.ndarray:
        """The feature rows [T, n_layers * dim] of a forward's taps (Model.forward(taps=...)), where they are."""
        return backend.concat([taps[layer] for layer in self.target_layers], axis=1)

    def inject(self, features: np.ndarray, start: int, caches: list[LayerCache]) -> None:
        """Append the context rows of positions start.. to each stage's cache."""
        a = self.args
        g = linear(self.fc, backend.contiguous(features))
        if self.fc_scale != 1.0:
            g = g * np.float32(self.fc_scale)
        g = rms_norm(g, self.enc_norm, a.norm_eps)
        positions = np.arange(start, start + features.shape[0])
        for stage, cache in zip(self.stages, caches):
            attn = stage.attn
            cos, sin = attn.rope.cos_sin(positions)
            cache.kv.append(attn.rope.apply(rms_norm(linear(attn.wkv, g), attn.kv_norm, a.norm_eps), cos, sin))

    def block_logits(self, anchor: int, k: int, start: int, caches: list[LayerCache]) -> tuple[np.ndarray, np.ndarray]:
        """(logits [k, vocab], a host array, and z [k, dim]) of the block [anchor, MASK x (k-1)] at positions
        start.., the caches holding the context rows before start; the block's rows are dropped from them again."""
        ids = np.array([anchor] + [self.mask_id] * (k - 1), np.int64)
        positions = np.arange(start, start + k)
        h = backend.hc_streams(self.main.embed_tokens(ids), self.args.hc_mult)
        try:
            for stage, cache in zip(self.stages, caches):
                h = stage(h, positions, ids, cache, causal=self.causal)
        finally:
            for cache in caches:
                cache.truncate(start)
        z = self.hc_head(h)
        return backend.to_host(linear(self.main.head, rms_norm(z, self.norm, self.args.norm_eps))), z

    def markov(self, logits: np.ndarray, anchor: int) -> list[int]:
        """The drafts: each row biased by the Markov head on the token before it, chained greedily."""
        drafts, prev = [], anchor
        for row in logits:
            bias = linear(self.markov_w2, self.markov_w1[prev][None, :])[0]
            if self.markov_scale != 1.0:
                bias = bias * np.float32(self.markov_scale)
            prev = int(np.argmax(row + bias))
            drafts.append(prev)
        return drafts

    def close(self) -> None:
        self.file.close()


class DSparkState:
    """A sequence's DSpark context (kept on the model's ModelCache, so a conversation's next turn keeps it): each
    stage's KV rows of the positions [start, end) whose target features were seen."""

    def __init__(self, head: DSparkHead, kv_format: str):
        self.head = head
        self.caches = head.make_caches(kv_format)

    @property
    def start(self) -> int:
        return self.caches[0].kv.start

    @property
    def end(self) -> int:
        return self.caches[0].kv.end

    def restart(self, pos: int) -> None:
        """Hold nothing, the next rows being those of position pos."""
        for cache in self.caches:
            cache.kv.restore(pos, np.empty((0, cache.kv.fmt.nbytes), np.uint8))

    def sync(self, pos: int) -> None:
        """The main cache holds pos tokens: forget rows of positions it does not hold."""
        if self.end > pos:
            if self.start > max(0, pos - self.caches[0].window + 1):
                self.restart(pos)
            else:
                for cache in self.caches:
                    cache.truncate(pos)

    def observe(self, features: np.ndarray, start: int) -> None:
        """The target features of positions start..start+T-1."""
        if start != self.end:
            self.sync(start)
            if start != self.end:  # a gap: features of earlier positions were never seen
                self.restart(start)
        self.head.inject(features, start, self.caches)
        for cache in self.caches:  # the window and as much again: room to truncate a turn's end
            cache.trim(self.end - cache.window)

    def covers(self, pos: int) -> bool:
        """Whether the rows of the window before pos are all here."""
        return self.end == pos and self.start <= max(0, pos - self.caches[0].window + 1)


class DSparkDrafter:
    """Drafts with a DSpark head (DSparkHead): one block of k tokens through its stages a round."""

    cost = None  # seconds the last propose() spent drafting

    def __init__(self, head: DSparkHead, cache, lock):
        self.head, self.lock = head, lock
        self.state = draft_state(head, cache, DSparkState)

    @property
    def context_rows(self) -> int:
        return self.state.caches[0].window  # a draft reads the context rows of the window before it

    def capture(self) -> dict:
        return {"taps": {layer: None for layer in self.head.target_layers}}

    def observe(self, captured: dict, start: int, rows: int) -> None:
        self.state.observe(self.head.features(captured["taps"])[:rows], start)

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k drafts after `tokens` (y, the token just decided, last, at position len(tokens) - 1)."""
        pos = len(tokens) - 1
        k = min(k, self.head.block_size)
        if k <= 0 or not self.state.covers(pos):
            return []
        with self.lock:
            t0 = time.perf_counter()
            logits, _ = self.head.block_logits(int(tokens[-1]), k, pos, self.state.caches)
            drafts = self.head.markov(logits, int(tokens[-1]))
            self.cost = time.perf_counter() - t0
        return drafts
