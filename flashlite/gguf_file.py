"""Open a GGUF model file: its metadata and its tensors as numpy views into one memory map (no copies).

The file is treated as hostile: every failure raises a ValueError (or FileNotFoundError) naming the file and,
where there is one, the tensor or key.
"""
from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from flashlite import block_formats
from flashlite._native import ffi
from flashlite.gguf_reader import GGUFError, GGUFReader

# How the forward pass uses a tensor, which decides the types it may have (any type llama.cpp can run with):
MATMUL = "matmul"  # multiplied in place, in its own type: any type the core multiplies
WHOLE = "whole"    # small and used whole as float32 (norms, biases, position biases): any type the core
                   # dequantizes, dequantized once at load
ROWS = "rows"      # read by rows (the embedding): any type the core dequantizes, each row as it is read
INDEX = "index"    # an integer table (tid2eid): any integer type, held as int32
_INT_TYPES = (24, 25, 26, 27)  # I8, I16, I32, I64


def _type_ok(type_id: int, use: str) -> bool:
    if use == INDEX:
        return type_id in _INT_TYPES
    return block_formats.can_matmul(type_id) if use == MATMUL else block_formats.can_dequantize(type_id)


class MatrixShape:
    """rows and k of a tensor of ggml shape `ne` (ne[0] fastest), wherever it is held."""

    @property
    def rows(self) -> int:
        """Rows of a matrix (ne[1]) or of one expert slice (ne[1] of ne [k, rows, experts])."""
        return self.ne[1] if len(self.ne) > 1 else 1

    @property
    def k(self) -> int:
        return self.ne[0]


@dataclass(frozen=True)
class WeightView(MatrixShape):
    """One tensor of the file. `data` views the memory map: numpy order (ne reversed); F32, F16 and integer types
    as such, every other type as bytes whose last axis holds a row's blocks. `ne` is the ggml shape (ne[0]
    fastest); `type` the ggml type id."""

    name: str
    type: int
    ne: tuple[int, ...]
    data: np.ndarray
    offset: int = -1  # where data starts in the file; -1 for an array made in memory
    path: str = ""  # the file (of a split model: the shard) holding the data

    @property
    def type_name(self) -> str:
        return block_formats.type_name(self.type)

    @cached_property
    def pointer(self):
        """A C pointer to the data, made once (the forward pass hands it to the core hundreds of times a token)."""
        return ffi.from_buffer(self.data)

    def to_f32(self) -> np.ndarray:
        """The values as float32 in numpy order; a view when stored as F32, decoded by the C core otherwise."""
        if self.type == 0:
            return self.data
        if self.type == 1:
            return self.data.astype(np.float32)
        return block_formats.dequantize(np.ascontiguousarray(self.data), self.type).reshape(tuple(reversed(self.ne)))


_SHARD_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_number(name: str) -> int | None:
    """i for a file named NAME-0000i-of-0000N.gguf (a part of a split model), else None."""
    m = _SHARD_NAME.match(name)
    return int(m["no"]) if m else None


