"""Importance matrices in llama.cpp's file formats: the GGUF one `llama-imatrix` writes now, and the legacy `.dat`
one (ds4 writes it) that `llama-quantize` still reads.

An importance matrix holds, per weight matrix (by its GGUF name) and per expert of a stacked one, the mean square
of each input column's activation over a calibration text. The GGUF file stores `<name>.in_sum2` (float32, ne
[columns, experts]: the sums of squares) and `<name>.counts` (float32, ne [1, experts]: the activations summed),
plus `imatrix.datasets`, `imatrix.chunk_count` and `imatrix.chunk_size`. Quantizers weigh their error by
sums / counts (1 where a count is 0, an expert never routed to), as llama-quantize does.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flashlite.gguf_reader import GGUFError, GGUFReader


class ImatrixError(ValueError):
    pass


@dataclass
class Imatrix:
    """sums[name]: float32 [experts, columns]; counts[name]: float32 [experts]."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def weights(self, name: str) -> np.ndarray | None:
        """The importance of each column of tensor `name`, experts one after another (what llama-quantize passes
        to ggml): sums / counts, 1 for an expert with no count. None for a tensor the matrix does not cover."""
        if name not in self.sums:
            return None
        sums, counts = self.sums[name], self.counts[name]
        out = np.ones_like(sums)
        seen = counts > 0
        out[seen] = sums[seen] / counts[seen, None]
        return out.reshape(-1).astype(np.float32)

    def kv(self, path: str) -> list[tuple]:
        """The metadata llama-quantize records in its output about the matrix it used (the entries left after
        --include-weights / --exclude-weights; strings cut to 127 bytes as its overrides cut them)."""
        from gguf import GGUFValueType

        cut = lambda text: text.encode()[:127].decode(errors="ignore")  # noqa: E731
        entries = [("quantize.imatrix.file", cut(os.fspath(path)), GGUFValueType.STRING)]
        if self.datasets:
            entries.append(("quantize.imatrix.dataset", cut(self.datasets[0]), GGUFValueType.STRING))
        entries.append(("quantize.imatrix.entries_count", len(self.sums), GGUFValueType.UINT32))
        if self.chunk_count > 0:
            entries.append(("quantize.imatrix.chunks_count", self.chunk_count, GGUFValueType.UINT32))
        return entries

    def select(self, include=(), exclude=()) -> "Imatrix | None":
        """llama-quantize's --include-weights / --exclude-weights: only the entries whose name contains one of
        `include`, or all but those that contain one of `exclude`; None when no entry is left (the quantizers
        then run as without a matrix)."""
        if include and exclude:
            raise ValueError("--include-weights and --exclude-weights cannot be used together")
        names = [n for n in self.sums if (not include or any(s in n for s in include))
                 and not any(s in n for s in exclude)]
        if not names:
            return None
        return Imatrix({n: self.sums[n] for n in names}, {n: self.counts[n] for n in names}, list(self.datasets),
                       self.chunk_count, self.chunk_size)


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """A llama.cpp importance matrix, GGUF or legacy .dat (told apart by the GGUF magic)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such importance matrix file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    im = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    if not im.sums:
        raise ImatrixError(f"{path}: the importance matrix holds no entries")
    for name, sums in im.sums.items():
        if not np.isfinite(sums).all() or (sums < 0).any():
            raise ImatrixError(f"{path}: entry '{name}' holds negative or non-finite sums")
    return im


def _read_gguf(path: str) -> Imatrix:
    try:
        reader = GGUFReader(path)
    except GGUFError as exc:
        raise ImatrixError(str(exc)) from None
    with reader:
        im = Imatrix()
        meta = reader.metadata
        datasets = meta.get("imatrix.datasets", [])
        im.datasets = [d for d in datasets if isinstance(d, str)] if isinstance(datasets, list) else []
        im.chunk_count = int(meta.get("imatrix.chunk_count", 0) or 0)
        im.chunk_size = int(meta.get("imatrix.chunk_size", 0) or 0)
        by_name = {t.name: t for t in reader.tensors}
        for tname, t in by_name.items():
            if not tname.endswith(".in_sum2"):
                continue
            name = tname[: -len(".in_sum2")]
            c = by_name.get(name + ".counts")
            if c is None:
                raise ImatrixError(f"{path}: entry '{name}' has sums but no counts")
            if t.type != 0 or c.type != 0:
                raise ImatrixError(f"{path}: entry '{name}': sums and counts must be F32")
            sums = np.array(reader.data(t), np.float32).reshape(-1)
            counts = np.array(reader.data(c), np.float32).reshape(-1)
            if counts.size == 0 or sums.size % counts.size:
                raise ImatrixError(f"{path}: entry '{name}': {sums.size} sums do not split into {counts.size} "
                                   f"experts")
            im.sums[name] = sums.reshape(counts.size, -1)
            im.counts[name] = np.rint(counts).astype(np.float32)
        orphans = [n for n in by_name if n.endswith(".counts") and n[: -len(".counts")] + ".in_sum2" not in by_name]
        if orphans:
            raise ImatrixError(f"{path}: entry '{orphans[0][:-len('.counts')]}' has counts but no sums")
    return im


def _read_legacy(path: str) -> Imatrix:
    """The legacy layout: int32 entries; per entry int32 name length, the name, int32 ncall, int32 nval, nval
    float32 (mean squares times ncall); optionally int32 chunk count, int32 length and a dataset name."""
    data = Path(path).read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or n > len(data) - pos:
            raise ImatrixError(f"{path}: {what} needs {n} bytes at byte {pos}, the file has {len(data) - pos} left: "
                               f"not an importance matrix, or truncated")
        pos += n
        return data[pos - n:pos]

    def int32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    im = Imatrix()
    n_entries = int32("entry count")
    if n_entries < 1 or n_entries > len(data) // 12:
        raise ImatrixError(f"{path}: entry count {n_entries} is not plausible: not an importance matrix")
    for i in range(n_entries):
        name = take(int32(f"entry {i} name length"), f"entry {i} name").decode("utf-8", "replace")
        ncall = int32(f"entry '{name}' call count")
        nval = int32(f"entry '{name}' value count")
        if nval < 1:
            raise ImatrixError(f"{path}: entry '{name}' has {nval} values")
        values = np.frombuffer(take(4 * nval, f"entry '{name}' values"), "<f4").astype(np.float32)
        im.sums[name] = values.reshape(1, -1)
        im.counts[name] = np.array([max(ncall, 0)], np.float32)
    if pos + 4 <= len(data):
        im.chunk_count = int32("chunk count")
        if pos + 4 <= len(data):
            n = int32("dataset name length")
            if 0 < n <= len(data) - pos:
                im.datasets.append(take(n, "dataset name").decode("utf-8", "replace"))
    return im


def write_imatrix(path: str | os.PathLike, im: Imatrix) -> None:
    """The GGUF format llama-imatrix writes (readable by llama-quantize and by read_imatrix), written to a temporary
    file next to `path` and renamed over it."""
    from gguf import GGUFWriter

    from flashlite.atomic import atomic_path

    with atomic_path(path) as tmp:
        w = GGUFWriter(str(tmp), arch="")  # an empty arch writes no general.architecture, as llama-imatrix
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", im.datasets or ["unknown"])
        w.add_uint32("imatrix.chunk_count", im.chunk_count)
        w.add_uint32("imatrix.chunk_size", im.chunk_size)
        for name in sorted(im.sums):
            sums = np.ascontiguousarray(im.sums[name], np.float32)
            w.add_tensor(name + ".in_sum2", sums)
            w.add_tensor(name + ".counts", np.ascontiguousarray(im.counts[name], np.float32).reshape(-1, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
