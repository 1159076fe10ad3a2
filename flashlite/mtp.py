"""DeepSeek V4's multi-token-prediction (MTP) block as a drafter: read from the draft GGUF llama.cpp's converter
writes with `--mtp` (and `flashlite quantize --mtp`), run with the main model's blocks on its backend (the C core, or
a torch device where the main model runs, its weights and rows uploaded there).

The block (DeepSeek's MTPBlock, as tools/train_tiny.py trains it) maps the main model's last streams h_i [hc, dim]
at position i and the embedding of the token x_{i+1} to logits for x_{i+2}:

    hm = eh_proj([enorm(embed(x_{i+1})) ; hnorm(h_i)])      per stream: [e_proj | h_proj], run as e_proj(e) + h_proj(h)
    hm = Block(hm)                                           a full V4 block: window-only attention, score-routed MoE
    logits = head(shared_head_norm(hc_head(hm)))             its own hc_head and norm, the model's head

Its attention keeps its own window of rows (one per position it saw), so it needs a row for every position the
main model decodes, not only when drafting; a row is its own position's input alone through the attention's KV
projection (window-only attention, no compressor), so rows a query only sees are made without the block's attention
and MoE (catch_up). Drafting k tokens chains it: draft j+1 feeds the block's own output
streams hm and draft j instead of the main model's h (llama.cpp does the same).

Files: the draft GGUF holds token_embd, output and output_norm (llama.cpp's loader requires them), the block as
blk.{n}.* (n = block_count - 1), blk.{n}.nextn.{eh_proj,enorm,hnorm,shared_head_norm} and the block's hc_head as
output_hc_*; deepseek4.nextn_predict_layers is 1. The embedding and head used are the main model's (the MTP shares
them: the checkpoint has no other), so the draft's copies are never paged in.
"""
from __future__ import annotations

import os

import numpy as np

from flashlite import backends as backend
from flashlite.block_formats import row_bytes
from flashlite.gguf_file import GGUFFile, WeightView
from flashlite.kv_cache import LayerCache
from flashlite.models import deepseek_v4 as v4
from flashlite.models.deepseek_v4 import HyperHead, ModelArgs, RoPE, linear, linear_groups, rms_norm
from flashlite.models.v4_spec import layer_tensors, mtp_tensors

_SHAPE_KEYS = ("dim", "hc_mult", "vocab_size", "head_dim", "rope_head_dim", "n_heads", "window_size")


def is_mtp_draft(f: GGUFFile) -> bool:
    """Whether a GGUF is an MTP draft (llama.cpp's test: its last block has nextn.eh_proj)."""
    blocks = f.get(f"{v4.ARCH}.block_count")
    return isinstance(blocks, int) and f"blk.{blocks - 1}.nextn.eh_proj.weight" in f.tensors


def _column_halves(w: WeightView) -> tuple[WeightView, WeightView]:
    """eh_proj [dim, 2 dim] as e_proj and h_proj, its first and last dim columns, each a weight of its own (a copy:
    the core's products read whole rows). Every row's blocks split there, V4's dim being a multiple of the block
    size of every format (row_bytes refuses one that is not)."""
    d = w.k // 2
    cut = row_bytes(w.type, d) if w.data.dtype == np.uint8 else d
    return tuple(WeightView(f"{w.name}[{part}]", w.type, (d, w.rows), np.ascontiguousarray(data))
                 for part, data in (("e_proj", w.data[:, :cut]), ("h_proj", w.data[:, cut:])))


