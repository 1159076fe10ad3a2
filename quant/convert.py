"""Stream a DeepSeek V4 safetensors checkpoint, or a deepseek4 GGUF (requantization), into a deepseek4 GGUF file.

Two passes: first every tensor's name, shape, type and size is planned from the shard headers and config.json
(or the GGUF's header) alone, nothing is read, so every mismatch is found before a byte is written; then gguf-py's
GGUFWriter writes the header, metadata and tensor infos, and the tensor data follows one slab of rows at a time,
decoded from the memory-mapped source whose pages are dropped after each slab. Peak memory is a few slabs,
whatever the model's size. The output is built in a hidden temporary file next to OUT and renamed over it at the
very end. With an importance matrix (`imatrix`) each slab is quantized with its tensor's (its expert's) weights.
"""
from __future__ import annotations

import math
import os
import sys
import time
import functools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from gguf import GGUFValueType, GGUFWriter

from flashlite import block_formats
from flashlite.atomic import partial_file, remove_stale_partials
from flashlite.gguf_file import shard_number
from quant.gguf_meta import ARCH, DSPARK_ARCH, hparam_kv, read_dspark, read_hparams
from quant.gguf_source import read_gguf_source
from quant.imatrix import Imatrix
from quant.layout import INDEX, GGUFTensor, Stored, check_index, plan_tensors
from quant.recipes import NEEDS_IMPORTANCE, LlamaMix, Recipe
from quant.tokenizer_meta import tokenizer_kv
from quant.safetensors_source import Checkpoint, CheckpointError

SLAB_BYTES = 32 << 20  # float32 bytes decoded at a time, per worker


@dataclass
class Planned:
    tensor: GGUFTensor
    qtype: int
    nbytes: int
    importance: np.ndarray | None = None  # the imatrix's weights, experts one after another
    energy: bool = False                  # no imatrix for a type that needs one: weigh columns by sum of w^2


def tensor_nbytes(shape: tuple[int, ...], qtype: int) -> int:
    elems, size = block_formats.type_sizes(qtype)
    return math.prod(shape[:-1]) * (shape[-1] // elems) * size


@dataclass
class Summary:
    out: Path
    n_tensors: int
    nbytes: int
    seconds: float
    notes: list[str]


class Progress:
    """Tensors done, bytes written, rate and ETA on one stderr line (a line every few seconds when not a tty)."""

    def __init__(self, n_tensors: int, total_bytes: int, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.n, self.total = n_tensors, total_bytes
        self.start = self.last = time.perf_counter()
        self.done_tensors = self.done_bytes = 0

    def update(self, name: str, nbytes: int, tensor_done: bool = False) -> None:
        self.done_bytes += nbytes
        self.done_tensors += tensor_done
        now = time.perf_counter()
        if not self.enabled or now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        self._draw(name, now)

    def _draw(self, name: str, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done_bytes / elapsed
        eta = (self.total - self.done_bytes) / rate if rate else float("inf")
        width = 24
        filled = int(width * self.done_bytes / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done_tensors}/{self.n} tensors  "
                f"{self.done_bytes / 1e9:.2f}/{self.total / 1e9:.2f} GB  {rate / 1e6:.0f} MB/s  "
                f"ETA {_clock(eta)}  {name}")
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 160 + "\r")
            self.stream.flush()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def _encode(values: np.ndarray, qtype: int, importance: np.ndarray | None) -> np.ndarray:
    if qtype == 0:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == 1:
        return values.astype(np.float16)
    return block_formats.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype, importance)


