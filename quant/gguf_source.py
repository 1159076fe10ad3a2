"""A deepseek4 GGUF as the source of `flashlite quantize` (requantization, as llama.cpp's `llama-quantize` does):
every tensor keeps its name, shape and place; the ones the recipe gives another type are decoded to float32 by the
C core and encoded again, the others are copied byte for byte."""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
from gguf import GGUFValueType

from flashlite import block_formats
from flashlite.gguf_file import GGUFFile, WeightView
from quant.layout import EXPERT, HC, INDEX, MATRIX, PINNED, ROUTER, GGUFTensor, Layout
from quant.safetensors_source import CheckpointError

ARCH = "deepseek4"
# keys the writer sets itself, or that describe the source file rather than the model
_DROPPED = ("general.architecture", "general.type", "general.name", "general.file_type", "general.alignment",
            "general.quantization_version", "split.no", "split.count", "split.tensors.count")


@dataclass
class GGUFStored:
    """One tensor of the source file, read through its memory map."""

    view: WeightView
    n_expert: int
    reader: object

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (ne reversed)"""
        return tuple(reversed(self.view.ne))

    @property
    def format(self) -> str:
        return block_formats.type_name(self.view.type)

    @property
    def source_type(self) -> int:
        return self.view.type

    def where(self) -> str:
        return f"{self.view.path}: tensor '{self.view.name}'"

    def _rows(self) -> np.ndarray:
        data = self.view.data
        return data.reshape(-1, data.shape[-1]) if data.ndim != 2 else data

    def f32_rows(self, r0: int, r1: int) -> np.ndarray:
        """float32 values of rows r0:r1 (of the flattened leading dims), decoded exactly."""
        rows = self._rows()[r0:r1]
        if self.view.type == 0:
            return rows
        if self.view.type == 1:
            return rows.astype(np.float32)
        if not block_formats.type_sizes(self.view.type) or not block_formats.can_dequantize(self.view.type):
            raise CheckpointError(f"{self.where()} has type {self.format}, which cannot be decoded to requantize")
        return block_formats.dequantize(np.ascontiguousarray(rows), self.view.type)

    def encoded_rows(self, r0: int, r1: int, qtype: int) -> np.ndarray | None:
        """Rows r0:r1 as stored, when they already are `qtype` (llama.cpp copies such tensors unchanged)."""
        if qtype != self.view.type:
            return None
        return np.ascontiguousarray(self._rows()[r0:r1]).view(np.uint8).reshape(r1 - r0, -1)

    def index_values(self) -> np.ndarray:
        values = self.view.data
        if values.dtype.kind != "i":
            raise CheckpointError(f"{self.where()} has type {self.format}, expected an integer type")
        bad = (values < 0) | (values >= self.n_expert)
        if bad.any():
            raise CheckpointError(f"{self.where()} holds expert id {int(values[bad][0])} outside "
                                  f"0..{self.n_expert - 1}")
        return values.astype(np.int32)

    def release_rows(self, r0: int, r1: int) -> None:
        """Drop the pages of rows r0:r1 from the process (they stay in the page cache)."""
        row = self._rows().strides[0]
        start = self.view.offset + r0 * row
        first = start - start % mmap.PAGESIZE
        self.reader.madvise(mmap.MADV_DONTNEED, first, start + (r1 - r0) * row - first)

    def shards(self) -> set:
        return set()  # release_rows already dropped every page read


def _role(name: str, shape: tuple[int, ...]) -> str:
    if name.endswith("ffn_gate_tid2eid.weight"):
        return INDEX
    if "_exps." in name and len(shape) == 3:
        return EXPERT
    if len([n for n in shape if n != 1]) < 2 or name.endswith("_ape.weight"):
        return PINNED
    if "ffn_gate_inp." in name:
        return ROUTER
    if name.endswith("_fn.weight") and "hc_" in name:
        return HC
    return MATRIX


@dataclass
class GGUFPlan:
    layout: Layout
    metadata: list[tuple[str, object, GGUFValueType]]
    block_count: int
    n_expert: int
    n_layers: int
    file: GGUFFile


def read_gguf_source(path: str | os.PathLike) -> GGUFPlan:
    """The tensors and metadata of a deepseek4 GGUF (split models from their first file)."""
    f = GGUFFile(path)
    arch = f.get("general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{f.path}: general.architecture is {arch!r}; flashlite quantizes {ARCH!r} models")
    for key in (f"{ARCH}.block_count", f"{ARCH}.expert_count"):
        if not isinstance(f.get(key), int):
            raise CheckpointError(f"{f.path}: metadata '{key}' is missing or not an integer")
    n_expert = f.metadata[f"{ARCH}.expert_count"]
    block_count = f.metadata[f"{ARCH}.block_count"]
    readers = f._readers
    tensors = []
    for name, view in f.tensors.items():
        shape = tuple(reversed(view.ne))
        tensors.append(GGUFTensor(name, shape, _role(name, shape), [GGUFStored(view, n_expert, readers[view.path])]))
    metadata = []
    for reader in list(readers.values())[:1]:
        for key, value in reader.metadata.items():
            if key in _DROPPED:
                continue
            vtype, sub = reader.value_types[key]
            metadata.append((key, value, GGUFValueType(sub if vtype == 9 else vtype)))
    n_layers = block_count - int(f.get(f"{ARCH}.nextn_predict_layers", 0) or 0)
    return GGUFPlan(Layout(tensors, "gguf", []), metadata, block_count, n_expert, n_layers, f)
