"""Read a folder of safetensors shards through memory maps, validating every header first.

safetensors' own loader has no numpy dtype for F8_E4M3 / F8_E8M0, so the header is parsed here: an 8-byte
little-endian length, a JSON object of {name: {dtype, shape, data_offsets}}, then the data. Every failure raises
`CheckpointError` naming the file and, where there is one, the tensor.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# safetensors dtype -> (numpy storage dtype, bytes per element). FP8 and BF16 are kept as raw bits.
DTYPES = {
    "F64": (np.float64, 8), "F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2),
    "F8_E4M3": (np.uint8, 1), "F8_E5M2": (np.uint8, 1), "F8_E8M0": (np.uint8, 1),
    "I64": (np.int64, 8), "I32": (np.int32, 4), "I16": (np.int16, 2), "I8": (np.int8, 1), "U8": (np.uint8, 1),
    "BOOL": (np.bool_, 1),
}
MAX_HEADER_BYTES = 100 << 20  # the release's largest header is a few hundred KB
PAGE = mmap.PAGESIZE


class CheckpointError(ValueError):
    """A checkpoint folder, shard or tensor that cannot be read as described."""


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of one shard: its header entry, and a zero-copy view of its bytes on demand."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: "Shard"
    start: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def file(self) -> str:
        return self.shard.path

    def array(self) -> np.ndarray:
        """The stored values as a read-only numpy view of the memory map (BF16/FP8 as raw unsigned bits)."""
        np_dtype, _ = DTYPES[self.dtype]
        flat = np.frombuffer(self.shard.map(), dtype=np_dtype, count=math.prod(self.shape), offset=self.start)
        return flat.reshape(self.shape)

    def release(self, offset: int = 0, nbytes: int | None = None) -> None:
        """Drop this tensor's pages (or those of bytes offset:offset+nbytes) from the process; they stay in the
        page cache and fault back in if read again, so RSS stays bounded."""
        self.shard.release(self.start + offset, self.nbytes - offset if nbytes is None else nbytes)


class Shard:
    """One .safetensors file: its validated header, and a lazily opened read-only memory map."""

    def __init__(self, path: str | os.PathLike, header: bytes | None = None, size: int | None = None):
        """Read the header of the file at `path`; or, for a shard not on disk yet (being downloaded), take the
        file's first bytes `header` (the length and the JSON, as fetched by a ranged request) and its `size`: the
        file is then opened only when its data is first read, and must start with those bytes."""
        self.path = os.fspath(path)
        self._file = None
        self._map = None
        self._lock = threading.Lock()
        if header is not None:
            if size is None:
                raise ValueError("Shard: a header without the file's size")
            self.header_bytes = bytes(header)
            self._parse(self.header_bytes, size)
            return
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as fh:
                prefix = fh.read(8)
                if len(prefix) == 8:
                    header_len = int.from_bytes(prefix, "little")
                    if header_len <= MAX_HEADER_BYTES:
                        prefix += fh.read(header_len)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read safetensors file: {exc.strerror or exc}") from exc
        self.header_bytes = prefix
        self._parse(prefix, size)

    @staticmethod
    def header_length(prefix: bytes) -> int:
        """The bytes of the length and the JSON header, from the file's first 8 bytes."""
        return 8 + int.from_bytes(prefix[:8], "little")

    def _parse(self, prefix: bytes, size: int) -> None:
        if len(prefix) < 8:
            raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header length)")
        header_len = int.from_bytes(prefix[:8], "little")
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size or len(prefix) != 8 + header_len:
            raise CheckpointError(f"{self.path}: truncated or corrupt safetensors file: header length "
                                  f"{header_len} does not fit in the file's {size} bytes")
        raw = prefix[8:]
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not JSON: {exc})") from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.size = size
        self.data_start = 8 + header_len
        self.tensors: dict[str, SourceTensor] = {}
        for name, entry in header.items():
            if name != "__metadata__":
                self.tensors[name] = self._entry(name, entry)

    def _entry(self, name: str, entry) -> SourceTensor:
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{where}: header entry lacks dtype, shape or data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: bad data_offsets {offsets!r}")
        nbytes = offsets[1] - offsets[0]
        expected = math.prod(shape) * DTYPES[dtype][1]
        if nbytes != expected:
            raise CheckpointError(f"{where}: data_offsets span {nbytes} bytes, but {dtype} {shape} needs {expected}")
        end = self.data_start + offsets[1]
        if end > self.size:
            raise CheckpointError(f"{where}: data ends at byte {end}, past the end of the file ({self.size} bytes): "
                                  "the file is truncated")
        return SourceTensor(name, dtype, tuple(shape), self, self.data_start + offsets[0], nbytes)

    def map(self) -> mmap.mmap:
        # The quantizer's worker threads ask at once: without the lock each opened the file, and one closed the
        # file object another was still reading the descriptor of (EBADF).
        with self._lock:
            if self._map is None:
                self._file = open(self.path, "rb")
                if os.fstat(self._file.fileno()).st_size != self.size:
                    raise CheckpointError(f"{self.path}: file changed size while being read")
                self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            return self._map

    def release(self, start: int, nbytes: int) -> None:
        if self._map is None or nbytes == 0:
            return
        first = start - start % PAGE
        self._map.madvise(mmap.MADV_DONTNEED, first, start + nbytes - first)

    def release_all(self) -> None:
        """Drop every mapped page of the file. Needed besides per-tensor releases: the kernel's fault-around maps
        already released neighbours back in when a nearby page faults."""
        self.release(0, self.size)

    def close(self) -> None:
        """Unmap; views handed out by `SourceTensor.array` must be gone by then."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still alive somewhere: the map goes when it does
                pass
            self._file.close()
            self._map = self._file = None


class Checkpoint:
    """Every tensor of a folder's shards by name: from model.safetensors.index.json when present, else *.safetensors."""

    def __init__(self, folder: str | os.PathLike, shards: dict[str, Shard] | None = None):
        """`shards` (file name -> Shard), when given, are the folder's shards, which need not be on disk yet
        (flashlite pull plans from headers fetched ahead of the data); the index, if any, must list exactly
        them."""
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a directory")
        index_path = self.folder / "model.safetensors.index.json"
        if index_path.is_file():
            files, weight_map = self._read_index(index_path)
        else:
            files = sorted(shards) if shards is not None else sorted(p.name for p in self.folder.glob("*.safetensors"))
            weight_map = None
            if not files:
                raise CheckpointError(f"{self.folder}: no *.safetensors files and no model.safetensors.index.json")
        self.shards = {}
        for fname in files:
            path = self.folder / fname
            if shards is not None:
                if fname not in shards:
                    raise CheckpointError(f"{path}: shard listed in {index_path.name} is missing")
                self.shards[fname] = shards[fname]
                continue
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in {index_path.name} is missing")
            self.shards[fname] = Shard(path)
        self.tensors: dict[str, SourceTensor] = {}
        for fname, shard in self.shards.items():
            for name, tensor in shard.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"{shard.path}: tensor '{name}' also appears in {self.tensors[name].file}")
                if weight_map is not None and weight_map.get(name) != fname:
                    raise CheckpointError(f"{shard.path}: tensor '{name}' is not listed for this shard in "
                                          f"{index_path} (the index says {weight_map.get(name)!r})")
                self.tensors[name] = tensor
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in self.tensors:
                    raise CheckpointError(f"{self.folder / fname}: tensor '{name}' listed in {index_path.name} "
                                          "is not in the shard")

    @staticmethod
    def _read_index(path: Path) -> tuple[list[str], dict[str, str]]:
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: unreadable index ({exc})") from exc
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{path}: no weight_map of tensor name -> shard file")
        if any(os.path.basename(v) != v for v in weight_map.values()):
            raise CheckpointError(f"{path}: weight_map names a shard outside the folder")
        return sorted(set(weight_map.values())), weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> SourceTensor:
        return self.tensors[name]

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()