def _column_energy(part, r0: int, r1: int) -> np.ndarray:
    """sum of w^2 over rows r0:r1, per column: ds4's stand-in for an importance matrix."""
    total = None
    step = max(1, (SLAB_BYTES // 4) // part.shape[-1])
    for a in range(r0, r1, step):
        sq = np.square(part.f32_rows(a, min(r1, a + step)), dtype=np.float64).sum(axis=0)
        total = sq if total is None else total + sq
    return total.astype(np.float32)


def _encode_slab(p: Planned, part, expert: int, r0: int, r1: int) -> np.ndarray:
    """The output bytes of rows r0:r1 of one stored tensor (of expert `expert` of a stacked one); runs on a worker
    thread."""
    data = part.encoded_rows(r0, r1, p.qtype)
    if data is None:
        values = part.f32_rows(r0, r1)
        if not np.isfinite(values).all():
            bad = np.argwhere(~np.isfinite(values))[0]
            raise CheckpointError(f"{part.where()} holds a non-finite value at row {r0 + bad[0]}, column {bad[1]}")
        k = part.shape[-1]
        importance = None
        if p.importance is not None:
            importance = p.importance[expert * k:(expert + 1) * k]
        elif p.energy:
            lo, n = _expert_rows(part, expert)
            importance = _column_energy(part, lo, lo + n)
        data = _encode(values, p.qtype, importance)
    part.release_rows(r0, r1)
    return data


def _expert_rows(part, expert: int) -> tuple[int, int]:
    """(first row, rows) of one expert of a part: a stacked GGUF part holds every expert, a checkpoint part one."""
    rows = math.prod(part.shape[:-1])
    if len(part.shape) == 3:
        per = rows // part.shape[0]
        return expert * per, per
    return 0, rows


def _slabs(p: Planned, h, slab_bytes: int) -> Iterator[Callable[[], np.ndarray]]:
    """Tasks that make the tensor's bytes, in order, one slab of rows each; a slab never spans two experts, whose
    importance weights differ."""
    for i in range(len(p.tensor.parts)):
        for _, task in part_slabs(p, i, h, slab_bytes):
            yield task


def part_slabs(p: Planned, i: int, h, slab_bytes: int = SLAB_BYTES
               ) -> Iterator[tuple[int, Callable[[], np.ndarray]]]:
    """(offset in the tensor's data, task) for the slabs of part i of the tensor, in order: the bytes of one part
    can be made and placed without the others (flashlite pull writes each part when its shard has landed)."""
    t = p.tensor
    if t.role == INDEX:
        part = t.parts[0]
        yield 0, functools.partial(check_index, part, h) if isinstance(part, Stored) else part.index_values
        return
    row_bytes = tensor_nbytes((1, t.shape[-1]), p.qtype)
    base = sum(math.prod(q.shape[:-1]) for q in t.parts[:i]) * row_bytes
    part = t.parts[i]
    step = max(1, slab_bytes // (4 * part.shape[-1]))
    n_experts = part.shape[0] if len(part.shape) == 3 else 1
    for e in range(n_experts):
        lo, n = _expert_rows(part, e)
        for r0 in range(lo, lo + n, step):
            yield base + r0 * row_bytes, functools.partial(_encode_slab, p, part, i if len(t.parts) > 1 else e, r0,
                                                           min(lo + n, r0 + step))


def _pipeline(planned: list[Planned], h, slab_bytes: int, workers: int
              ) -> Iterator[tuple[Planned, np.ndarray | None]]:
    """(tensor, bytes) in file order, computed `workers` slabs ahead on threads (numpy and the C core release
    the GIL); (tensor, None) closes each tensor. At most workers + 1 slabs are alive at a time."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="quantize")
    pending: deque = deque()
    try:
        for p in planned:
            for task in _slabs(p, h, slab_bytes):
                pending.append((p, pool.submit(task)))
                while len(pending) > workers:
                    q, future = pending.popleft()
                    yield q, future.result() if future else None
            pending.append((p, None))
        while pending:
            q, future = pending.popleft()
            yield q, future.result() if future else None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class Plan:
    hparams: object                # quant.gguf_meta.Hparams of a checkpoint, None for a GGUF source
    source: object                 # the Checkpoint or GGUFFile to close at the end
    tensors: list[Planned]
    metadata: list[tuple[str, object, GGUFValueType]]  # every key but general.*; list values give the element type
    notes: list[str]
    style: str
    n_layers: int
    n_expert: int
    kv_overrides: list[tuple[str, object, GGUFValueType]] = field(default_factory=list)  # --override-kv
    arch: str = ARCH  # general.architecture: deepseek4, or dflash for a DSpark draft


def plan(src: str | os.PathLike, recipe: Recipe, imatrix: Imatrix | None = None,
         checkpoint: Checkpoint | None = None, mtp: bool = False, dspark: bool = False,
         allow_requantize: bool = False, kv_overrides=()) -> Plan:
    """Everything about the output but its data: validates config, tokenizer, shards (or the GGUF), names, dtypes
    and shapes, and the importance matrix against the tensors it weighs. `checkpoint`, when given, is the folder's
    shards (their headers, the data possibly still to come) instead of those on disk. mtp: the checkpoint's MTP
    draft GGUF (quant.layout) instead of the model; dspark: its DSpark draft (llama.cpp's dflash layout). A GGUF's quantized tensors are requantized only with
    `allow_requantize` (llama-quantize's --allow-requantize). kv_overrides: (key, value, GGUFValueType) entries
    that replace or join the metadata (quant.gguf_meta.parse_kv_override)."""
    src = Path(src)
    arch = DSPARK_ARCH if dspark else ARCH
    if src.is_file() and checkpoint is None:
        if mtp or dspark:
            raise CheckpointError(f"{src}: a draft is written from a checkpoint folder (a GGUF to requantize "
                                  "is taken as it is, draft or not)")
        g = read_gguf_source(src)
        h, source, layout, metadata = None, g.file, g.layout, g.metadata
        block_count, n_layers, n_expert = g.block_count, g.n_layers, g.n_expert
    elif src.is_dir():
        h = read_hparams(src)
        if not (src / "tokenizer.json").is_file():
            raise CheckpointError(f"{src / 'tokenizer.json'}: missing (the GGUF embeds the tokenizer)")
        draft = read_dspark(src, h) if dspark else None
        metadata = hparam_kv(h, mtp, draft) + tokenizer_kv(src, h.vocab_size)
        source = Checkpoint(src) if checkpoint is None else checkpoint
        try:
            layout = plan_tensors(source, h, mtp, draft)
        except BaseException:
            source.close()
            raise
        block_count, n_layers, n_expert = h.n_layers + (1 if mtp else 0), h.n_layers, h.n_routed_experts
        if draft is not None:
            block_count = n_layers = draft.stages
    else:
        raise CheckpointError(f"{src}: no such checkpoint folder or GGUF file")
    try:
        if isinstance(recipe, LlamaMix):
            recipe.has_imatrix, recipe.n_expert = imatrix is not None, n_expert
        types, notes = recipe.assign(layout.tensors, block_count)
        planned = [Planned(t, types[t.name], tensor_nbytes(t.shape, types[t.name])) for t in layout.tensors]
        if h is None:
            _check_requantize(src, planned, allow_requantize, notes)
        _plan_importance(planned, imatrix, notes)
    except BaseException:
        source.close()
        raise
    if layout.skipped and dspark:
        notes.append(f"DSpark draft: left out the model's own {len(layout.skipped)} tensor(s), e.g. "
                     f"{layout.skipped[0]}")
    elif layout.skipped and mtp:
        notes.append(f"MTP draft: left out the model's own {len(layout.skipped)} tensor(s) (the draft holds the "
                     f"embedding, head, final norm and the MTP block), e.g. {layout.skipped[0]}")
    elif layout.skipped:
        notes.append(f"left out {len(layout.skipped)} tensor(s) llama.cpp's deepseek4 does not load "
                     f"(MTP, hash layers' gate bias), e.g. {layout.skipped[0]}")
    lossy = [p.tensor.name for p in planned if p.qtype == block_formats.type_id("MXFP4")
             and any(part.source_type != p.qtype for part in p.tensor.parts)]
    if lossy:
        notes.append(f"{len(lossy)} MXFP4 tensor(s) are quantized, not repacked (their source is not FP4): "
                     f"{lossy[0]}")
    return Plan(h, source, planned, metadata, notes, layout.style, n_layers, n_expert, list(kv_overrides), arch)


def _is_quantized(qtype: int) -> bool:
    """ggml_is_quantized: a block type (not F32, F16, BF16 or an integer type)."""
    sizes = block_formats.type_sizes(qtype)
    return sizes is not None and sizes[0] > 1


def _check_requantize(src: Path, planned: list[Planned], allow: bool, notes: list[str]) -> None:
    """llama-quantize refuses to convert an already quantized tensor (decode and quantize again loses more than
    quantizing the original) unless allowed; copying it as it is, is no requantization."""
    again = [(p, part.source_type) for p in planned if p.tensor.role != INDEX for part in p.tensor.parts[:1]
             if part.source_type != p.qtype and _is_quantized(part.source_type)]
    if not again:
        return
    p, was = again[0]
    if not allow:
        raise ValueError(f"{src}: tensor '{p.tensor.name}' is {block_formats.type_name(was)} already: requantizing it "
                         f"to {block_formats.type_name(p.qtype)} compounds two roundings (as llama-quantize, this "
                         f"takes --allow-requantize; {len(again)} tensor(s) would be)")
    notes.append(f"{len(again)} already quantized tensor(s) are requantized, e.g. {p.tensor.name} "
                 f"{block_formats.type_name(was)} -> {block_formats.type_name(p.qtype)}")


def plan_lines(p: Plan) -> list[str]:
    """llama-quantize --dry-run's report: each tensor's shape, source type, new type and size, then the totals
    (MiB and bits per weight) before and after."""
    lines, before, after, elements = [], 0, 0, 0
    width = max(len(t.tensor.name) for t in p.tensors)
    shapes = ["[" + ", ".join(str(d) for d in reversed(t.tensor.shape)) + "]" for t in p.tensors]
    shape_width = max(map(len, shapes))
    for i, (t, shape) in enumerate(zip(p.tensors, shapes)):
        src_type = t.tensor.source_type
        src_bytes = (tensor_nbytes(t.tensor.shape, src_type) if block_formats.type_sizes(src_type) else t.nbytes)
        n = math.prod(t.tensor.shape)
        before, after, elements = before + src_bytes, after + t.nbytes, elements + n
        lines.append(f"[{i + 1:4d}/{len(p.tensors):4d}] {t.tensor.name:<{width}} {shape:<{shape_width}} "
                     f"{block_formats.type_name(src_type):>7} -> {block_formats.type_name(t.qtype):<7} "
                     f"{src_bytes / 2**20:10.3f} MiB -> {t.nbytes / 2**20:10.3f} MiB")
    lines.append(f"model size = {before / 2**20:10.2f} MiB ({before * 8 / elements:.2f} BPW)")
    lines.append(f"quant size = {after / 2**20:10.2f} MiB ({after * 8 / elements:.2f} BPW)")
    return lines


def _plan_importance(planned: list[Planned], imatrix: Imatrix | None, notes: list[str]) -> None:
    """Give each tensor to be quantized its importance weights, checked against its shape; without them, a type
    whose search needs them weighs columns by their energy (ds4's fallback), and a note says which."""
    energy = []
    for p in planned:
        t = p.tensor
        if all(part.source_type == p.qtype for part in t.parts) or t.role == INDEX:
            continue  # copied as it is
        weights = imatrix.weights(t.name) if imatrix is not None else None
        if weights is not None:
            experts = t.shape[0] if len(t.shape) == 3 else 1
            if weights.size != experts * t.shape[-1]:
                raise ValueError(f"importance matrix: entry '{t.name}' has {weights.size} weights, the tensor needs "
                                 f"{t.shape[-1]} per expert for {experts} expert(s)")
            p.importance = weights
        elif p.qtype in NEEDS_IMPORTANCE:
            p.energy = True
            energy.append(t.name)
    if energy:
        notes.append(f"{len(energy)} tensor(s) in types whose search needs an importance matrix have none "
                     f"(--imatrix FILE): their columns are weighed by the sum of squared weights, e.g. {energy[0]}")


def start_gguf(path: str | os.PathLike, p: Plan, recipe: Recipe, general_name: str,
               tensors: list[Planned] | None = None, split: tuple[int, int, int] | None = None) -> GGUFWriter:
    """A GGUFWriter on `path` that has written the header, the metadata and the info of every tensor (or of
    `tensors`), in llama.cpp's order; the tensor data follows, each tensor at data_offsets(...). split: (split.no,
    split.count, split.tensors.count) of one file of a split model, which llama-quantize --keep-split gives only
    these keys after the first file."""
    if split is not None and split[0] > 0:
        writer, entries = GGUFWriter(path, ""), []  # no arch: no general.architecture
    else:
        writer = GGUFWriter(path, p.arch)
        entries = [("general.type", "model", GGUFValueType.STRING),  # as llama.cpp's converter stamps model files
                   ("general.name", general_name, GGUFValueType.STRING),
                   ("general.file_type", recipe.file_type, GGUFValueType.UINT32),
                   ("general.quantization_version", 2, GGUFValueType.UINT32), *p.metadata]
        for override in p.kv_overrides:  # in place of the entry it names, else after the others
            at = next((i for i, (key, _, _) in enumerate(entries) if key == override[0]), len(entries))
            entries[at:at + 1] = [override]
    if split is not None:
        entries += [("split.no", split[0], GGUFValueType.UINT16), ("split.count", split[1], GGUFValueType.UINT16),
                    ("split.tensors.count", split[2], GGUFValueType.INT32)]
    for key, value, vtype in entries:
        if vtype == GGUFValueType.ARRAY or isinstance(value, list):
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=vtype)
        else:
            writer.add_key_value(key, value, vtype)
    for t in p.tensors if tensors is None else tensors:
        writer.add_tensor_info(t.tensor.name, t.tensor.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file(Path(path))
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    return writer


def data_offsets(writer: GGUFWriter, p: Plan) -> tuple[list[int], int]:
    """(absolute file offset of each planned tensor's data, the file's final size) for a writer that has just
    written the tensor infos: the data section starts at the next alignment boundary and each tensor is padded
    to one, as convert writes them."""
    align = writer.data_alignment
    pos = writer.fout[0].tell()
    pos += -pos % align
    offsets = []
    for t in p.tensors:
        offsets.append(pos)
        pos += t.nbytes + (-t.nbytes % align)
    return offsets, pos


def _outputs(p: Plan, out: Path, keep_split: bool) -> list[tuple[Path, list[Planned], tuple[int, int, int] | None]]:
    """(file, its tensors, (split.no, split.count, split.tensors.count) or None) of each file to write: `out`, or
    with keep_split for a split source one per source file, named as llama.cpp names splits (OUT less .gguf, then
    -0000i-of-0000N.gguf)."""
    count = p.source.metadata.get("split.count", 1) if keep_split and p.hparams is None else 1
    if count <= 1:
        return [(out, p.tensors, None)]
    stem = str(out).removesuffix(".gguf")
    by_split: list[list[Planned]] = [[] for _ in range(count)]
    for t in p.tensors:
        by_split[shard_number(os.path.basename(t.tensor.parts[0].view.path)) - 1].append(t)
    return [(Path(f"{stem}-{i + 1:05d}-of-{count:05d}.gguf"), tensors, (i, count, len(p.tensors)))
            for i, tensors in enumerate(by_split)]


def _write_data(writer: GGUFWriter, tensors: list[Planned], h, slab_bytes: int, workers: int, bar: Progress) -> None:
    """The data section after start_gguf: each tensor's bytes, padded to the alignment, made `workers` slabs
    ahead."""
    fout = writer.fout[0]
    stream = _pipeline(tensors, h, slab_bytes, workers)
    try:
        written = 0
        for t, chunk in stream:
            if chunk is None:
                if written != t.nbytes:
                    raise AssertionError(f"{t.tensor.name}: wrote {written} bytes, planned {t.nbytes}")
                fout.write(bytes(-written % writer.data_alignment))
                for shard in set().union(*(part.shards() for part in t.tensor.parts)):
                    shard.release_all()
                bar.update(t.tensor.name, 0, tensor_done=True)
                written = 0
                continue
            if written == 0:
                fout.write(bytes(-fout.tell() % writer.data_alignment))
            fout.write(memoryview(chunk).cast("B"))
            written += chunk.nbytes
            bar.update(t.tensor.name, chunk.nbytes)
    finally:
        stream.close()


def convert(src: str | os.PathLike, out: str | os.PathLike, recipe: Recipe, *, force: bool = False,
            progress: bool = True, log: Callable[[str], None] | None = None,
            slab_bytes: int = SLAB_BYTES, workers: int | None = None, name: str | None = None,
            imatrix: Imatrix | None = None, mtp: bool = False, dspark: bool = False, allow_requantize: bool = False,
            kv_overrides=(), keep_split: bool = False) -> Summary:
    """Write `src` (a checkpoint folder, or a deepseek4 GGUF to requantize) as the deepseek4 GGUF `out`; returns
    what was written.

    `workers` threads (default: the usable cores) each hold about `slab_bytes` of float32 values at a time.
    `name` is the model's general.name (default: the source's, else the folder's or file's name). `imatrix`
    weighs the quantizers' error per column (quant.imatrix). `mtp` writes the MTP draft GGUF llama.cpp's
    converter writes with --mtp (for `-md`; quant.layout) instead of the model, `dspark` the DSpark draft its converter writes for a
    DSpark checkpoint. `allow_requantize` and
    `kv_overrides`: as for plan(). `keep_split`: a split GGUF source is written as the same splits, each tensor in
    the file of its source's number, OUT-0000i-of-0000N.gguf (llama-quantize --keep-split)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    src, out = Path(src), Path(out)
    if out.exists() and not force and not keep_split:
        raise FileExistsError(f"{out}: already exists (pass --force to overwrite)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: output directory does not exist")
    if keep_split and not src.is_file():
        raise ValueError(f"--keep-split: {src} is not a GGUF (a checkpoint is written as one file)")
    p = plan(src, recipe, imatrix, mtp=mtp, dspark=dspark, allow_requantize=allow_requantize, kv_overrides=kv_overrides)
    planned = p.tensors
    outputs = _outputs(p, out, keep_split)
    default_name = src.resolve().name if src.is_dir() else src.name.removesuffix(".gguf")
    if not src.is_dir():
        default_name = p.source.get("general.name", default_name)
    t0 = time.perf_counter()
    temps: list[str] = []
    writer = None
    try:
        if keep_split and len(outputs) == 1:
            p.notes.append(f"--keep-split: {src} is one file, so is {out}")
        for note in p.notes:
            log(f"note: {note}")
        if keep_split and not force:
            there = [str(path) for path, _, _ in outputs if path.exists()]
            if there:
                raise FileExistsError(f"{there[0]}: already exists (pass --force to overwrite)")
        for path, _, _ in outputs:
            stale = remove_stale_partials(path)
            if stale:
                log(f"note: removed {len(stale)} unfinished file(s) of earlier runs that were killed: "
                    f"{', '.join(stale)}")
        total = sum(t.nbytes for t in planned)
        bar = Progress(len(planned), total, enabled=progress)
        where = out if len(outputs) == 1 else f"{len(outputs)} files {outputs[0][0]} ..."
        log(f"quantizing {src} ({p.style} layout, {p.n_layers} layers, {p.n_expert} experts) -> {where}: "
            f"{len(planned)} tensors, {total / 1e9:.2f} GB")
        for path, tensors, split in outputs:
            temps.append(partial_file(path))
            writer = start_gguf(temps[-1], p, recipe, name or default_name, tensors, split)
            _write_data(writer, tensors, p.hparams, slab_bytes, workers or _cpus(), bar)
            writer.fout[0].flush()
            os.fsync(writer.fout[0].fileno())
            writer.close()
        bar.finish()
        for tmp, (path, _, _) in zip(temps, outputs):
            os.replace(tmp, path)
        temps = []
    finally:
        try:
            if writer is not None:
                writer.close()
        except OSError:
            if not temps:  # the files are complete and in place: a failing close is the caller's to hear
                raise
        finally:  # a second failure (ENOSPC again on close) must not skip the removal
            for tmp in temps:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            p.source.close()
    seconds = time.perf_counter() - t0
    log(f"wrote {where}: {len(planned)} tensors, {total / 1e9:.2f} GB in {seconds:.1f} s "
        f"({total / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
    return Summary(out, len(planned), total, seconds, p.notes)
