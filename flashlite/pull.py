"""`flashlite pull`: a model from the Hugging Face Hub, ready to run, through huggingface_hub (its cache under
$HF_HOME/hub, HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE).

A safetensors checkpoint is quantized while it downloads. The plan comes first, from config.json, the tokenizer,
the index and every shard's header (its first bytes, fetched by ranged requests, or read from a shard already in the
cache): every tensor's name, shape, type and place in the GGUF is then known, so the GGUF's header, metadata and
tensor infos are written at once, in llama.cpp's order, and its data section is laid out. Shards then download one
after another in a background thread, each checked against the sha256 the Hub's API gives for it (its LFS
metadata) in another, and as soon as one has landed the parts of the GGUF's tensors it completes are quantized
and written at their places while the next one downloads. The GGUF is built in a hidden file beside OUT and
renamed to OUT only when every tensor is in; a state file beside it records the shards converted, so a pull that
was interrupted goes on at the first shard not yet converted. `delete_source` removes each shard from the cache
once every tensor it feeds is written, so the disk holds about one shard (two while they overlap) plus the GGUF.

A GGUF repo (`org/repo:QUANT`) is downloaded as published: the files llama.cpp would pick (flashlite.hub.pick_gguf),
each checked against its sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

STATE_VERSION = 1
HEADER_PROBE = 64 << 10  # first ranged request per shard; a longer header takes a second one
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PullError(ValueError):
    """A pull that cannot go on: the message names the repo, the file and what to do."""


@dataclass
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None  # the LFS object's sha256 (None for a file kept in git, e.g. a small JSON)


@dataclass
class PullSummary:
    out: Path
    seconds: float                    # the whole pull
    plan_seconds: float = 0.0         # file list, small files, shard headers
    download_seconds: float = 0.0     # from the first shard's request to the last shard checked
    last_shard_seconds: float = 0.0   # the conversion after the last shard landed (and the final rename)
    convert_seconds: float = 0.0      # all the conversion, shard by shard (what a download-then-convert adds)
    downloaded: int = 0               # bytes fetched
    shards: int = 0
    resumed: int = 0                  # shards already converted by an earlier, interrupted pull
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# the Hub, through huggingface_hub
# ---------------------------------------------------------------------------------------------------------------

def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the Hub cannot be reached (its HTTP library changed across versions)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, OSError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of `repo` at `revision` (default: its main branch), or None."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    rev = revision or "main"
    if not re.fullmatch(r"[0-9a-f]{40}", rev):
        ref = folder / "refs" / rev
        if not ref.is_file():
            return None
        rev = ref.read_text().strip()
    snapshot = folder / "snapshots" / rev
    return snapshot if snapshot.is_dir() else None


def _remember_ref(repo: str, revision: str | None, commit: str) -> None:
    """Record in the cache that `revision` (the main branch by default) is `commit`, as huggingface_hub does, so
    that an offline run finds the snapshot the files are downloaded into (they are fetched by commit)."""
    from huggingface_hub import constants

    rev = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", rev):
        return
    ref = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--")) / "refs" / rev
    try:
        if not ref.is_file() or ref.read_text() != commit:
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(commit)
    except OSError:
        pass


def repo_files(repo: str, revision: str | None = None) -> tuple[str, dict[str, RemoteFile]]:
    """(commit, {path: RemoteFile}) of `repo` from the Hub's API (with each LFS file's sha256); offline, or when
    the Hub cannot be reached, those of its cached snapshot (sha256 from the cache's blob names, which are the
    LFS objects' sha256)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    reason = "offline mode (HF_HUB_OFFLINE)"
    if not _offline():
        try:
            info = HfApi().model_info(repo, revision=revision, files_metadata=True)
            files = {}
            for s in info.siblings or []:
                lfs = s.lfs
                sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
                files[s.rfilename] = RemoteFile(s.rfilename, s.size, sha)
            _remember_ref(repo, revision, info.sha)
            return info.sha, files
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise PullError(f"pull: {repo}{'@' + revision if revision else ''} is not on the Hub, or is private "
                            f"or gated (log in with `hf auth login` or set HF_TOKEN) ({_first_line(exc)})") from exc
        except (HfHubHTTPError, *_network_errors()) as exc:
            reason = f"the Hub cannot be reached: {_first_line(exc)}"
    snapshot = _cached_snapshot(repo, revision)
    if snapshot is None:
        raise PullError(f"pull: cannot get the file list of {repo} ({reason}), and it is not in the Hub cache")
    files = {}
    for p in snapshot.rglob("*"):
        if p.is_file():
            blob = os.path.basename(os.path.realpath(p))
            files[p.relative_to(snapshot).as_posix()] = RemoteFile(
                p.relative_to(snapshot).as_posix(), p.stat().st_size, blob if _SHA256.match(blob) else None)
    return snapshot.name, files


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _fetch(repo: str, name: str, commit: str, tqdm_class=None, force: bool = False) -> str:
    """The cached path of `name` at `commit`, downloaded through huggingface_hub unless already cached; a dropped
    connection is resumed by huggingface_hub (a ranged request from where it stopped)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    kwargs = dict(revision=commit, force_download=force)
    if tqdm_class is not None:
        kwargs["tqdm_class"] = tqdm_class
    try:
        try:
            return hf_hub_download(repo, name, **kwargs)
        except TypeError:  # a huggingface_hub without tqdm_class
            kwargs.pop("tqdm_class", None)
            return hf_hub_download(repo, name, **kwargs)
    except LocalEntryNotFoundError as exc:
        raise PullError(f"pull: {name} of {repo} is not in the Hub cache and the Hub cannot be reached "
                        f"({_first_line(exc)})") from exc
    except (HfHubHTTPError, *_network_errors()) as exc:
        raise PullError(f"pull: cannot download {name} of {repo} ({_first_line(exc)}); run the same command again "
                        f"to go on from there") from exc


def _get_range(repo: str, name: str, commit: str, start: int, end: int) -> bytes:
    """Bytes start..end (inclusive) of a file of the repo: one ranged GET on its resolve URL (redirects followed,
    the token sent as huggingface_hub sends it)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

    headers = build_hf_headers()
    headers["Range"] = f"bytes={start}-{end}"
    headers["Accept-Encoding"] = "identity"
    response = http_backoff("GET", hf_hub_url(repo, name, revision=commit), headers=headers, max_retries=3)
    hf_raise_for_status(response)
    data = response.content
    if response.status_code == 200:  # the server ignored the range
        data = data[start:end + 1]
    return bytes(data)


def _remote_header(repo: str, name: str, commit: str, size: int | None) -> bytes:
    """The first bytes of a safetensors file on the Hub: its 8-byte length and its JSON header."""
    from quant.safetensors_source import MAX_HEADER_BYTES

    try:
        head = _get_range(repo, name, commit, 0, HEADER_PROBE - 1)
        if len(head) < 8:
            raise PullError(f"pull: {name} of {repo} is not a safetensors file ({len(head)} bytes)")
        need = 8 + int.from_bytes(head[:8], "little")
        if need - 8 > MAX_HEADER_BYTES or (size is not None and need > size):
            raise PullError(f"pull: {name} of {repo} is not a safetensors file (header length {need - 8})")
        if len(head) < need:
            head += _get_range(repo, name, commit, len(head), need - 1)
        return head[:need]
    except PullError:
        raise
    except Exception as exc:
        raise PullError(f"pull: cannot read the header of {name} of {repo} ({_first_line(exc)})") from exc


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def remove_cached(path: str | os.PathLike) -> None:
    """Remove a file of a cached snapshot: its link and, unless another snapshot links to it, its blob."""
    path = Path(path)
    blob = Path(os.path.realpath(path))
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    if blob == path or not blob.exists() or blob.parent.name != "blobs":
        return
    snapshots = blob.parent.parent / "snapshots"
    for other in snapshots.rglob("*"):
        if other.is_symlink() and Path(os.path.realpath(other)) == blob:
            return
    blob.unlink(missing_ok=True)


def _verified(repo: str, f: RemoteFile, commit: str, tqdm_class, log, path: str | None = None) -> str:
    """The cached path of `f` (downloaded unless `path` is its copy already), its sha256 checked against the
    Hub's: a file that does not match is removed from the cache and downloaded once more; a second mismatch is an
    error (and the bad copy is removed)."""
    if path is None:
        path = _fetch(repo, f.name, commit, tqdm_class)
    if f.sha256 is None:
        return path
    for attempt in (1, 2):
        got = sha256_file(path)
        if got == f.sha256:
            return path
        remove_cached(path)
        if attempt == 2:
            raise PullError(f"pull: {f.name} of {repo} has sha256 {got} after downloading it twice, the Hub says "
                            f"{f.sha256}: the file on the Hub or the connection is damaged (the copy was removed; "
                            f"run the same command again)")
        log(f"note: {f.name}: sha256 {got[:16]}... is not the Hub's {f.sha256[:16]}...: downloading it again")
        path = _fetch(repo, f.name, commit, tqdm_class, force=True)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------------------------

class _Null:
    def write(self, text):
        return len(text)

    def flush(self):
        pass


def _bars(enabled: bool, download_total: int, convert_total: int, convert_done: int):
    """Two tqdm bars on stderr (download, conversion; shown at a terminal) and the tqdm class huggingface_hub's
    downloads report through, which adds their bytes to the download bar."""
    from tqdm.auto import tqdm

    enabled = enabled and sys.stderr.isatty()

    kw = dict(unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True, mininterval=0.5,
              disable=not enabled, file=sys.stderr)
    down = tqdm(total=download_total, desc="download", position=0, **kw)
    conv = tqdm(total=convert_total, initial=convert_done, desc="convert ", position=1, **kw)

    class Forward(tqdm):
        """A file's own bar, not shown: its bytes go to the download bar."""

        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs.update(file=_Null(), leave=False, disable=False)
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            down.update(n)
            return super().update(n)

    return down, conv, Forward


# ---------------------------------------------------------------------------------------------------------------
# a safetensors checkpoint, quantized as it downloads
# ---------------------------------------------------------------------------------------------------------------

def _small_files(files: dict[str, RemoteFile]) -> list[str]:
    """The checkpoint's files besides its shards that the converter reads: configs, index, tokenizer."""
    return sorted(n for n in files if "/" not in n and (n.endswith(".json") or n.startswith("tokenizer"))
                  and not n.endswith(".safetensors"))


def is_checkpoint(files: dict[str, RemoteFile]) -> bool:
    return "config.json" in files and any(n.endswith(".safetensors") and "/" not in n for n in files)


def default_out(repo: str, recipe_name: str) -> str:
    return f"{repo.split('/')[1]}-{recipe_name}.gguf"


def _state_paths(out: Path) -> tuple[Path, Path]:
    """(the GGUF being built, the state file): hidden, beside OUT."""
    return out.parent / f".{out.name}.pull-partial", out.parent / f".{out.name}.pull-state.json"


def _file_sha256_prefix(path: Path, n: int) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read(n)).hexdigest()


