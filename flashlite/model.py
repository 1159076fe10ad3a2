"""The object behind flashlite.load: one memory-mapped DeepSeek V4 GGUF, its decode cache, logits and generation."""
from __future__ import annotations

import hashlib
import os
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property

import numpy as np

from flashlite import speculative
from flashlite.atomic import atomic_write
from flashlite.backends import cpu, open_device, placement
from flashlite.chat import completion as chat_api
from flashlite.chat.tokenizer import Tokenizer
from flashlite.expert_offload import default_usage_path, parse_bytes, read_usage
from flashlite.gguf_file import GGUFFile
from flashlite.models import deepseek_v4

DRAFT_KINDS = ("mtp", "dspark")  # the spec types that read a draft GGUF
REPLAY_CHUNK = 512  # tokens per forward when truncate feeds tokens again: bounds the activations' memory
CACHE_FORMAT = "flashlite-kv-cache"
CACHE_VERSION = 2  # 1 was unversioned, keyed by file name and size


def _draft_kind(path: str) -> str:
    """'dspark' for a DSpark draft GGUF (llama.cpp's dflash architecture), else 'mtp' (checked on load)."""
    from flashlite.dspark import is_dspark_draft

    f = GGUFFile(path)
    try:
        return "dspark" if is_dspark_draft(f) else "mtp"
    finally:
        f.close()


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of an uncompressed npz (what np.savez writes), each checked before numpy allocates it: stored,
    not compressed (no zip bomb), and its header's shape and dtype exactly the member's size (numpy would
    otherwise allocate whatever a hostile header declares)."""
    from numpy.lib import format as npy

    arrays = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise ValueError(f"member {info.filename!r} is compressed; save_cache writes them stored")
            if not info.filename.endswith(".npy"):
                raise ValueError(f"member {info.filename!r} is no array")
            with z.open(info) as fp:
                version = npy.read_magic(fp)
                header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                shape, fortran, dtype = header(fp, max_header_size=10000)
                if dtype.hasobject:
                    raise ValueError(f"member {info.filename!r} holds Python objects")
                need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if need != info.file_size - fp.tell():
                    raise ValueError(f"member {info.filename!r} declares {need} bytes and holds "
                                     f"{info.file_size - fp.tell()}")
            with z.open(info) as fp:
                arrays[info.filename[:-4]] = npy.read_array(fp, allow_pickle=False)
    return arrays


def _arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


LOAD_OPEN_FRACTION = 0.05  # of load progress: the file's header, metadata and tensor table read


class _LoadProgress:
    """Calls progress(fraction) as a load goes: 0.0 first, LOAD_OPEN_FRACTION once the file is open, then up to
    0.99 as the weights are loaded one tensor after another, 1.0 last; never backwards, at most every 1%."""

    def __init__(self, callback):
        self.callback = callback
        self.last = -1.0
        self(0.0)

    def __call__(self, fraction: float) -> None:
        if self.callback is None or (fraction < 1.0 and fraction - self.last < 0.01) or fraction <= self.last:
            return
        self.last = fraction
        self.callback(fraction)

    @contextmanager
    def counting(self, gguf: GGUFFile, total: int):
        """Report each tensor `gguf.load` gives while the block runs, as a share of `total`."""
        if self.callback is None:
            yield
            return
        load, done = gguf.load, [0]

        def counted(*args, **kwargs):
            out = load(*args, **kwargs)
            done[0] += 1
            self(LOAD_OPEN_FRACTION + (0.99 - LOAD_OPEN_FRACTION) * min(1.0, done[0] / max(total, 1)))
            return out

        gguf.load = counted
        try:
            yield
        finally:
            del gguf.load


class Model:
    """A loaded model and the cache of the sequence it is decoding."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, ctx: int | None = None,
                 rewind: int = 256, ram_budget: int | str | None = None, expert_policy: str = "lru",
                 expert_prefetch: bool = True, expert_usage: str | os.PathLike | bool = True,
                 pin_fraction: float = 0.5, io_threads: int = 2, direct_io: bool = True, kv_format: str = "f32",
                 progress: Callable[[float], object] | None = None, check_tensors: bool = False,
                 spec_type: str | None = None, spec_draft_n_max: int | None = None,
                 model_draft: str | os.PathLike | None = None, device: str = "cpu",
                 gpu_mem: int | str | None = None, cuda_graphs: bool = True):
        report = _LoadProgress(progress)
        self.device = open_device(device)  # None: the CPU backend
        if threads is not None and self.device is not None:
            self.device.set_threads(threads)
        if threads is not None:
            from flashlite._native import check, lib
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            check(lib.fl_threads_set(threads), "fl_threads_set")
        self.file = GGUFFile(path)
        if check_tensors:
            self.file.check_tensors()
        self.args = deepseek_v4.ModelArgs.from_gguf(self.file)
        report(LOAD_OPEN_FRACTION)
        self.ctx = self.args.max_seq_len if ctx is None else int(ctx)
        if not 0 < self.ctx <= self.args.max_seq_len:
            raise ValueError(f"ctx must lie in 1..{self.args.max_seq_len}, got {ctx}")
        offload = None
        if ram_budget is not None:
            usage = expert_usage
            if usage is True:
                usage = default_usage_path(self.file.path)
            offload = dict(ram_budget=parse_bytes(ram_budget), policy=expert_policy, prefetch=expert_prefetch,
                           usage_path=usage or None, pin_fraction=pin_fraction, io_threads=io_threads,
                           direct_io=direct_io)
        placer = self._placer(gpu_mem, rewind, kv_format, expert_usage)
        cpu.avoid_compaction_stalls()
        with report.counting(self.file, len(deepseek_v4.expected_tensors(self.args))):
            self.net = deepseek_v4.Transformer(self.args, self.file, offload, self.device, placer)
        if cuda_graphs and self.device is not None and self.device.device.type == "cuda":
            self.net.use_step_graphs("cuda")
        self.tokens = 0
        self.cache = self.net.make_cache(rewind, kv_format)
        # every forward pass takes it: the core's thread pool runs one at a time, and a call that uses the model's
        # own cache (logits) holds it for the whole call; reentrant, as chat holds it around its own calls
        self.lock = threading.RLock()
        self._drafts: dict[str, object] = {}  # draft GGUF path -> its loaded drafter (MTPHead)
        self.drafted = self.accepted = self.spec_rounds = 0
        # the speculation generate / chat use when a call does not say (spec_type=None)
        self.speculation = self.spec_options(spec_type, spec_draft_n_max, model_draft)
        report(1.0)

    def _placer(self, gpu_mem, rewind: int, kv_format: str, expert_usage):
        """The hybrid placement's callable for the Transformer (backends/placement.py), or None when the device
        holds everything: on the CPU backend, and on a CPU torch device without gpu_mem. The budget is gpu_mem,
        else what the accelerator has free less placement.DEFAULT_RESERVE; the hottest routed experts are those
        of the expert-usage histogram at expert_usage (the expert cache's, as ram_budget saves it) when there is
        one."""
        if self.device is None:
            if gpu_mem is not None:
                raise ValueError("gpu_mem: a device memory budget needs a device backend (device='cuda', "
                                 "'npu' or 'torch-cpu'); the CPU backend holds the model in RAM (see ram_budget)")
            return None
        if gpu_mem is not None:
            budget = parse_bytes(gpu_mem, "gpu_mem")
        else:
            free = self.device.free_bytes()
            if free is None:
                return None
            budget = max(free - placement.DEFAULT_RESERVE, 0)
        usage_path = default_usage_path(self.file.path) if expert_usage is True else expert_usage or None
        usage = read_usage(usage_path, self.args.n_layers, self.args.n_routed_experts)
        kv_bytes = placement.kv_cache_bytes(self.args, self.ctx, rewind, kv_format)

        def place(views):
            self.device.placement = placement.plan(self.args, views, self.device.nbytes, budget, kv_bytes, usage)
            return self.device.placement

        return place

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The model's byte-level BPE tokenizer, built once from the GGUF metadata."""
        return Tokenizer.from_gguf(self.file)

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def pos(self) -> int:
        """Tokens of the current sequence already in the cache."""
        return self.cache.pos

    def reset(self) -> None:
        self.cache.reset()

    def spec_options(self, spec_type: str | None = None, spec_draft_n_max: int | None = None,
                     model_draft: str | os.PathLike | None = None) -> speculative.SpecOptions:
        """The speculation of a call: its own arguments, else the model's defaults (load(spec_type=...)).
        spec_type None with a draft file takes the file's kind (an MTP draft: 'mtp', a DSpark draft: 'dspark'),
        as llama.cpp does; 'mtp' and 'dspark' need their draft GGUF (model_draft, llama.cpp's -md). The draft is
        loaded once per path. A speculative.SpecOptions passed as spec_type is taken as it is."""
        if isinstance(spec_type, speculative.SpecOptions):  # given whole (tests, benchmarks: adaptive=False)
            if spec_type.type in DRAFT_KINDS:
                self.draft_head(spec_type.draft, spec_type.type)
            return spec_type
        default = getattr(self, "speculation", None)
        if spec_type is None and model_draft is None:
            if default is None:
                return speculative.SpecOptions()
            spec_type = default.type
            model_draft = default.draft
        draft = os.fspath(model_draft) if model_draft is not None else None
        kind = speculative.parse_spec_type(spec_type)
        if spec_type is None:
            kind = _draft_kind(draft)  # a draft file without a type: the file's kind
        n_max = spec_draft_n_max if spec_draft_n_max is not None else \
            (default.n_max if default is not None else speculative.DEFAULT_N_MAX)
        options = speculative.SpecOptions(kind, n_max, draft)
        if kind in DRAFT_KINDS:
            if draft is None:
                how = ("write one with `flashlite quantize CHECKPOINT mtp-NAME.gguf --mtp`" if kind == "mtp" else
                       "llama.cpp's convert_hf_to_gguf.py writes one from a DSpark checkpoint")
                name = "MTP" if kind == "mtp" else "DSpark"
                raise ValueError(f"spec_type {kind!r} needs the {name} draft GGUF (model_draft=..., -md FILE): {how}")
            self.draft_head(draft, kind)
        elif draft is not None:
            raise ValueError(f"model_draft: a draft GGUF is for spec_type 'mtp' or 'dspark', not {kind!r}")
        return options

    def draft_head(self, path: str | os.PathLike, kind: str = "mtp"):
        """The draft of the GGUF at path, loaded once: kind 'mtp' an MTP block (flashlite.mtp.MTPHead), 'dspark'
        a DSpark draft (flashlite.dspark.DSparkHead)."""
        path = os.fspath(path)
        with self.lock:
            head = self._drafts.get(path)
            if head is None:
                if kind == "dspark":
                    from flashlite.dspark import DSparkHead as Head
                else:
                    from flashlite.mtp import MTPHead as Head
                head = self._drafts[path] = Head(path, self)
            loaded = "dspark" if type(head).__name__ == "DSparkHead" else "mtp"
            if kind != loaded:
                raise ValueError(f"{path}: a draft of kind {loaded!r}, not {kind!r}")
            return head

    def count_speculation(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.spec_rounds += 1

    def truncate(self, pos: int, cache=None) -> None:
        """Roll the sequence of `cache` (else the model's own) back to its first pos tokens, for any
        0 <= pos <= cache.pos: the cache goes back in place or to its nearest checkpoint, and the tokens from
        there to pos are fed again in chunks of REPLAY_CHUNK."""
        cache = self.cache if cache is None else cache
        replay = cache.rollback(pos)
        for s in range(0, replay.size, REPLAY_CHUNK):
            self.forward(replay[s:s + REPLAY_CHUNK], cache=cache, logits="none")

    def new_cache(self):
        """A decode cache of its own for another sequence on the same weights; pass it to forward(cache=...)."""
        c = self.cache
        return self.net.make_cache(c.rewind, c.kv_format)

    def save_cache(self, path: str | os.PathLike, cache=None) -> None:
        """Write a decode cache (else the model's own) to path (a temporary file, then a rename), so that a long
        conversation resumes later without its prefill. The file (CACHE_FORMAT, an npz) names its format and
        version, the model's content fingerprint and the row format, and holds a sha256 of every array."""
        cache = self.cache if cache is None else cache
        arrays = cache.to_arrays()
        header = {"format": np.array(CACHE_FORMAT), "version": np.array(CACHE_VERSION),
                  "model": np.array(self.fingerprint), "kv_format": np.array(cache.kv_format)}
        with atomic_write(path) as f:
            np.savez(f, **header, checksum=np.array(_arrays_sha256(arrays)), **arrays)

    def load_cache(self, path: str | os.PathLike):
        """A decode cache read from a file save_cache wrote for this model: ValueError naming the file when it is
        no cache, of another version, damaged (its checksum), or of another model (by content, not file name),
        or when what it holds does not fit this model (token ids, positions, row sizes)."""
        path = os.fspath(path)
        try:
            arrays = _read_npz(path)
        except FileNotFoundError:
            raise
        except Exception as exc:  # zipfile and numpy raise many kinds on a damaged file: all mean the same here
            raise ValueError(f"{path}: not a readable flashlite cache ({type(exc).__name__}: {exc})") from exc
        if str(arrays.pop("format", "")) != CACHE_FORMAT:
            raise ValueError(f"{path}: not a readable flashlite cache (no '{CACHE_FORMAT}' format mark)")
        version = int(arrays.pop("version", 0)) if arrays.get("version", np.array(0)).shape == () else 0
        if version != CACHE_VERSION:
            raise ValueError(f"{path}: a flashlite cache of version {version}; this flashlite reads version "
                             f"{CACHE_VERSION} (prefill the conversation again)")
        saved_model, kv_format = str(arrays.pop("model", "")), str(arrays.pop("kv_format", ""))
        checksum = str(arrays.pop("checksum", ""))
        if checksum != _arrays_sha256(arrays):
            raise ValueError(f"{path}: the cache is damaged (its checksum does not match its contents)")
        if saved_model != self.fingerprint:
            raise ValueError(f"{path}: a cache of another model (content {saved_model[:16]}, this one is "
                             f"{self.fingerprint[:16]})")
        try:
            cache = self.net.make_cache(self.cache.rewind, kv_format)
            cache.load_arrays(arrays)
            if cache.pos:
                self.token_ids(cache.token_ids)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: the cache does not fit this model ({exc})") from exc
        if cache.pos > self.ctx:
            raise ValueError(f"{path}: holds {cache.pos} tokens, more than the context of {self.ctx}")
        return cache

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the model's content, cheap to take: every file's header (metadata and tensor table) and the
        first and last 4 KiB of every tensor, so that a cache of another model, or of another version of the same
        file name, is told apart."""
        digest = hashlib.sha256()
        for path, reader in self.file._readers.items():
            digest.update(bytes(reader._map[:reader.data_offset]))
        for name in sorted(self.file.tensors):
            data = self.file.tensors[name].data.reshape(-1).view(np.uint8)
            digest.update(name.encode())
            digest.update(data[:4096].tobytes())
            digest.update(data[-4096:].tobytes())
        return digest.hexdigest()

    def token_ids(self, token_ids: Sequence[int]) -> np.ndarray:
        """token_ids as int64, checked: a non-empty flat sequence of integers (no floats, no nesting), each a token
        of the vocabulary; ValueError or TypeError naming what is wrong."""
        ids = np.asarray(token_ids)
        if ids.dtype == object and ids.ndim == 1 and all(isinstance(t, int) for t in ids):  # beyond int64
            raise ValueError(f"token_ids: {max(ids, key=abs)} is not a token id (0..{self.args.vocab_size - 1})")
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"token_ids: expected a non-empty flat sequence of token ids, got shape {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise TypeError(f"token_ids: expected integers, got {ids.dtype} values")
        if ids.min() < 0 or ids.max() >= self.args.vocab_size:
            bad = ids[(ids < 0) | (ids >= self.args.vocab_size)][0]
            raise ValueError(f"token_ids: {bad} is not a token id (0..{self.args.vocab_size - 1})")
        return ids.astype(np.int64)

    def forward(self, token_ids: Sequence[int], dump: dict | None = None, cache=None,
                logits: str = "all", hidden: list | None = None, taps: dict | None = None) -> np.ndarray:
        """Feed token_ids after the cached ones (of `cache`, else the model's own); float32 logits [len, vocab]
        (logits="all"), of the last position only [1, vocab] ("last": what generation needs, without the head's
        cost at every other position) or none [0, vocab]. `dump`, when a dict, receives the hidden streams
        [len, hc, dim] after every sublayer (blk.N.attn, blk.N.ffn) and the final normed state; `hidden`, when a
        list, the last block's streams [len, hc, dim] (the input of V4's MTP block); `taps`, when a dict, for each
        of its keys L the mean over the hc streams entering block L [len, dim] (a DSpark draft's input)."""
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits: expected 'all', 'last' or 'none', got {logits!r}")
        ids = self.token_ids(token_ids)
        with self.lock:
            cache = self.cache if cache is None else cache
            start = cache.pos
            if start + ids.size > self.ctx:
                raise ValueError(f"{start} cached + {ids.size} new tokens exceed the context of {self.ctx}")
            out = self.net(ids, cache, dump, logits, hidden, taps)
            self.tokens += ids.size
        if not np.isfinite(out).all():
            at = int(np.argmin(np.isfinite(out).all(axis=1))) + (ids.size - out.shape[0])
            raise FloatingPointError(f"{self.file.path}: non-finite logits at position {start + at} "
                                     "(a weight or an activation overflowed): no token can be sampled from them")
        return out

    def stats(self) -> dict:
        """Counters since load (or the last reset_stats): tokens forwarded; with speculative decoding the drafted
        and accepted tokens and the verified batches (spec_rounds); with a ram_budget, the expert
        cache's expert_hits, expert_misses, expert_bytes_read, io_seconds, io_stall_seconds, prefetches,
        prefetch_hits, prefetch_dropped, slots, slot_bytes, direct_io and populated_bytes."""
        out = {"tokens": self.tokens, "drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
               "spec_rounds": self.spec_rounds, "expert_hits": 0, "expert_misses": 0, "expert_bytes_read": 0,
               "io_seconds": 0.0, "io_stall_seconds": 0.0}
        if self.net.offload is not None:
            out.update(self.net.offload.stats())
        return out

    def reset_stats(self) -> None:
        self.tokens = self.drafted = self.accepted = self.spec_rounds = 0
        if self.net.offload is not None:
            self.net.offload.reset_stats()

    def close(self) -> None:
        """Save the expert-usage histogram and stop the expert cache's I/O threads (also done at exit) and a device's
        worker thread of split MoE layers."""
        if self.net.offload is not None:
            self.net.offload.close()
        if self.device is not None:
            self.device.close()
        for draft in self._drafts.values():
            draft.close()
        self._drafts.clear()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def logits(self, token_ids: Sequence[int], chunk: int | None = None, dump: dict | None = None) -> np.ndarray:
        """Logits [len, vocab] at every position of token_ids, prefilled as a fresh sequence (in chunks of
        `chunk` tokens when given)."""
        ids = self.token_ids(token_ids)
        step = ids.size if chunk is None else int(chunk)
        if step < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        with self.lock:  # the model's own cache, for the whole call
            self.reset()
            return np.concatenate([self.forward(ids[s:s + step], dump) for s in range(0, ids.size, step)])

    def generate(self, token_ids: Sequence[int], max_tokens: int, sampler=None, stop: Sequence[int] = (),
                 spec_type: str | None = None, spec_draft_n_max: int | None = None,
                 model_draft: str | os.PathLike | None = None) -> Iterator[int]:
        """Prefill token_ids as a fresh sequence, then yield up to max_tokens ids one decode step at a time.
        `sampler` maps a float32 logits row to an id (greedy when None); ids in `stop` end generation (yielded).
        The sequence lives in a cache of its own, so several generations may run from different threads (their
        forward passes take turns).

        Speculative decoding (flashlite.speculative): spec_type 'ngram' (prompt lookup) or 'mtp' (V4's MTP block
        from the draft GGUF model_draft), at most spec_draft_n_max drafts a round; the tokens are those of plain
        decoding (greedy), or follow the same distribution (sampler a flashlite Sampler; another callable cannot
        be verified against and is refused). Default: the model's (load(spec_type=...)), else none."""
        options = self.spec_options(spec_type, spec_draft_n_max, model_draft)
        if options.type != "none" and sampler is not None and not hasattr(sampler, "probs"):
            raise ValueError("sampler: speculative decoding needs None (greedy) or a flashlite.chat.sampling.Sampler, "
                             "whose distribution verification samples from")
        return self._generate(token_ids, max_tokens, sampler, stop, options)

    def _generate(self, token_ids, max_tokens, sampler, stop, options) -> Iterator[int]:
        if max_tokens <= 0:
            return
        cache = self.new_cache()
        if options.type != "none":
            history = [int(t) for t in self.token_ids(token_ids)]
            sampler = None if sampler is None else speculative.WithoutHistory(sampler)  # as pick(row) below
            tokens = speculative.Speculator(self, cache, options, sampler).tokens(list(history), history)
            try:
                for i, token in enumerate(tokens):
                    yield token
                    if token in stop or i + 1 == max_tokens:
                        return
            finally:
                tokens.close()
            return
        pick = sampler or (lambda row: int(np.argmax(row)))
        row = self.forward(token_ids, cache=cache, logits="last")[-1]
        for i in range(max_tokens):
            token = int(pick(row))
            yield token
            if token in stop or i + 1 == max_tokens:
                return
            row = self.forward([token], cache=cache, logits="last")[-1]

    def chat(self, messages: list[dict], **kwargs):
        """Reasoning / content / tool-call pieces for `messages`: see flashlite.chat.completion.chat."""
        return chat_api.chat(self, messages, **kwargs)

    def create_chat_completion(self, messages: list[dict], **kwargs):
        """An OpenAI-shaped chat completion (or chunk stream): see flashlite.chat.completion.create_chat_completion."""
        return chat_api.create_chat_completion(self, messages, **kwargs)


def load(path: str | os.PathLike, threads: int | None = None, ctx: int | None = None, **options) -> Model:
    """Open a deepseek4 GGUF (memory-mapped) for CPU inference.

    kv_format "f32" keeps the KV rows as computed (equal to transformers' reference); "fp8" rounds and packs them
    as DeepSeek's reference stores them, about 3.5 KB per token at V4-Flash widths instead of 13.8 KB.

    With ram_budget (bytes, or a size such as "24G") the routed experts stay in the file and a cache of that many
    bytes holds the ones in use: expert_policy "lru" or "lfu"; expert_prefetch reads the next layer's predicted
    experts in the background; expert_usage is where the usage histogram is kept between runs (True: under
    ~/.cache/flashlite, False: nowhere), and pin_fraction of each layer's slots hold its hottest experts;
    io_threads read in parallel; direct_io=False reads through the page cache (dropping the pages after) even
    where O_DIRECT works.

    check_tensors reads every tensor first and refuses a file with an Inf or NaN among its float values or block
    scales (llama.cpp's --check-tensors); without it only the small tensors decoded at load are checked.

    progress, a callable, receives the load's progress as a fraction (0.0 first, 1.0 last, non-decreasing, at
    most about a hundred calls), on the thread that loads: a UI hands it on to its own thread (docs/api.md).

    device: where the forward runs: "cpu" (the C core, the default; needs nothing more), "cuda" or "cuda:N" (an
    NVIDIA GPU: the weights uploaded once in their block formats, matmuls in Triton), "npu" or "npu:N" (an Ascend
    NPU through torch_npu and triton-ascend; not yet run on one), "torch-cpu" (the same torch backend on the CPU,
    matmuls of weights decoded to float32 once), or "auto" (CUDA when torch sees a GPU, else "cpu"). The device
    backends need `pip install 'flashlite[cuda]'`; one asked for and not available raises a RuntimeError that says
    what is missing. They hold either kv_format (fp8 rows packed on the device as the CPU packs them) and run the
    MTP and DSpark drafts there (docs/gpu.md).

    gpu_mem (bytes, or a size such as "20G"): the device's memory budget for hybrid placement (docs/gpu.md):
    what fits goes to the device in this order: the KV cache at ctx, attention and dense weights, head and
    embeddings, shared experts, then the hottest routed experts (by the expert-usage histogram when there is one,
    else layer by layer); the other routed experts run on the CPU through the C core, memory-mapped or, with
    ram_budget, through the expert cache. Default: what the accelerator has free less 1 GiB; on "torch-cpu"
    everything is placed on the device. model.device.placement says what went where.

    cuda_graphs (on a CUDA device; default True): a decode step is captured as CUDA graphs at the first step and
    replayed after (docs/gpu.md): a model all on the device as one graph, its attention heads over fixed-capacity
    KV rings; in hybrid placement a graph per run of layers, a layer's MoE with host weights op by op between them.
    False runs every step op by op. model.net.graphs counts the replays."""
    return Model(path, threads=threads, ctx=ctx, **options)
