"""Per-layer decode state of DeepSeek V4 (architecture notes section 8).

Every piece is a log of rows indexed by an absolute position: the raw KV rows of the sliding window, the per-token
compressor projections that the next compressed row still needs (its state), and the compressed and indexer rows.
Logs keep `rewind` positions more than decoding needs, so `truncate(pos)` is exact back to `rewind` tokens.
"""
from __future__ import annotations

import numpy as np


class RowLog:
    """Rows of positions [start, end), appended at the end and trimmed from the front."""

    def __init__(self, width: int):
        self.width = width
        self._buf = np.empty((16, width), np.float32)
        self._off = 0  # index in _buf of position `start`
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, rows: np.ndarray) -> None:
        n = rows.shape[0]
        used = self.end - self.start
        if self._off + used + n > self._buf.shape[0]:
            cap = max(self._buf.shape[0], 2 * (used + n))
            buf = np.empty((cap, self.width), np.float32)
            buf[:used] = self._buf[self._off:self._off + used]
            self._buf, self._off = buf, 0
        self._buf[self._off + used:self._off + used + n] = rows
        self.end += n

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """A view of the rows of positions [lo, hi)."""
        if lo < self.start or hi > self.end or lo > hi:
            raise IndexError(f"rows [{lo}, {hi}) outside the log's [{self.start}, {self.end})")
        return self._buf[self._off + lo - self.start:self._off + hi - self.start]

    def trim(self, keep_from: int) -> None:
        """Forget positions before keep_from."""
        keep_from = min(max(keep_from, self.start), self.end)
        self._off += keep_from - self.start
        self.start = keep_from

    def truncate(self, pos: int) -> None:
        if pos < self.start:
            raise ValueError(f"cannot truncate to {pos}: rows before {self.start} are already dropped")
        self.end = min(self.end, pos)


class CompressorState:
    """A compressor's per-token projections (kv and score with ape added), ratio r, c = 2 with overlap; and the
    compressed rows it emitted. Row j pools tokens [(j-1)r, (j+1)r) with overlap, [jr, (j+1)r) without."""

    def __init__(self, ratio: int, width: int, overlap: bool):
        self.ratio = ratio
        self.overlap = overlap
        self.kv = RowLog(width)
        self.score = RowLog(width)
        self.rows = RowLog(width // 2 if overlap else width)

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
    """One layer: the window's raw KV rows, and for compressed layers the compressor (and indexer) state."""

    def __init__(self, head_dim: int, window: int, ratio: int, index_head_dim: int):
        self.head_dim, self.window, self.ratio, self.index_head_dim = head_dim, window, ratio, index_head_dim
        self.clear()

    def clear(self) -> None:
        self.kv = RowLog(self.head_dim)
        self.compressor = None
        self.indexer = None
        if self.ratio:
            overlap = self.ratio == 4
            width = self.head_dim * (2 if overlap else 1)
            self.compressor = CompressorState(self.ratio, width, overlap)
            if overlap:
                self.indexer = CompressorState(self.ratio, 2 * self.index_head_dim, True)

    def _states(self):
        return [s for s in (self.compressor, self.indexer) if s is not None]

    def trim(self, keep_pos: int) -> None:
        self.kv.trim(keep_pos - self.window + 1)
        for s in self._states():
            s.trim(keep_pos)

    def truncate(self, pos: int) -> None:
        if self.kv.start > max(0, pos - self.window + 1):
            raise ValueError(f"cannot truncate to {pos}: window rows before {self.kv.start} are dropped")
        for s in self._states():
            s.truncate(pos)
        self.kv.truncate(pos)

    def row_bytes_per_token(self) -> float:
        """Bytes the growing part (compressed and indexer rows) costs per token, as stored now (float32)."""
        return sum(4 * s.rows.width / s.ratio for s in self._states())


class ModelCache:
    """The decode state of a whole model for one sequence: `pos` tokens seen, one LayerCache per layer."""

    def __init__(self, layers: list[LayerCache], rewind: int = 256):
        self.layers = layers
        self.rewind = rewind
        self.pos = 0
        self._floor = 0  # the earliest position truncate() can still reach, besides 0

    def reset(self) -> None:
        """Start a new sequence."""
        self.truncate(0)

    def advance(self, n: int) -> None:
        """Record n more tokens and drop what neither decoding nor a rewind of `rewind` tokens will read."""
        self.pos += n
        self._floor = max(self._floor, self.pos - self.rewind)
        for layer in self.layers:
            layer.trim(self._floor)

    def truncate(self, pos: int) -> None:
        """Go back to the state after the first pos tokens of the sequence."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot truncate to {pos}: the cache holds positions 0..{self.pos}")
        if pos == 0:
            for layer in self.layers:
                layer.clear()
            self.pos = self._floor = 0
            return
        if pos < self._floor:
            raise ValueError(f"cannot truncate to {pos}: the cache keeps only the last {self.rewind} positions "
                             f"(earliest reachable: {self._floor}); prefill again instead")
        for layer in self.layers:
            layer.truncate(pos)
        self.pos = pos

    def row_bytes_per_token(self) -> float:
        return sum(layer.row_bytes_per_token() for layer in self.layers)