def pull_checkpoint(repo: str, out: str | os.PathLike, recipe, *, imatrix=None, imatrix_sha256: str | None = None,
                    delete_source: bool = False, force: bool = False, progress: bool = True,
                    log: Callable[[str], None] | None = None, revision: str | None = None,
                    workers: int | None = None, commit_files: tuple[str, dict] | None = None) -> PullSummary:
    """Quantize the safetensors checkpoint `repo` into the deepseek4 GGUF `out` while it downloads (see the module's
    docstring). `recipe` and `imatrix` are flashlite quantize's; `imatrix_sha256` names the matrix in the state
    file, so that a resume with another one starts over."""
    from flashlite import __version__
    from flashlite.atomic import atomic_write
    from quant.convert import SLAB_BYTES, _cpus, data_offsets, part_slabs, plan, start_gguf
    from quant.safetensors_source import Checkpoint, Shard

    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (pass --force to overwrite)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: output directory does not exist")
    partial, state_path = _state_paths(out)
    commit, files = commit_files or repo_files(repo, revision)
    if not is_checkpoint(files):
        raise PullError(f"pull: {repo} has no config.json and *.safetensors shards at its top level")

    # the plan: small files, then every shard's header (from the cache where the shard is there already)
    folder = None
    for name in _small_files(files):
        folder = Path(_fetch(repo, name, commit)).parent
    shard_names = sorted(n for n in files if n.endswith(".safetensors") and "/" not in n)
    shards = {}
    for name in shard_names:
        cached = folder / name
        shard = None
        if cached.exists():
            try:
                shard = Shard(cached)
            except ValueError:
                remove_cached(cached)  # damaged: it is fetched again below
        if shard is None:
            if _offline():
                raise PullError(f"pull: {name} of {repo} is not in the Hub cache, and HF_HUB_OFFLINE is set")
            shard = Shard(cached, header=_remote_header(repo, name, commit, files[name].size),
                          size=files[name].size)
        shards[name] = shard
    p = plan(folder, recipe, imatrix, checkpoint=Checkpoint(folder, shards))
    planned, h = p.tensors, p.hparams
    for note in p.notes:
        log(f"note: {note}")

    # which shards each part of each GGUF tensor reads
    by_shard = {id(s): n for n, s in shards.items()}
    need: dict[tuple[int, int], frozenset[str]] = {}
    for ti, t in enumerate(planned):
        for pi, part in enumerate(t.tensor.parts):
            need[ti, pi] = frozenset(by_shard[id(s)] for s in part.shards())

    # the GGUF's header, and the earlier pull's file when it was building this very file
    new_header = partial.with_name(partial.name + ".new")
    writer = start_gguf(new_header, p, recipe, repo.split("/")[1])
    offsets, size = data_offsets(writer, p)
    header_len = writer.fout[0].tell()
    writer.close()
    header_sha = _file_sha256_prefix(new_header, header_len)
    identity = {"version": STATE_VERSION, "repo": repo, "commit": commit, "flashlite": __version__,
                "header_sha256": header_sha, "imatrix_sha256": imatrix_sha256, "size": size,
                "shards": {n: files[n].sha256 for n in shard_names}}
    done: set[str] = set()
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = None
    if (isinstance(state, dict) and {k: state.get(k) for k in identity} == identity and partial.is_file()
            and partial.stat().st_size == size and _file_sha256_prefix(partial, header_len) == header_sha):
        done = set(state.get("done", [])) & set(shard_names)
        new_header.unlink()
        log(f"resuming: {len(done)} of {len(shard_names)} shards were converted by an earlier pull ({state_path})")
    else:
        if state is not None or partial.exists():
            log(f"note: the unfinished pull beside {out} was for another source or other options: starting over")
        os.replace(new_header, partial)
        os.truncate(partial, size)
        state = None
    resumed = len(done)

    def save_state():
        with atomic_write(state_path, "w") as fh:
            json.dump({**identity, "done": sorted(done)}, fh)

    save_state()
    written = {k for k, s in need.items() if s <= done}
    users: dict[str, set] = {n: set() for n in shard_names}
    for k, s in need.items():
        for n in s:
            users[n].add(k)
    to_fetch = [n for n in shard_names if any(k not in written for k in users[n])]
    deleted: set[str] = set()
    if delete_source:  # shards of an earlier pull that nothing needs any more
        for n in shard_names:
            if n not in to_fetch and (folder / n).exists():
                remove_cached(folder / n)
                deleted.add(n)

    convert_total = sum(t.nbytes for t in planned)

    def part_bytes(ti, pi):
        t = planned[ti]
        if len(t.tensor.parts) == 1:
            return t.nbytes
        return t.nbytes // len(t.tensor.parts)

    convert_done = sum(part_bytes(*k) for k in written)
    log(f"pulling {repo}@{commit[:12]} -> {out}: {len(shard_names)} shards ({len(to_fetch)} to fetch), "
        f"{len(planned)} tensors, {convert_total / 1e9:.2f} GB ({p.style} layout, {p.n_layers} layers, "
        f"{p.n_expert} experts)")
    down, conv, forward = _bars(progress, sum(files[n].size or 0 for n in to_fetch), convert_total, convert_done)
    plan_seconds = time.perf_counter() - t0

    # download and check in the background; quantize here
    landed_q: queue.Queue = queue.Queue()
    check_q: queue.Queue = queue.Queue()
    stop = threading.Event()
    slots = threading.Semaphore(2) if delete_source else None
    timing = {"first": None, "last": None}

    def downloader():
        try:
            for name in to_fetch:
                if slots is not None:
                    while not slots.acquire(timeout=0.2):
                        if stop.is_set():
                            return
                if stop.is_set():
                    return
                if timing["first"] is None:
                    timing["first"] = time.perf_counter()
                before = down.n
                path = _fetch(repo, name, commit, forward)
                down.update(max(0, (files[name].size or 0) - (down.n - before)))  # a file the cache held
                check_q.put((name, path))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            check_q.put((None, exc))
            return
        check_q.put(None)

    def checker():
        while True:
            item = check_q.get()
            if item is None or stop.is_set():
                landed_q.put(None)
                return
            name, path = item
            if name is None:
                landed_q.put(("error", path))
                return
            try:
                path = _verified(repo, files[name], commit, forward, log, path)
                landed_q.put(("landed", name, path))
                timing["last"] = time.perf_counter()
            except BaseException as exc:  # noqa: BLE001
                landed_q.put(("error", exc))
                return

    threads = [threading.Thread(target=downloader, name="pull-download", daemon=True),
               threading.Thread(target=checker, name="pull-check", daemon=True)]
    for th in threads:
        th.start()

    from concurrent.futures import ThreadPoolExecutor

    n_workers = workers or _cpus()
    pool = ThreadPoolExecutor(n_workers, thread_name_prefix="pull-quantize")
    fd = os.open(partial, os.O_WRONLY)
    landed: set[str] = set()
    downloaded = 0
    convert_seconds = 0.0
    try:
        remaining = len(to_fetch)
        while remaining:
            item = landed_q.get()
            if item is None:
                raise PullError(f"pull: the download of {repo} stopped early")
            if item[0] == "error":
                raise item[1]
            _, name, path = item
            remaining -= 1
            shard = shards[name]
            with open(path, "rb") as fh:
                if fh.read(len(shard.header_bytes)) != shard.header_bytes:
                    raise PullError(f"pull: {name} of {repo} does not start with the header it was planned from")
            shard.path = os.fspath(path)
            downloaded += files[name].size or 0
            landed.add(name)
            ready = sorted(k for k in need if k not in written and need[k] <= landed)
            t_shard = time.perf_counter()
            _write_parts(fd, ready, planned, offsets, h, pool, n_workers, SLAB_BYTES, conv, part_bytes, part_slabs)
            os.fsync(fd)
            convert_seconds += time.perf_counter() - t_shard
            written.update(ready)
            for k in ready:
                for n in need[k]:
                    shards[n].close()
            done.add(name)
            save_state()
            if progress and not sys.stderr.isatty():
                made = sum(part_bytes(*k) for k in written)
                log(f"converted {name} ({len(to_fetch) - remaining}/{len(to_fetch)}): {made / 1e6:.0f} of "
                    f"{convert_total / 1e6:.0f} MB written, {time.perf_counter() - t0:.0f} s")
            if slots is not None:
                slots.release()
            if delete_source:
                for n in list(landed):
                    if n not in deleted and users[n] <= written:
                        remove_cached(shards[n].path)
                        deleted.add(n)
        missing = [planned[ti].tensor.name for (ti, pi) in need if (ti, pi) not in written]
        if missing:
            raise AssertionError(f"pull: tensors left unwritten: {missing[:3]}")
        os.close(fd)
        fd = None
        os.replace(partial, out)
        state_path.unlink(missing_ok=True)
    except BaseException:
        stop.set()
        raise
    finally:
        if fd is not None:
            os.close(fd)
        pool.shutdown(wait=True, cancel_futures=True)
        down.close()
        conv.close()
        p.source.close()
    end = time.perf_counter()
    first, last = timing["first"], timing["last"]
    summary = PullSummary(out, end - t0, plan_seconds,
                          (last - first) if first is not None and last is not None else 0.0,
                          end - last if last is not None else 0.0, convert_seconds, downloaded,
                          len(shard_names), resumed, p.notes)
    log(f"wrote {out}: {len(planned)} tensors, {convert_total / 1e9:.2f} GB in {summary.seconds:.1f} s (plan "
        f"{summary.plan_seconds:.1f} s, download {summary.download_seconds:.1f} s, then "
        f"{summary.last_shard_seconds:.1f} s after the last shard landed; conversion "
        f"{summary.convert_seconds:.1f} s in all, {summary.downloaded / 1e9:.2f} GB downloaded)")
    return summary


