"""A GGUF file's header, metadata and tensor table, read as hostile input.

Every count, length, dimension, type and offset is checked against the file before anything is allocated or read,
following llama.cpp's gguf.cpp: strings and arrays no longer than the bytes left, no nested arrays, no empty or
repeated keys, a power-of-two `general.alignment` of type u32, tensor names shorter than 64 bytes and unique, at
most 4 dimensions whose element count fits in int64, a type of ggml's table whose block divides the rows, and
tensor data laid out in table order, each at the aligned end of the one before, inside the file. Nothing here
loops or allocates more than the file's size allows, so no input can hang it or exhaust memory. Every error is a
GGUFError naming the file, and the key or tensor and the byte offset where the fault lies.

Type sizes come from the C core's table (flashlite.block_formats), so a type the core knows is readable even where the
gguf package's enum lacks it (Q2_0).
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass

import numpy as np

from flashlite import block_formats

MAGIC = b"GGUF"
MAX_DIMS = 4
MAX_NAME = 64  # ggml's GGML_MAX_NAME, terminator included
MAX_STRING = 1 << 30  # gguf.cpp's GGUF_MAX_STRING_LENGTH
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: id -> (name, struct format); 8 string and 9 array are read apart
VALUE_TYPES = {0: ("u8", "<B"), 1: ("i8", "<b"), 2: ("u16", "<H"), 3: ("i16", "<h"), 4: ("u32", "<I"),
               5: ("i32", "<i"), 6: ("f32", "<f"), 7: ("bool", "<?"), 8: ("str", None), 9: ("array", None),
               10: ("u64", "<Q"), 11: ("i64", "<q"), 12: ("f64", "<d")}
STRING, ARRAY = 8, 9
# numpy dtypes of the tensor types held as plain arrays; every other type is a byte array of whole blocks
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


class GGUFError(ValueError):
    """A GGUF file that cannot be read as it is: the message names the file, the field and the offset."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    type: int            # ggml type id
    offset: int          # absolute offset of the data in the file
    nbytes: int


class _Cursor:
    """Reads little-endian fields from a buffer, never past its end."""

    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos, self.end = buf, path, 0, len(buf)

    def fail(self, what: str, at: int | None = None) -> GGUFError:
        return GGUFError(f"{self.path}: {what} (at byte {self.pos if at is None else at})")

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise self.fail(f"{what} needs {n} bytes, the file has {self.end - self.pos} left: truncated or corrupt")

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"{what} (length)")
        if n > MAX_STRING:
            raise self.fail(f"{what}: length {n} exceeds the maximum {MAX_STRING}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", "replace")

    def array(self, what: str):
        start = self.pos
        vtype = self.scalar("<I", f"{what} (element type)")
        count = self.scalar("<Q", f"{what} (count)")
        if vtype == ARRAY:
            raise self.fail(f"{what}: arrays of arrays are not supported", start)
        if vtype not in VALUE_TYPES:
            raise self.fail(f"{what}: invalid element type {vtype}", start)
        if vtype == STRING:
            if count > (self.end - self.pos) // 8:  # every string takes at least its 8-byte length
                raise self.fail(f"{what}: {count} strings cannot fit in the {self.end - self.pos} bytes left", start)
            return [self.string(f"{what}[{i}]") for i in range(count)], vtype
        fmt = VALUE_TYPES[vtype][1]
        size = struct.calcsize(fmt)
        if count > (self.end - self.pos) // size:
            raise self.fail(f"{what}: {count} elements of {size} bytes cannot fit in the {self.end - self.pos} "
                            f"bytes left", start)
        values = np.frombuffer(self.buf, np.dtype(fmt), count, self.pos)
        self.pos += count * size
        return values.tolist(), vtype


