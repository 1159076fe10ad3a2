"""Models from the Hugging Face Hub, through huggingface_hub's cache ($HF_HOME/hub, shared with llama.cpp and
transformers; HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE apply): `-hf org/repo[:QUANT]` for a GGUF, as llama.cpp
takes it, and `flashlite quantize org/repo` for a safetensors checkpoint."""
from __future__ import annotations

import re
from pathlib import Path

from flashlite.gguf_model import shard_number

DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's choice when -hf names no quantization
_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")


def parse_hf(spec: str) -> tuple[str, str]:
    """'org/repo[:QUANT]' -> (repo, quant)."""
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


def download_gguf(spec: str) -> str:
    """The local path of the GGUF that `org/repo[:QUANT]` names (the first file of a split model), downloaded
    into the Hub cache unless it is there already. The quantization is matched case-insensitively in file and
    folder names, as llama.cpp does."""
    repo, quant = parse_hf(spec)
    folder = _snapshot(repo, [f"*{q}*.gguf" for q in {quant, quant.lower(), quant.upper()}], f"-hf {spec}")
    found = sorted(p for p in folder.rglob("*.gguf") if quant.lower() in p.relative_to(folder).as_posix().lower())
    firsts = [p for p in found if shard_number(p.name) in (None, 1)]
    if not firsts:
        raise ValueError(f"-hf {spec}: {repo} has no GGUF file whose name contains {quant!r}")
    if len(firsts) > 1:
        names = ", ".join(p.relative_to(folder).as_posix() for p in firsts)
        raise ValueError(f"-hf {spec}: {quant!r} matches several models in {repo} ({names}); name one exactly")
    return str(firsts[0])
