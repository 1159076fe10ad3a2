"""Per-layer decode state of DeepSeek V4 (architecture notes sections 5 and 8), and how it rolls back.

Every piece is a log of rows indexed by absolute position: the raw KV rows of the sliding window, the per-token
compressor projections that the next compressed row still needs (its state), and the compressed and indexer rows.
Compressed and indexer rows are kept for every position. Window rows and compressor state are kept for the last
`rewind` positions, so rolling back there is exact in place; further back the cache restores the nearest checkpoint
(a copy of the window rows and compressor state at a multiple of `checkpoint_every`) and hands back the token ids
the model must feed again. Checkpoints thin out with age, so they cost O(log n) memory. See docs/kv_cache.md.

Row formats: "f32" stores rows as computed (transformers' semantics, which the oracle follows); "fp8" stores them
the way DeepSeek's reference rounds them (e4m3 with a ue8m0 scale per 64 and bf16 rope dims; indexer rows e2m1
with an e8m0 scale per 32 after a Hadamard rotation), packed by the C core, about 3.5 KB per token at V4-Flash
widths instead of 13.8 KB. Storing is the rounding: every reader sees the rows as stored.
"""
from __future__ import annotations

import operator

import numpy as np

from flashlite._native import check, ffi, lib

KV_FORMATS = ("f32", "fp8")