class MTPHead:
    """The MTP block of a draft GGUF, bound to the main model (flashlite.model.Model) whose embedding, head and
    hidden streams it uses."""

    def __init__(self, path: str | os.PathLike, main):
        self.path = os.fspath(path)
        f = self.file = GGUFFile(path)
        if not is_mtp_draft(f):
            raise ValueError(f"{self.path}: not an MTP draft GGUF (no blk.N.nextn.eh_proj.weight in its last block; "
                             "write one with `flashlite quantize CHECKPOINT mtp-NAME.gguf --mtp` or llama.cpp's "
                             "convert_hf_to_gguf.py --mtp)")
        a = self.args = ModelArgs.from_gguf(f, with_mtp=True)
        m = main.args
        differ = [k for k in _SHAPE_KEYS if getattr(a, k) != getattr(m, k)]
        if differ or a.n_layers - a.n_mtp_layers != m.n_layers:
            what = ", ".join(f"{k} {getattr(a, k)} vs {getattr(m, k)}" for k in differ) or \
                f"{a.n_layers - a.n_mtp_layers} trunk layers vs {m.n_layers}"
            raise ValueError(f"{self.path}: an MTP draft of another model than {main.file.path} ({what})")
        self.layer = n = a.n_layers - a.n_mtp_layers
        if a.compress_ratios[n] != 0:
            raise ValueError(f"{self.path}: the MTP block has compress ratio {a.compress_ratios[n]}; V4's is 0")
        if n < a.n_hash_layers:
            raise ValueError(f"{self.path}: a hash-routed MTP block is not supported (llama.cpp's neither)")
        # on a device (main.device) the block's weights go where the main model's are, whole (no placement: the
        # block is one layer), and its rows where the main cache's are
        self.device = main.device
        upload = backend.uploader(self.device)
        spec = {f"blk.{n}." + k: use for k, use in layer_tensors(a, n).items()}
        w = {name[len(f"blk.{n}."):]: upload(f.load(name, ne, use)) for name, (ne, use) in spec.items()}
        self.block = v4.build_block(a, n, w, RoPE(a.rope_head_dim, a.rope_theta), None)
        # its draft steps and catch-ups (up to STEP_MAX_TOKENS) run the backend's planned layer call, as the main
        # model's decode steps do: bitwise the same as op by op
        self.block.attn_plan, self.block.ffn_plan = self.block.plan_attn(), self.block.plan_ffn()
        own = mtp_tensors(a, n)

        def load(name):
            return f.load(name, *own[name])

        self.e_proj, self.h_proj = map(upload, _column_halves(load(f"blk.{n}.nextn.eh_proj.weight")))
        self.enorm = upload(load(f"blk.{n}.nextn.enorm.weight"))
        self.hnorm = upload(load(f"blk.{n}.nextn.hnorm.weight"))
        norm = f"blk.{n}.nextn.shared_head_norm.weight"
        self.norm = upload(load(norm)) if norm in f.tensors else main.net.norm
        self.hc_head = HyperHead(a, *(upload(load(f"output_hc_{part}.weight")) for part in ("fn", "base", "scale")))
        self.main = main.net

    def make_cache(self, kv_format: str = "f32") -> LayerCache:
        a = self.args
        row_log = backend.row_log(self.device, kv_format)
        return LayerCache(a.head_dim, a.window_size, 0, a.index_head_dim, a.rope_head_dim, kv_format, row_log)

    def __call__(self, h: np.ndarray, token_ids: np.ndarray, positions: np.ndarray, cache: LayerCache,
                 logits: str = "last") -> tuple[np.ndarray, np.ndarray]:
        """(logits, hm): the block over T positions, h [T, hc, dim] the streams at positions and token_ids [T]
        the tokens after them. logits [T, vocab] ("all"), [1, vocab] ("last") or none ("none"), a host array;
        hm [T, hc, dim] the block's output streams (the h of the next draft step), where the model computes."""
        a = self.args
        token_ids = np.asarray(token_ids, np.int64)
        hm = self.block_input(h, token_ids)
        # in chunks that the block's planned layer call takes, each row's result the same bits as in one batch (a
        # longer batch would otherwise run op by op)
        step = v4.STEP_MAX_TOKENS
        positions = np.asarray(positions)
        hm = backend.concat([self.block(hm[c:c + step], positions[c:c + step], token_ids[c:c + step], cache)
                             for c in range(0, len(token_ids), step)], axis=0)
        if logits == "none":
            return np.empty((0, a.vocab_size), np.float32), hm
        y = hm[-1:] if logits == "last" else hm
        return backend.to_host(linear(self.main.head, rms_norm(self.hc_head(y), self.norm, a.norm_eps))), hm

    def block_input(self, h: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
        """The block's input streams [T, hc, dim]: eh_proj of the token's embedding and the main model's streams,
        as e_proj(enorm(embed(x))) + h_proj(hnorm(h)): the token's half is the same for every stream, so it is
        computed once per position rather than once per stream (hc times)."""
        a = self.args
        t, hc, d = h.shape
        e = rms_norm(self.main.embed_tokens(token_ids), self.enorm, a.norm_eps)
        hn = rms_norm(h, self.hnorm, a.norm_eps).reshape(t * hc, d)
        (pe, ph), = linear_groups([(self.e_proj, e), (self.h_proj, hn)])  # one call of the backend for both
        return ph.reshape(t, hc, d) + pe[:, None, :]

    def catch_up(self, h: np.ndarray, token_ids: np.ndarray, positions: np.ndarray, cache: LayerCache) -> None:
        """Only the block's KV rows of T positions (h [T, hc, dim] and token_ids [T] as for __call__), the bits a
        run of the block writes: a row is a function of its own position's input alone (window-only attention, no
        compressor), so the rows a later query sees need neither the attention nor the MoE of these positions,
        which are most of the block's work."""
        a, blk = self.args, self.block
        at = blk.attn
        x, _, _ = blk.attn_hc(self.block_input(h, np.asarray(token_ids, np.int64)))
        cos, sin = at.rope.cos_sin(np.asarray(positions))
        at.store_kv(linear(at.wkv, rms_norm(x, blk.attn_norm, a.norm_eps)), cos, sin, cache)

    def close(self) -> None:
        self.file.close()