def _write_parts(fd, keys, planned, offsets, h, pool, workers, slab_bytes, bar, part_bytes, part_slabs) -> None:
    """Quantize the parts `keys` ((tensor, part) indices) on the pool, `workers` slabs ahead, and write each slab
    at its place in the file."""
    from collections import deque

    pending: deque = deque()

    def put(pos, future, key, counts):
        chunk = future.result()
        view = memoryview(chunk).cast("B")
        while view:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
        counts[key] = counts.get(key, 0) + chunk.nbytes
        bar.update(chunk.nbytes)

    counts: dict = {}
    for key in keys:
        ti, pi = key
        for off, task in part_slabs(planned[ti], pi, h, slab_bytes):
            pending.append((offsets[ti] + off, pool.submit(task), key))
            while len(pending) > workers:
                put(*pending.popleft(), counts)
    while pending:
        put(*pending.popleft(), counts)
    for key in keys:
        if counts.get(key, 0) != part_bytes(*key):
            raise AssertionError(f"{planned[key[0]].tensor.name}: part {key[1]} made {counts.get(key, 0)} bytes, "
                                 f"planned {part_bytes(*key)}")


# ---------------------------------------------------------------------------------------------------------------
# a published GGUF
# ---------------------------------------------------------------------------------------------------------------