class RowFormat:
    """How a log stores rows of `dim` floats: float32 as they are, or packed by the C core (lib.FL_KV_FP8 with the
    last rope_dim dims in bf16, lib.FL_KV_FP4)."""

    def __init__(self, dim: int, kind: int | None = None, rope_dim: int = 0):
        self.dim, self.kind, self.rope_dim = dim, kind, rope_dim
        self.nbytes = 4 * dim if kind is None else int(lib.fl_kv_row_bytes(kind, dim, rope_dim))
        if self.nbytes <= 0:
            raise ValueError(f"rows of {dim} dims ({rope_dim} rope) do not fit packed row kind {kind}")

    def pack(self, rows: np.ndarray) -> np.ndarray:
        """float32 [n, dim] -> uint8 [n, nbytes], rounded onto the format's grid."""
        rows = np.ascontiguousarray(rows, np.float32).reshape(-1, self.dim)
        if self.kind is None:
            return rows.view(np.uint8)
        out = np.empty((rows.shape[0], self.nbytes), np.uint8)
        if rows.shape[0]:
            check(lib.fl_kv_pack(self.kind, rows.shape[0], self.dim, self.rope_dim, ffi.from_buffer("float[]", rows),
                                 ffi.from_buffer("uint8_t[]", out)), "fl_kv_pack")
        return out

    def unpack(self, packed: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        """uint8 [n, nbytes] -> float32 rows (rows idx of them when given); a view for float32 rows."""
        if self.kind is None:
            rows = packed.view(np.float32)
            return rows if idx is None else rows[idx]
        n = packed.shape[0] if idx is None else idx.size
        out = np.empty((n, self.dim), np.float32)
        if n:
            idx_ptr = ffi.NULL if idx is None else ffi.from_buffer("int32_t[]", np.ascontiguousarray(idx, np.int32))
            check(lib.fl_kv_unpack(self.kind, n, self.dim, self.rope_dim, ffi.from_buffer("uint8_t[]", packed),
                                   packed.shape[0], idx_ptr, ffi.from_buffer("float[]", out)), "fl_kv_unpack")
        return out

    def round(self, rows: np.ndarray) -> np.ndarray:
        """The rows as this format stores them."""
        return self.unpack(self.pack(rows)).reshape(np.shape(rows))


def row_formats(head_dim: int, index_head_dim: int, rope_dim: int, kv_format: str) -> tuple[RowFormat, RowFormat]:
    """The formats of a layer's KV rows (window and compressed) and of its indexer rows, for a kv_format."""
    if kv_format == "fp8":
        return RowFormat(head_dim, lib.FL_KV_FP8, rope_dim), RowFormat(index_head_dim, lib.FL_KV_FP4)
    return RowFormat(head_dim), RowFormat(index_head_dim)


class RowLog:
    """Rows of positions [start, end) in a RowFormat, appended at the end and trimmed from the front.

    start and end live in a C struct fl_row_log (`c`), which also points at the stored rows: the C core's decode
    step appends to the log in place and moves its end, with no Python per log (LayerCache.c gathers a layer's)."""

    def __init__(self, fmt: RowFormat):
        self.fmt = fmt
        self.c = ffi.new("struct fl_row_log *")
        self.restore(0, np.empty((0, fmt.nbytes), np.uint8))

    start = property(lambda self: self.c.start, lambda self, v: setattr(self.c, "start", v))
    end = property(lambda self: self.c.end, lambda self, v: setattr(self.c, "end", v))

    def attach(self, slot) -> None:
        """Keep the log's C struct in `slot` (a struct fl_row_log * into a larger struct, which the caller keeps
        alive) from now on."""
        slot.start, slot.end = self.start, self.end
        self.c = slot
        self._point()

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def width(self) -> int:
        return self.fmt.dim

    def append(self, rows: np.ndarray) -> None:
        stored = self._stored(rows)
        n, used = stored.shape[0], len(self)
        self.reserve(n)
        self._buf[self._off + used:self._off + used + n] = stored
        self.end += n

    def reserve(self, n: int) -> None:
        """Room for n more rows after the end."""
        used = len(self)
        if self._off + used + n > self._buf.shape[0]:
            buf = self._empty(max(16, used + n, (used + n) * 3 // 2))
            buf[:used] = self._buf[self._off:self._off + used]
            self._buf, self._off = buf, 0
            self._point()

    def _stored(self, rows: np.ndarray) -> np.ndarray:
        """Rows as the buffer holds them: packed in the format."""
        return self.fmt.pack(rows)

    def _empty(self, capacity: int) -> np.ndarray:
        """A buffer for capacity stored rows."""
        return np.empty((capacity, self.fmt.nbytes), np.uint8)

    def _point(self) -> None:
        """Point the C struct at the stored rows after the buffer or its offset changed."""
        if self._bound is not self._buf:  # a C pointer made once per buffer, not per step
            self._bound, self._pointer = self._buf, ffi.from_buffer("uint8_t[]", self._buf)
        self.c.buf = self._pointer + self._off * self.fmt.nbytes
        self.c.cap = self._buf.shape[0] - self._off

    def _span(self, lo: int, hi: int):
        """The buffer's stored rows of positions [lo, hi), a view."""
        if lo < self.start or hi > self.end or lo > hi:
            raise IndexError(f"rows [{lo}, {hi}) outside the log's [{self.start}, {self.end})")
        return self._buf[self._off + lo - self.start:self._off + hi - self.start]

    def packed(self, lo: int, hi: int) -> np.ndarray:
        """A view of the stored bytes of positions [lo, hi)."""
        return self._span(lo, hi)

    def snapshot(self, lo: int, hi: int) -> np.ndarray:
        """A copy of the stored bytes of positions [lo, hi) in host memory, for a checkpoint (restore takes it
        back; np.asarray gives its bytes)."""
        return self.packed(lo, hi).copy()

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """The float32 rows of positions [lo, hi) (a view for float32 logs)."""
        return self.fmt.unpack(self.packed(lo, hi))

    def gather(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For positions idx (any shape, -1 = none) of a log that starts at 0: (rows, idx') with rows[idx'] the
        named rows. Float32 logs give every row as a view; packed logs unpack only the named ones."""
        if self.fmt.kind is None:
            return self.rows(self.start, self.end), idx
        named = np.unique(idx[idx >= 0]).astype(np.int32)
        remapped = np.where(idx >= 0, np.searchsorted(named, idx), -1).astype(np.int32)
        return self._unpacked(named - self.start), remapped

    def _unpacked(self, offsets: np.ndarray):
        """The float32 rows at these offsets from the start of a packed log."""
        return self.fmt.unpack(self.packed(self.start, self.end), offsets)

    def round(self, rows: np.ndarray) -> np.ndarray:
        """rows as this log would store them (the rounding of its format)."""
        return self.fmt.round(rows)

    def trim(self, keep_from: int) -> None:
        """Forget positions before keep_from."""
        keep_from = min(max(keep_from, self.start), self.end)
        if keep_from != self.start:
            self._off += keep_from - self.start
            self.start = keep_from
            self._point()

    def truncate(self, pos: int) -> None:
        if pos < self.start:
            raise ValueError(f"cannot truncate to {pos}: rows before {self.start} are already dropped")
        self.end = min(self.end, pos)

    def restore(self, start: int, packed: np.ndarray) -> None:
        """Hold exactly the stored rows `packed` of positions start.., dropping everything else."""
        self._buf = np.array(packed, np.uint8).reshape(-1, self.fmt.nbytes)
        self._bound = None  # the buffer _point() last made a C pointer of
        self._off = 0
        self.start, self.end = start, start + self._buf.shape[0]
        self._point()

    def nbytes(self) -> int:
        return len(self) * self.fmt.nbytes


class CompressorState:
    """A compressor's per-token projections (kv and score with ape added, float32), ratio r, c = 2 with overlap;
    and the compressed rows it emitted, in `row_format`. Row j pools tokens [(j-1)r, (j+1)r) with overlap,
    [jr, (j+1)r) without. `rotated`: rows are stored after a Hadamard rotation (the reference's FP4 indexer)."""

    def __init__(self, ratio: int, width: int, overlap: bool, row_format: RowFormat | None = None,
                 rotated: bool = False, row_log=RowLog):
        self.ratio = ratio
        self.overlap = overlap
        self.rotated = rotated
        self.kv = row_log(RowFormat(width))
        self.score = row_log(RowFormat(width))
        self.rows = row_log(row_format or RowFormat(width // 2 if overlap else width))

    def first_needed(self, pos: int) -> int:
        """The first token position the state must hold to continue from position pos."""
        return max(0, (pos // self.ratio - (1 if self.overlap else 0)) * self.ratio)

    def trim(self, keep_pos: int) -> None:
        first = self.first_needed(keep_pos)
        self.kv.trim(first)
        self.score.trim(first)

    def truncate(self, pos: int) -> None:
        if self.kv.start > self.first_needed(pos):
            raise ValueError(f"cannot truncate to {pos}: the compressor state before {self.kv.start} is dropped")
        self.kv.truncate(pos)
        self.score.truncate(pos)
        self.rows.truncate(pos // self.ratio)


class LayerCache:
    """One layer: the window's raw KV rows, and for compressed layers the compressor (and indexer) state.
    row_log: the class of its logs (RowLog, host memory; a device backend's keeps them on its device)."""

    def __init__(self, head_dim: int, window: int, ratio: int, index_head_dim: int, rope_dim: int = 64,
                 kv_format: str = "f32", row_log=RowLog):
        if kv_format not in KV_FORMATS:
            raise ValueError(f"kv_format must be one of {KV_FORMATS}, got {kv_format!r}")
        self.head_dim, self.window, self.ratio, self.index_head_dim = head_dim, window, ratio, index_head_dim
        self.rope_dim, self.kv_format, self.row_log = rope_dim, kv_format, row_log
        self.kv_row, self.index_row = row_formats(head_dim, index_head_dim, rope_dim, kv_format)
        # the layer's logs as the C core's decode step takes them (struct fl_v4_attn_cache): each log keeps its
        # C struct here, so this one pointer stays valid for the cache's life
        self.c = ffi.new("struct fl_v4_attn_cache *")
        self.kv = self.row_log(self.kv_row)
        self.compressor = None
        self.indexer = None
        if self.ratio:
            overlap = self.ratio == 4
            width = self.head_dim * (2 if overlap else 1)
            self.compressor = CompressorState(self.ratio, width, overlap, self.kv_row, row_log=self.row_log)
            if overlap:
                self.indexer = CompressorState(self.ratio, 2 * self.index_head_dim, True, self.index_row,
                                               rotated=self.index_row.kind is not None, row_log=self.row_log)
        for log, field in zip(self.logs(), ("kv", "ckv", "cscore", "crows", "ikv", "iscore", "irows")):
            log.attach(ffi.addressof(self.c[0], field))

    def clear(self) -> None:
        """Every log emptied in place: a device's rings stay where they are, so a captured step replays."""
        for log in self.logs():
            log.restore(0, np.empty((0, log.fmt.nbytes), np.uint8))

    def reserve(self, n: int) -> None:
        """Room for n more rows in every log (what a step of n tokens may append)."""
        for log in self.logs():
            log.reserve(n)

    def states(self) -> list[CompressorState]:
        return [s for s in (self.compressor, self.indexer) if s is not None]

    def checkpoint_logs(self):
        """The logs a checkpoint copies, each with the first position a continuation from `pos` reads."""
        logs = [(self.kv, lambda pos: max(0, pos - self.window + 1))]
        for s in self.states():
            logs += [(s.kv, s.first_needed), (s.score, s.first_needed)]
        return logs

    def trim(self, keep_pos: int) -> None:
        self.kv.trim(keep_pos - self.window + 1)
        for s in self.states():
            s.trim(keep_pos)

    def truncate(self, pos: int) -> None:
        if self.kv.start > max(0, pos - self.window + 1):
            raise ValueError(f"cannot truncate to {pos}: window rows before {self.kv.start} are dropped")
        for s in self.states():
            s.truncate(pos)
        self.kv.truncate(pos)

    def logs(self) -> list[RowLog]:
        """Every log of the layer, the compressed rows included, in a fixed order."""
        return [self.kv] + [log for s in self.states() for log in (s.kv, s.score, s.rows)]

    def checkpoint(self, pos: int) -> list[tuple[int, np.ndarray]]:
        """Copies of what continuing from position pos reads besides the compressed rows (which are never dropped)."""
        return [(first(pos), log.snapshot(first(pos), pos)) for log, first in self.checkpoint_logs()]

    def restore(self, pos: int, checkpoint: list[tuple[int, np.ndarray]]) -> None:
        """Go back to position pos from checkpoint(pos)."""
        for (log, _), (lo, packed) in zip(self.checkpoint_logs(), checkpoint):
            log.restore(lo, packed)
        for s in self.states():
            s.rows.truncate(pos // s.ratio)

    def nbytes(self) -> int:
        return sum(log.nbytes() for log, _ in self.checkpoint_logs()) + sum(s.rows.nbytes() for s in self.states())

    def row_bytes_per_token(self) -> float:
        """Bytes the growing part (compressed and indexer rows) costs per token, as stored."""
        return sum(s.rows.fmt.nbytes / s.ratio for s in self.states())


class ModelCache:
    """The decode state of a whole model for one sequence: `pos` tokens seen, their ids, one LayerCache per layer,
    and checkpoints at multiples of `checkpoint_every` (which every compress ratio must divide): the most recent
    `checkpoint_keep` of them, then, ever further back, fewer and fewer (at most checkpoint_keep / 2 per doubling
    of the distance), so a rollback d tokens back feeds again fewer than max(2 * checkpoint_every, 4d / keep)."""

    def __init__(self, layers: list[LayerCache], rewind: int = 256, checkpoint_every: int = 128,
                 checkpoint_keep: int = 8):
        if rewind < 0:
            raise ValueError(f"rewind must be >= 0, got {rewind}")
        if checkpoint_every < 1 or any(layer.ratio and checkpoint_every % layer.ratio for layer in layers):
            raise ValueError(f"checkpoint_every {checkpoint_every} must be a positive multiple of every compress "
                             f"ratio {sorted({layer.ratio for layer in layers if layer.ratio})}")
        if checkpoint_keep < 2:
            raise ValueError(f"checkpoint_keep must be >= 2, got {checkpoint_keep}")
        self.layers = layers
        self.rewind, self.checkpoint_every, self.checkpoint_keep = rewind, checkpoint_every, checkpoint_keep
        self.kv_format = layers[0].kv_format if layers else "f32"
        self.pos = 0
        self._floor = 0  # the earliest position rollback() reaches in place
        self._ids = np.empty(256, np.int32)
        self._checkpoints: dict[int, list] = {}

    @property
    def token_ids(self) -> np.ndarray:
        """The ids of the pos tokens seen (a view)."""
        return self._ids[:self.pos]

    def reset(self) -> None:
        """Start a new sequence."""
        self.rollback(0)

    def advance(self, token_ids) -> None:
        """Record the tokens the layers just consumed; checkpoint, then drop what neither decoding nor a rewind of
        `rewind` tokens reads."""
        ids = np.asarray(token_ids, np.int64).reshape(-1)
        start, self.pos = self.pos, self.pos + ids.size
        if self.pos > self._ids.size:
            self._ids = np.concatenate([self._ids[:start], np.empty(max(self.pos, 2 * self._ids.size) - start,
                                                                    np.int32)])
        self._ids[start:self.pos] = ids
        step = self.checkpoint_every
        for s in range((start // step + 1) * step, self.pos + 1, step):
            self._checkpoints[s] = [layer.checkpoint(s) for layer in self.layers]
        self._thin_checkpoints()
        floor = max(self._floor, self.pos - self.rewind)
        if floor != self._floor:  # nothing to drop while the sequence is shorter than `rewind` (43 layers' logs)
            self._floor = floor
            for layer in self.layers:
                layer.trim(floor)

    def _thin_checkpoints(self) -> None:
        step, keep = self.checkpoint_every, self.checkpoint_keep
        for s in list(self._checkpoints):
            level = ((self.pos - s) // (step * keep)).bit_length()
            if (s // step) % (1 << level):
                del self._checkpoints[s]

    def rollback(self, pos: int) -> np.ndarray:
        """Go back towards the state after the first pos tokens of the sequence: in place when pos is within
        `rewind` tokens, else to the nearest checkpoint at or before pos. Returns the token ids the caller must
        feed again (through the model, into this cache) to reach pos: empty when the cache is at pos already.
        Model.truncate does both."""
        pos = operator.index(pos)
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot truncate to {pos}: the cache holds positions 0..{self.pos}")
        for s in [s for s in self._checkpoints if s > pos]:
            del self._checkpoints[s]
        if pos == 0:
            for layer in self.layers:
                layer.clear()
            self.pos = self._floor = 0
            return np.empty(0, np.int32)
        if pos >= self._floor:
            for layer in self.layers:
                layer.truncate(pos)
            self.pos = pos
            return np.empty(0, np.int32)
        at = max((s for s in self._checkpoints if s <= pos), default=0)
        for layer, checkpoint in zip(self.layers, self._checkpoints.get(at, [None] * len(self.layers))):
            if checkpoint is None:
                layer.clear()
            else:
                layer.restore(at, checkpoint)
        replay = self._ids[at:pos].copy()
        self.pos = self._floor = at
        return replay

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The whole state as named arrays (for np.savez): position, token ids, every log, every checkpoint."""
        out = {"pos": np.array([self.pos, self._floor]), "ids": self.token_ids.copy(),
               "checkpoints": np.array(sorted(self._checkpoints), np.int64)}
        for i, layer in enumerate(self.layers):
            for j, log in enumerate(layer.logs()):
                out[f"log.{i}.{j}.start"] = np.array(log.start)
                out[f"log.{i}.{j}"] = log.packed(log.start, log.end)
        for at, layers in self._checkpoints.items():
            for i, parts in enumerate(layers):
                for j, (lo, packed) in enumerate(parts):
                    out[f"ckpt.{at}.{i}.{j}.start"] = np.array(lo)
                    out[f"ckpt.{at}.{i}.{j}"] = np.asarray(packed)
        return out

    def load_arrays(self, arrays) -> None:
        """Take the state to_arrays() wrote, into this cache of the same layout (KeyError/ValueError otherwise)."""
        pos = np.asarray(arrays["pos"])
        if pos.shape != (2,) or pos.dtype.kind not in "iu" or not 0 <= pos[1] <= pos[0]:
            raise ValueError(f"positions {pos.tolist()}: expected [pos, floor] with 0 <= floor <= pos")
        self.pos, self._floor = (int(v) for v in pos)
        self._ids = np.array(arrays["ids"], np.int32)
        if self._ids.shape != (self.pos,):
            raise ValueError(f"{self._ids.size} token ids for {self.pos} positions")

        def start(name: str, packed: np.ndarray) -> int:
            lo = int(arrays[name + ".start"])
            if not 0 <= lo <= self.pos or packed.dtype != np.uint8 or packed.ndim not in (1, 2):
                raise ValueError(f"{name}: rows from {lo} of {packed.dtype} {packed.shape} for {self.pos} tokens")
            return lo

        for i, layer in enumerate(self.layers):
            layer.clear()
            for j, log in enumerate(layer.logs()):
                packed = arrays[f"log.{i}.{j}"]
                log.restore(start(f"log.{i}.{j}", packed), packed)
        checkpoints = np.asarray(arrays["checkpoints"])
        if checkpoints.dtype.kind not in "iu" or checkpoints.ndim != 1 or (checkpoints > self.pos).any():
            raise ValueError(f"checkpoints {checkpoints.tolist()[:8]} beyond {self.pos} tokens")
        self._checkpoints = {
            int(at): [[(start(f"ckpt.{at}.{i}.{j}", arrays[f"ckpt.{at}.{i}.{j}"]),
                        np.array(arrays[f"ckpt.{at}.{i}.{j}"]))
                       for j in range(len(layer.checkpoint_logs()))] for i, layer in enumerate(self.layers)]
            for at in checkpoints}

    def checkpoint_positions(self) -> list[int]:
        return sorted(self._checkpoints)

    def nbytes_by_part(self) -> dict[str, int]:
        """Bytes held now: compressed and indexer rows, window rows and compressor state, token ids, checkpoints."""
        rows = sum(s.rows.nbytes() for layer in self.layers for s in layer.states())
        return {
            "rows": rows,
            "window_and_state": sum(layer.nbytes() for layer in self.layers) - rows,
            "token_ids": 4 * self.pos,
            "checkpoints": sum(packed.nbytes for c in self._checkpoints.values() for layer in c for _, packed in layer),
        }

    def nbytes(self) -> int:
        """Bytes of decode state held now (see nbytes_by_part); excludes buffer slack from amortised growth."""
        return sum(self.nbytes_by_part().values())

    def row_bytes_per_token(self) -> float:
        """Bytes per token of the growing compressed and indexer rows, as stored (token ids add 4)."""
        return sum(layer.row_bytes_per_token() for layer in self.layers)
