"""Stream a DeepSeek V4 safetensors checkpoint into a deepseek4 GGUF file.

Two passes: first every tensor's name, shape, type and size is planned from the shard headers and config.json
alone (nothing is read), so every mismatch is found before a byte is written; then gguf-py's GGUFWriter writes the
header, metadata and tensor infos, and the tensor data follows one slab of rows at a time, decoded from the
memory-mapped shards whose pages are dropped after each slab. Peak memory is a few slabs, whatever the model's
size. The output is built in a hidden temporary file next to OUT and renamed over it at the very end.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import functools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFValueType, GGUFWriter

from flashlite import blocks
from quant.gguf_meta import ARCH, Hparams, hparam_kv, read_hparams
from quant.layout import INDEX, GGUFTensor, Stored, check_index, plan_tensors
from quant.recipes import Recipe, tensor_nbytes
from quant.tokenizer_meta import tokenizer_kv
from quant.safetensors_source import Checkpoint, CheckpointError

SLAB_BYTES = 32 << 20  # float32 bytes decoded at a time, per worker


@dataclass
class Planned:
    tensor: GGUFTensor
    qtype: Q
    nbytes: int


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


def _encode(values: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)
    return blocks.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)


def _encode_slab(part: Stored, r0: int, r1: int, qtype: Q) -> np.ndarray:
    """The output bytes of rows r0:r1 of one stored tensor; runs on a worker thread."""
    if qtype == Q.MXFP4 and part.format == "fp4":
        data = part.mxfp4_rows(r0, r1)
        if np.any(data.reshape(r1 - r0, -1, 17)[:, :, 0] == 255):
            raise CheckpointError(f"{part.scale.file}: tensor '{part.scale.name}' holds the NaN scale 255")
    else:
        values = part.f32_rows(r0, r1)
        if not np.isfinite(values).all():
            bad = np.argwhere(~np.isfinite(values))[0]
            raise CheckpointError(f"{part.weight.file}: tensor '{part.weight.name}' holds a non-finite value at "
                                  f"row {r0 + bad[0]}, column {bad[1]}")
        data = _encode(values, qtype)
    part.release_rows(r0, r1)
    return data


def _slabs(p: Planned, h: Hparams, slab_bytes: int) -> Iterator[Callable[[], np.ndarray]]:
    """Tasks that make the tensor's bytes, in order, one slab of rows each."""
    t = p.tensor
    if t.role == INDEX:
        yield functools.partial(check_index, t.parts[0], h)
        return
    for part in t.parts:
        rows = math.prod(part.shape[:-1])
        step = max(1, slab_bytes // (4 * part.shape[-1]))
        for r0 in range(0, rows, step):
            yield functools.partial(_encode_slab, part, r0, min(rows, r0 + step), p.qtype)


def _pipeline(planned: list[Planned], h: Hparams, slab_bytes: int, workers: int
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
    hparams: Hparams
    checkpoint: Checkpoint
    tensors: list[Planned]
    metadata: list[tuple[str, object, GGUFValueType]]  # every key but general.*; list values give the element type
    notes: list[str]
    style: str


def plan(src: str | os.PathLike, recipe: Recipe) -> Plan:
    """Everything about the output but its data: validates config, tokenizer, shards, names, dtypes and shapes."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory (expected a checkpoint folder)")
    h = read_hparams(src)
    if not (src / "tokenizer.json").is_file():
        raise CheckpointError(f"{src / 'tokenizer.json'}: missing (the GGUF embeds the tokenizer)")
    metadata = hparam_kv(h) + tokenizer_kv(src, h.vocab_size)
    ck = Checkpoint(src)
    try:
        layout = plan_tensors(ck, h)
        types, notes = recipe.assign(layout.tensors)
    except BaseException:
        ck.close()
        raise
    planned = [Planned(t, types[t.name], tensor_nbytes(t.shape, types[t.name])) for t in layout.tensors]
    if layout.skipped:
        notes.append(f"left out {len(layout.skipped)} tensor(s) llama.cpp's deepseek4 does not load "
                     f"(MTP, hash layers' gate bias), e.g. {layout.skipped[0]}")
    lossy = [p.tensor.name for p in planned
             if p.qtype == Q.MXFP4 and any(part.format != "fp4" for part in p.tensor.parts)]
    if lossy:
        notes.append(f"{len(lossy)} MXFP4 tensor(s) are quantized, not repacked (their source is not FP4): "
                     f"{lossy[0]}")
    return Plan(h, ck, planned, metadata, notes, layout.style)


def convert(src: str | os.PathLike, out: str | os.PathLike, recipe: Recipe, *, force: bool = False,
            progress: bool = True, log: Callable[[str], None] | None = None,
            slab_bytes: int = SLAB_BYTES, workers: int | None = None, name: str | None = None) -> Summary:
    """Write `src` (a checkpoint folder) as the deepseek4 GGUF `out`; returns what was written.

    `workers` threads (default: the usable cores) each hold about `slab_bytes` of float32 values at a time.
    `name` is the model's general.name (default: the folder's name)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    src, out = Path(src), Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (pass --force to overwrite)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: output directory does not exist")
    p = plan(src, recipe)
    h, ck, planned = p.hparams, p.checkpoint, p.tensors
    t0 = time.perf_counter()
    tmp = None
    writer = None
    try:
        for note in p.notes:
            log(f"note: {note}")
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the model private to its writer
        writer = GGUFWriter(tmp, ARCH)
        writer.add_type("model")  # llama.cpp's converter stamps every model file so (adapters say "adapter")
        writer.add_string("general.name", name or src.resolve().name)
        writer.add_uint32("general.file_type", recipe.file_type)
        writer.add_uint32("general.quantization_version", 2)
        for key, value, vtype in p.metadata:
            if vtype == GGUFValueType.ARRAY or isinstance(value, list):
                writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=vtype)
            else:
                writer.add_key_value(key, value, vtype)
        for t in planned:
            writer.add_tensor_info(t.tensor.name, t.tensor.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        total = sum(t.nbytes for t in planned)
        bar = Progress(len(planned), total, enabled=progress)
        log(f"quantizing {src} ({p.style} layout, {h.n_layers} layers, {h.n_routed_experts} experts) -> {out}: "
            f"{len(planned)} tensors, {total / 1e9:.2f} GB")
        stream = _pipeline(planned, h, slab_bytes, workers or _cpus())
        try:
            written = 0
            for t, chunk in stream:
                if chunk is None:
                    if written != t.nbytes:
                        raise AssertionError(f"{t.tensor.name}: wrote {written} bytes, planned {t.nbytes}")
                    fout.write(bytes(-written % writer.data_alignment))
                    for shard in {s.shard for part in t.tensor.parts for s in (part.weight, part.scale) if s}:
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
        bar.finish()
        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
        os.replace(tmp, out)
        tmp = None
    finally:
        if writer is not None:
            writer.close()
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        ck.close()
    seconds = time.perf_counter() - t0
    log(f"wrote {out}: {len(planned)} tensors, {total / 1e9:.2f} GB in {seconds:.1f} s "
        f"({total / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
    return Summary(out, len(planned), total, seconds, p.notes)