class GGUFReader:
    """The parsed file: `metadata` (key -> int, float, bool, str or list), `value_types` (key -> (type, element
    type of an array or None)), `tensors` (TensorInfo in file order) and `data(info)`, a read-only numpy view of
    a tensor's bytes in the memory map. Close it (or use it as a context manager) to drop the map."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: no such model file") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise GGUFError(f"{self.path}: is a directory or device, not a GGUF file")
            size = st.st_size
            if size < 24:
                raise GGUFError(f"{self.path}: {size} bytes is too short for a GGUF header (24 bytes)")
            self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        try:
            self._parse(size)
        except BaseException:
            self._map.close()
            raise

    def _parse(self, size: int) -> None:
        c = _Cursor(self._map, self.path)
        magic = bytes(self._map[:4])
        if magic != MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
        c.pos = 4
        self.version = c.scalar("<I", "version")
        if self.version & 0xFFFF == 0 and self.version:
            raise GGUFError(f"{self.path}: version {self.version:#x} looks byte-swapped: a big-endian GGUF, which "
                            "this little-endian runtime does not read")
        if self.version == 1:
            raise GGUFError(f"{self.path}: GGUF version 1 is no longer supported (re-convert the model)")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: unsupported GGUF version {self.version} (2 and 3 are read)")
        n_tensors = c.scalar("<q", "tensor count")
        n_kv = c.scalar("<q", "metadata count")
        # the smallest key-value pair is 13 bytes (empty key is refused anyway), the smallest tensor info 24
        if not 0 <= n_kv <= (size - c.pos) // 13:
            raise c.fail(f"metadata count {n_kv} cannot fit in the file", 16)
        if not 0 <= n_tensors <= (size - c.pos) // 24:
            raise c.fail(f"tensor count {n_tensors} cannot fit in the file", 8)
        self.metadata: dict[str, object] = {}
        self.value_types: dict[str, tuple[int, int | None]] = {}
        for i in range(n_kv):
            at = c.pos
            key = c.string(f"metadata key {i}")
            if not key:
                raise c.fail(f"metadata key {i} is empty", at)
            if key in self.metadata:
                raise c.fail(f"metadata key '{key}' appears twice", at)
            vtype = c.scalar("<I", f"metadata '{key}' (type)")
            if vtype == STRING:
                value, sub = c.string(f"metadata '{key}'"), None
            elif vtype == ARRAY:
                value, sub = c.array(f"metadata '{key}'")
            elif vtype in VALUE_TYPES:
                value, sub = c.scalar(VALUE_TYPES[vtype][1], f"metadata '{key}'"), None
            else:
                raise c.fail(f"metadata '{key}' has invalid type {vtype}", at)
            self.metadata[key] = value
            self.value_types[key] = (vtype, sub)
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if "general.alignment" in self.metadata and self.value_types["general.alignment"][0] != 4:
            raise GGUFError(f"{self.path}: metadata 'general.alignment' must be a u32")
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{self.path}: metadata 'general.alignment' is {alignment}, not a power of two")
        self.alignment = alignment
        infos = []
        seen = set()
        for i in range(n_tensors):
            at = c.pos
            name = c.string(f"tensor {i} name")
            if len(name.encode()) >= MAX_NAME:
                raise c.fail(f"tensor {i} name '{name[:80]}' is {len(name.encode())} bytes, the limit is "
                             f"{MAX_NAME - 1}", at)
            if name in seen:
                raise c.fail(f"tensor '{name}' appears twice", at)
            seen.add(name)
            n_dims = c.scalar("<I", f"tensor '{name}' (dimensions)")
            if n_dims > MAX_DIMS:
                raise c.fail(f"tensor '{name}' has {n_dims} dimensions, at most {MAX_DIMS} are allowed", at)
            ne = tuple(c.scalar("<q", f"tensor '{name}' (shape)") for _ in range(n_dims))
            elements = 1
            for n in ne:
                if n < 0:
                    raise c.fail(f"tensor '{name}' has a negative dimension {list(ne)}", at)
                elements *= n
            if elements >= 1 << 63:
                raise c.fail(f"tensor '{name}' shape {list(ne)} has more than 2^63 elements", at)
            type_id = c.scalar("<I", f"tensor '{name}' (type)")
            sizes = block_formats.type_sizes(type_id)
            if sizes is None:
                raise c.fail(f"tensor '{name}' has type {type_id}, which is no ggml type this runtime knows", at)
            row = ne[0] if ne else 1
            if row % sizes[0]:
                raise c.fail(f"tensor '{name}' rows of {row} elements are not whole {block_formats.type_name(type_id)} "
                             f"blocks of {sizes[0]}", at)
            offset = c.scalar("<Q", f"tensor '{name}' (offset)")
            infos.append((name, ne, type_id, offset, elements // sizes[0] * sizes[1]))
        data_start = -(-c.pos // alignment) * alignment
        self.data_offset = data_start
        self.tensors: list[TensorInfo] = []
        expected = 0
        for name, ne, type_id, offset, nbytes in infos:
            if offset != expected:
                raise GGUFError(f"{self.path}: tensor '{name}' data starts at offset {offset} of the data section, "
                                f"expected {expected} (tensors must follow each other in table order, each "
                                f"aligned to {alignment} bytes: a misaligned, overlapping or out-of-order table)")
            if data_start + offset + nbytes > size:
                raise GGUFError(f"{self.path}: tensor '{name}' data runs past the end of the file (needs bytes "
                                f"up to {data_start + offset + nbytes}, file has {size}): the file is truncated")
            self.tensors.append(TensorInfo(name, ne, type_id, data_start + offset, nbytes))
            expected += -(-nbytes // alignment) * alignment

    def data(self, info: TensorInfo) -> np.ndarray:
        """The tensor's data as a read-only view: numpy order (ne reversed); float32, float16 and the integer
        types as such, every other type as bytes whose last axis holds a row's blocks."""
        shape = tuple(reversed(info.ne)) or (1,)
        plain = _PLAIN.get(info.type)
        if plain is not None:
            return np.frombuffer(self._map, plain, info.nbytes // np.dtype(plain).itemsize,
                                 info.offset).reshape(shape)
        elems, size = block_formats.type_sizes(info.type)
        row_bytes = (info.ne[0] if info.ne else 1) // elems * size
        return np.frombuffer(self._map, np.uint8, info.nbytes, info.offset).reshape(*shape[:-1], row_bytes)

    def madvise(self, advice: int, start: int = 0, length: int = 0) -> None:
        self._map.madvise(advice, start, length)

    def close(self) -> None:
        """Drop the map now, or when the last view of its data goes, if views are still held."""
        try:
            self._map.close()
        except BufferError:
            pass

    def __enter__(self) -> "GGUFReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
