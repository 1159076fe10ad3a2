"""Open a GGUF model file: its metadata and its tensors as numpy views into one memory map (no copies).

The file is treated as hostile: every failure raises a ValueError (or FileNotFoundError) naming the file and,
where there is one, the tensor or key.
"""
from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

# Weight types whose matmul the C core implements (ggml type ids).
MATMUL_TYPES = tuple(
    GGMLQuantizationType[n]
    for n in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
              "IQ2_XXS", "IQ4_XS", "MXFP4")
)


@dataclass(frozen=True)
class WeightView:
    """One tensor of the file. `data` views the memory map: numpy order (ne reversed); for block-quantized and
    bf16 types its last axis is bytes. `ne` is the ggml shape (ne[0] fastest)."""

    name: str
    type: GGMLQuantizationType
    ne: tuple[int, ...]
    data: np.ndarray
    offset: int = -1  # where data starts in the file; -1 for an array made in memory
    path: str = ""  # the file (of a split model: the shard) holding the data

    @property
    def rows(self) -> int:
        """Rows of a matrix (ne[1]) or of one expert slice (ne[1] of ne [k, rows, experts])."""
        return self.ne[1] if len(self.ne) > 1 else 1

    @property
    def k(self) -> int:
        return self.ne[0]

    def to_f32(self) -> np.ndarray:
        """The values as float32 in numpy order; a view when stored as F32, a decoded copy otherwise."""
        if self.type == GGMLQuantizationType.F32:
            return self.data
        if self.type == GGMLQuantizationType.BF16:
            bits = np.ascontiguousarray(self.data).view(np.uint16).astype(np.uint32) << 16
            return bits.view(np.float32).reshape(tuple(reversed(self.ne)))
        if self.type == GGMLQuantizationType.F16:
            return self.data.astype(np.float32)
        return dequantize(self.data, self.type).reshape(tuple(reversed(self.ne))).astype(np.float32, copy=False)


def _field_value(field):
    """A metadata value as a Python scalar, str, or list."""
    if field.types[0] == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return field.parts[field.data[0]][0].item()


_SHARD_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_number(name: str) -> int | None:
    """i for a file named NAME-0000i-of-0000N.gguf (a part of a split model), else None."""
    m = _SHARD_NAME.match(name)
    return int(m["no"]) if m else None


def _open_reader(path: str) -> GGUFReader:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        return GGUFReader(path, "r")
    except Exception as exc:  # gguf-py raises bare ValueError/IndexError/KeyError on damaged headers
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt header: {exc})") from exc


class GGUFFile:
    """Metadata and tensor views of one GGUF model, memory-mapped read-only. A model split by llama.cpp's
    gguf-split (or gguf-py's writer) into NAME-00001-of-0000N.gguf files is opened from its first file; the
    metadata is the first file's and the tensors are those of all files."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        first = _open_reader(self.path)
        self.metadata = {key: _field_value(field) for key, field in first.fields.items()
                         if not key.startswith("GGUF.")}
        self._readers = {self.path: first}
        count = int(self.metadata.get("split.count", 1))
        if count > 1:
            self._open_other_shards(count)
        self.tensors: dict[str, WeightView] = {}
        for shard, reader in self._readers.items():
            size = os.path.getsize(shard)
            for t in reader.tensors:
                if t.data_offset + t.n_bytes > size:
                    raise ValueError(
                        f"{shard}: tensor '{t.name}' data runs past the end of the file "
                        f"(needs bytes up to {t.data_offset + t.n_bytes}, file has {size}): the file is truncated"
                    )
                if t.name in self.tensors:
                    raise ValueError(f"{shard}: tensor '{t.name}' is also in another file of the model")
                # a plain ndarray over the map: numpy's memmap subclass runs Python code on every slice (its
                # __getitem__ and __array_finalize__, about 440 calls per decode token of a 6-layer model)
                self.tensors[t.name] = WeightView(t.name, GGMLQuantizationType(t.tensor_type),
                                                  tuple(int(n) for n in t.shape), np.asarray(t.data),
                                                  int(t.data_offset), shard)
        expected = self.metadata.get("split.tensors.count")
        if expected is not None and int(expected) != len(self.tensors):
            raise ValueError(f"{self.path}: split.tensors.count says {expected} tensors, the {count} files hold "
                             f"{len(self.tensors)}")

    def _open_other_shards(self, count: int) -> None:
        m = _SHARD_NAME.match(os.path.basename(self.path))
        if not m or int(m["no"]) != 1 or int(m["count"]) != count:
            raise ValueError(f"{self.path}: split.count is {count}, so this should be the first file of a split "
                             f"model, named NAME-00001-of-{count:05d}.gguf")
        folder = os.path.dirname(self.path)
        for no in range(2, count + 1):
            shard = os.path.join(folder, f"{m['stem']}-{no:05d}-of-{count:05d}.gguf")
            reader = _open_reader(shard)
            got = reader.fields.get("split.no")
            if got is None or _field_value(got) != no - 1:
                raise ValueError(f"{shard}: expected split.no {no - 1} as file {no} of {count}")
            self._readers[shard] = reader

    def keep_out(self, names: list[str]) -> None:
        """Never let the kernel read the tensors `names` through the map: faults read only their own page
        (no read-ahead that would drag neighbouring tensors into the page cache), and every other tensor is
        asked for up front, in the background, so that it is resident by the time it is used."""
        for reader in self._readers.values():
            reader.data._mmap.madvise(mmap.MADV_RANDOM)
        page = mmap.PAGESIZE
        for name, view in self.tensors.items():
            if name not in names and view.data.nbytes:
                start = view.offset // page * page
                self._readers[view.path].data._mmap.madvise(mmap.MADV_WILLNEED, start,
                                                            view.offset + view.data.nbytes - start)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require_key(self, key: str):
        if key not in self.metadata:
            raise ValueError(f"{self.path}: missing metadata key '{key}'")
        return self.metadata[key]

    def tensor(self, name: str, ne: tuple[int, ...], types: tuple[GGMLQuantizationType, ...]) -> WeightView:
        """The tensor `name`, checked against the expected ggml shape and the accepted types."""
        view = self.tensors.get(name)
        if view is None:
            raise ValueError(f"{self.path}: missing tensor '{name}'")
        if view.ne != tuple(ne):
            raise ValueError(f"{self.path}: tensor '{name}' has shape (ne) {list(view.ne)}, expected {list(ne)}")
        if view.type not in types:
            raise ValueError(
                f"{self.path}: tensor '{name}' has type {view.type.name}, expected one of "
                f"{', '.join(t.name for t in types)}"
            )
        if len(ne) > 1 and view.k % GGML_QUANT_SIZES[view.type][0]:
            raise ValueError(f"{self.path}: tensor '{name}' row length {view.k} is not a multiple of the "
                             f"{view.type.name} block")
        return view
