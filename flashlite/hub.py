"""Models from the Hugging Face Hub, through huggingface_hub's cache ($HF_HOME/hub, shared with llama.cpp and
transformers; HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE apply): `-hf org/repo[:QUANT]` for a GGUF, as llama.cpp
takes it, and `flashlite quantize org/repo` for a safetensors checkpoint."""
from __future__ import annotations

import re
from pathlib import Path

from flashlite.gguf_file import shard_number

DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's choice when -hf names no quantization
_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")


def parse_hf(spec: str) -> tuple[str, str]:
    """'org/repo[:QUANT]' -> (repo, quant; Q4_K_M when none is named)."""
    repo, _, quant = spec.partition(":")
    if not _REPO.match(repo):
        raise ValueError(f"-hf: expected org/repo[:QUANT], got {spec!r}")
    return repo, quant or DEFAULT_QUANT


def is_repo_id(text: str) -> bool:
    return bool(_REPO.match(text))


def _snapshot(repo: str, patterns: list[str], what: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise ValueError(f"{what}: cannot get {repo} from the Hugging Face Hub ({exc})") from exc


def download_checkpoint(repo: str) -> str:
    """The local folder of the safetensors checkpoint `org/repo` (weights, configs, tokenizer), downloaded into
    the Hub cache unless it is there already."""
    return str(_snapshot(repo, ["*.safetensors", "*.json", "tokenizer*"], "quantize"))


# files of a GGUF repo that are not a model: llama.cpp's gguf_filename_is_model
_NOT_MODELS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")


def _is_model(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return path.endswith(".gguf") and not any(word in name for word in _NOT_MODELS)


def pick_gguf(files: list[str], tag: str | None) -> list[str]:
    """The files of the model `tag` names among a repo's `files` (relative paths), as llama.cpp's find_best_model
    picks it: the first model file whose path has TAG followed by '.' or '-' (case-insensitive; for a split model
    its first part), trying Q4_K_M then Q8_0 when no tag is given, then any model file; with every part of a split
    model. Empty when nothing matches."""
    files = sorted(files)
    for t in [tag] if tag else [DEFAULT_QUANT, "Q8_0", None]:
        pattern = re.compile(re.escape(t) + r"[.-]", re.IGNORECASE) if t else None
        for f in files:
            if _is_model(f) and shard_number(f.rsplit("/", 1)[-1]) in (None, 1) and (
                    pattern is None or pattern.search(f)):
                m = re.match(r"^(?P<stem>.*)-00001-of-(?P<count>\d{5})\.gguf$", f)
                if not m:
                    return [f]
                count = int(m["count"])
                return [f"{m['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    return []


def _repo_files(repo: str, what: str) -> list[str]:
    """The repo's file list from the Hub, or offline (HF_HUB_OFFLINE, no network) the files of its cached
    snapshot."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return HfApi().list_repo_files(repo)
    except (OfflineModeIsEnabled, OSError, HfHubHTTPError) as exc:
        try:
            folder = Path(snapshot_download(repo, allow_patterns=["*.gguf"], local_files_only=True))
        except (LocalEntryNotFoundError, OSError):
            raise ValueError(f"{what}: cannot get {repo} from the Hugging Face Hub ({exc})") from exc
        return [p.relative_to(folder).as_posix() for p in folder.rglob("*.gguf")]


def download_gguf(spec: str) -> str:
    """The local path of the GGUF that `org/repo[:QUANT]` names (the first file of a split model; every part is
    downloaded), through the Hub cache: only the chosen model's files are fetched, and those already cached are
    not fetched again. The file is chosen as llama.cpp chooses it (pick_gguf)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, tag = spec.partition(":")
    parse_hf(spec)  # checks the form
    wanted = pick_gguf(_repo_files(repo, f"-hf {spec}"), tag or None)
    if not wanted:
        raise ValueError(f"-hf {spec}: {repo} has no GGUF model file whose name has "
                         f"{tag or DEFAULT_QUANT!r} followed by '.' or '-'")
    paths = []
    for name in wanted:
        try:
            paths.append(hf_hub_download(repo, name))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            raise ValueError(f"-hf {spec}: cannot get {name} of {repo} from the Hugging Face Hub ({exc})") from exc
    return paths[0]