def pull_gguf(repo: str, tag: str | None, out: str | os.PathLike | None = None, *, force: bool = False,
              delete_source: bool = False, progress: bool = True, log: Callable[[str], None] | None = None,
              revision: str | None = None, commit_files: tuple[str, dict] | None = None) -> list[str]:
    """Download the GGUF model `tag` names in `repo` (llama.cpp's choice, every part of a split model) into the
    Hub cache, each file checked against the Hub's sha256; with `out`, also place it there (a hard link where
    the file system allows, else a copy): a file name for a single file, a folder for a split model's parts.
    Returns the paths (in the cache, or at `out`), the first file first."""
    from flashlite.hub import DEFAULT_QUANT, pick_gguf

    log = log or (lambda msg: print(msg, file=sys.stderr))
    commit, files = commit_files or repo_files(repo, revision)
    wanted = pick_gguf(list(files), tag)
    if not wanted:
        raise PullError(f"pull: {repo} has no GGUF model file whose name has {tag or DEFAULT_QUANT!r} followed by "
                        f"'.' or '-'")
    targets = None
    if out is not None:
        out = Path(out)
        if len(wanted) > 1 or out.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            targets = [out / Path(n).name for n in wanted]
        else:
            targets = [out]
        for t in targets:
            if t.exists() and not force:
                raise FileExistsError(f"{t}: already exists (pass --force to overwrite)")
    elif delete_source:
        raise PullError("pull: --delete-source with a GGUF repo needs OUT (the files would be deleted from the "
                        "cache they are downloaded into)")
    total = sum(files[n].size or 0 for n in wanted)
    log(f"pulling {repo}@{commit[:12]}: {', '.join(wanted)} ({total / 1e9:.2f} GB)")
    down, conv, forward = _bars(progress, total, 0, 0)
    conv.close()
    paths = []
    try:
        for n in wanted:
            before = down.n
            paths.append(_verified(repo, files[n], commit, forward, log))
            down.update(max(0, (files[n].size or 0) - (down.n - before)))  # a file the cache held
    finally:
        down.close()
    if targets is None:
        return paths
    for src, dst in zip(paths, targets):
        _place(src, dst)
        if delete_source:
            remove_cached(src)
    return [str(t) for t in targets]


def _place(src: str, dst: Path) -> None:
    """dst becomes a hard link to (else a copy of) the cached file src, atomically."""
    from flashlite.atomic import atomic_path

    with atomic_path(dst) as tmp:
        os.unlink(tmp)
        try:
            os.link(os.path.realpath(src), tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """'org/repo[@REVISION][:QUANT]' -> (repo, revision, quant)."""
    from flashlite.hub import is_repo_id

    rest, _, tag = spec.partition(":")
    repo, _, revision = rest.partition("@")
    if not is_repo_id(repo):
        raise PullError(f"pull: expected org/repo[:QUANT], got {spec!r}")
    return repo, revision or None, tag or None