class GGUFFile:
    """Metadata and tensor views of one GGUF model, memory-mapped read-only. A model split by llama.cpp's
    gguf-split (or gguf-py's writer) into NAME-00001-of-0000N.gguf files is opened from its first file; the
    metadata is the first file's and the tensors are those of all files."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        first = GGUFReader(self.path)
        self.metadata = first.metadata
        self._readers = {self.path: first}
        count = self.metadata.get("split.count", 1)
        if not isinstance(count, int) or not 1 <= count <= 99999:
            raise GGUFError(f"{self.path}: metadata 'split.count' is {count!r}, expected 1..99999")
        if count > 1:
            self._open_other_shards(count)
        self.tensors: dict[str, WeightView] = {}
        for shard, reader in self._readers.items():
            for t in reader.tensors:
                if t.name in self.tensors:
                    raise GGUFError(f"{shard}: tensor '{t.name}' is also in another file of the model")
                self.tensors[t.name] = WeightView(t.name, t.type, t.ne, reader.data(t), t.offset, shard)
        expected = self.metadata.get("split.tensors.count")
        if expected is not None and expected != len(self.tensors):
            raise GGUFError(f"{self.path}: split.tensors.count says {expected} tensors, the {count} files hold "
                            f"{len(self.tensors)}")

    def _open_other_shards(self, count: int) -> None:
        m = _SHARD_NAME.match(os.path.basename(self.path))
        if not m or int(m["no"]) != 1 or int(m["count"]) != count:
            raise ValueError(f"{self.path}: split.count is {count}, so this should be the first file of a split "
                             f"model, named NAME-00001-of-{count:05d}.gguf")
        folder = os.path.dirname(self.path)
        for no in range(2, count + 1):
            shard = os.path.join(folder, f"{m['stem']}-{no:05d}-of-{count:05d}.gguf")
            if not os.path.isfile(shard):
                raise FileNotFoundError(f"{shard}: missing file {no} of {count} of the split model {self.path}")
            reader = GGUFReader(shard)
            if reader.metadata.get("split.no") != no - 1:
                raise ValueError(f"{shard}: expected split.no {no - 1} as file {no} of {count}")
            self._readers[shard] = reader

    def close(self) -> None:
        """Drop the maps (each when the last view of its data goes)."""
        for reader in self._readers.values():
            reader.close()

    def keep_out(self, names: list[str]) -> None:
        """Never let the kernel read the tensors `names` through the map: faults read only their own page
        (no read-ahead that would drag neighbouring tensors into the page cache), and every other tensor is
        asked for up front, in the background, so that it is resident by the time it is used."""
        for reader in self._readers.values():
            reader.madvise(mmap.MADV_RANDOM)
        page = mmap.PAGESIZE
        for name, view in self.tensors.items():
            if name not in names and view.data.nbytes:
                start = view.offset // page * page
                self._readers[view.path].madvise(mmap.MADV_WILLNEED, start, view.offset + view.data.nbytes - start)

    def check_tensors(self) -> None:
        """Read every tensor's data and refuse the file at the first Inf or NaN among the values of a float tensor
        or the scales of a block one (llama.cpp's --check-tensors), naming the tensor, its row and the element or
        block. Reads the whole file: seconds per GB."""
        for name, view in self.tensors.items():
            raw = view.data.reshape(-1).view(np.uint8)
            at = block_formats.find_nonfinite(raw, view.type)
            if at is not None:
                per_row = view.k // block_formats.block_elems(view.type)
                row, unit = at // per_row, "element" if block_formats.block_elems(view.type) == 1 else "block"
                where = f"expert {row // view.rows}, row {row % view.rows}" if len(view.ne) == 3 else f"row {row}"
                raise GGUFError(f"{view.path}: tensor '{name}' ({view.type_name}) has a non-finite "
                                f"{'value' if unit == 'element' else 'scale'} in {where}, {unit} {at % per_row}")

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require_key(self, key: str):
        if key not in self.metadata:
            raise ValueError(f"{self.path}: missing metadata key '{key}'")
        return self.metadata[key]

    def tensor(self, name: str, ne: tuple[int, ...], use: str) -> WeightView:
        """The tensor `name`, checked against the expected ggml shape and the types its use allows."""
        view = self.tensors.get(name)
        if view is None:
            raise GGUFError(f"{self.path}: missing tensor '{name}'")
        if view.ne != tuple(ne):
            raise GGUFError(f"{self.path}: tensor '{name}' has shape (ne) {list(view.ne)}, expected {list(ne)}")
        if not _type_ok(view.type, use):
            what = {MATMUL: "a matrix type this runtime multiplies", INDEX: "an integer type"}.get(
                use, "a float or block type this runtime decodes")
            raise GGUFError(f"{self.path}: tensor '{name}' has type {view.type_name}, expected {what}")
        return view

    def load(self, name: str, ne: tuple[int, ...], use: str):
        """The tensor as the forward pass holds it: a WeightView for MATMUL and ROWS, float32 values for WHOLE
        (decoded once), int32 values for INDEX. Non-finite values in a WHOLE tensor are refused here, where the
        tensor can be named, rather than turning every logit into NaN later."""
        view = self.tensor(name, ne, use)
        if use == WHOLE:
            values = view.to_f32()
            if not np.isfinite(values).all():
                at = int(np.argmin(np.isfinite(values).reshape(-1)))
                raise GGUFError(f"{self.path}: tensor '{name}' holds a non-finite value ({values.reshape(-1)[at]}) "
                                f"at element {at}")
            return values
        if use == INDEX:
            return view.data.astype(np.int32) if view.data.dtype != np.int32 else view.data
        return view
