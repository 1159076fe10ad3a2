"""`flashlite pull` against a Hub stand-in on 127.0.0.1 (tests/hub_server.py, HF_ENDPOINT): a synthetic release-
layout checkpoint (one shard per layer) quantized while it downloads through a throttled link that drops a
connection in the middle of a shard and damages another; resumed after a SIGKILL; shards deleted as they are done;
offline from the cache; and a published GGUF repo. Each pull runs as the command, in a process of its own."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from flashlite.cli import main
from hub_server import FakeHub

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_synthetic  # noqa: E402

REPO, GGUF_REPO = "deepseek-test/syn", "deepseek-test/syn-GGUF"
TYPE = "q4_k-q8_0"  # a recipe whose conversion takes time, so that overlapping it with the download shows
SHARDS = [f"model-{i:05d}-of-00007.safetensors" for i in range(1, 8)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(the checkpoint folder, named as the repo so that general.name agrees, and its GGUF by flashlite quantize)."""
    folder = tmp_path_factory.mktemp("ckpt") / "syn"
    make_synthetic.write_checkpoint(folder, "tiny", n_layers=6, n_experts=8, seed=3)
    ref = folder.parent / "ref.gguf"
    result = CliRunner().invoke(main, ["quantize", str(folder), str(ref), "--type", TYPE, "--quiet"])
    assert result.exit_code == 0, result.output
    return folder, ref


@pytest.fixture
def hub(checkpoint, tmp_path):
    with FakeHub({REPO: checkpoint[0]}) as server:
        yield server


def _env(hub, home, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


def _pull(hub, home, *args, **env):
    return subprocess.run([sys.executable, "-m", "flashlite.cli", "pull", *args], capture_output=True, text=True,
                          env=_env(hub, home, **env), timeout=180)


def _snapshot(home, repo=REPO):
    return next((Path(home) / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots").iterdir())


def _timings(stderr: str) -> dict:
    m = re.search(r"in ([\d.]+) s \(plan ([\d.]+) s, download ([\d.]+) s, then ([\d.]+) s after the last shard "
                  r"landed; conversion ([\d.]+) s in all", stderr)
    assert m, stderr
    return dict(zip(("wall", "plan", "download", "after_last", "convert"), map(float, m.groups())))


def test_pull_quantizes_while_it_downloads(hub, checkpoint, tmp_path):
    """Throttled to 2 MB/s, shard 3's connection dropped half way (huggingface_hub resumes it with a ranged
    request), shard 5 served damaged once (its sha256 is not the Hub's: downloaded again): the GGUF is byte for
    byte flashlite quantize's, and the pull takes the download plus the conversion of the last shard."""
    folder, ref = checkpoint
    rate = 2e6
    hub.bandwidth.rate = rate
    hub.drop_once.add(SHARDS[2])
    hub.corrupt[SHARDS[4]] = 1
    out = tmp_path / "syn.gguf"
    result = _pull(hub, tmp_path / "hf", REPO, str(out), "--type", TYPE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert out.read_bytes() == ref.read_bytes()
    assert f"{SHARDS[4]}: sha256" in result.stderr and "downloading it again" in result.stderr
    size = {n: (folder / n).stat().st_size for n in SHARDS}
    assert hub.served[SHARDS[2]] >= size[SHARDS[2]] * 1.5  # the half before the drop, then the rest
    assert hub.served[SHARDS[4]] >= size[SHARDS[4]] * 2  # damaged, then again
    assert not list(tmp_path.glob(".syn.gguf.pull-*"))  # the state and the partial file are gone
    t = _timings(result.stderr)
    sent = sum(hub.served.values())
    print(f"\npull of {sent / 1e6:.1f} MB at {rate / 1e6:.0f} MB/s: {t['wall']:.2f} s = plan {t['plan']:.2f} + "
          f"download {t['download']:.2f} + after the last shard {t['after_last']:.2f} s; the conversion took "
          f"{t['convert']:.2f} s in all (download then convert: {t['plan'] + t['download'] + t['convert']:.2f} s)")
    # the conversion hides behind the download: after the download, only the last shard's is left
    assert t["wall"] <= t["plan"] + t["download"] + t["after_last"] + 0.3
    assert t["after_last"] < 0.5 * t["convert"] + 0.3
    # and does not slow the download (the link's time for what was sent, plus the one-second retry pause)
    assert t["download"] <= sent / rate * 1.25 + 1.5


def test_pull_goes_on_after_a_kill(hub, checkpoint, tmp_path):
    """SIGKILL after the third shard is converted: OUT does not exist, the state file says which shards are done;
    the same command goes on from the first shard not converted, without fetching the others again."""
    _, ref = checkpoint
    hub.bandwidth.rate = 1e6
    out = tmp_path / "syn.gguf"
    env = _env(hub, tmp_path / "hf")
    proc = subprocess.Popen([sys.executable, "-m", "flashlite.cli", "pull", REPO, str(out), "--type", TYPE],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith(f"converted {SHARDS[2]}"):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    assert any(x.startswith(f"converted {SHARDS[2]}") for x in lines), "".join(lines)
    assert not out.exists()
    state = json.loads((tmp_path / ".syn.gguf.pull-state.json").read_text())
    done = state["done"]
    assert SHARDS[:3] == done[:3] and len(done) < 7
    before = dict(hub.served)
    hub.bandwidth.rate = None
    result = _pull(hub, tmp_path / "hf", REPO, str(out), "--type", TYPE)
    assert result.returncode == 0, result.stderr
    assert f"resuming: {len(done)} of 7 shards" in result.stderr
    assert out.read_bytes() == ref.read_bytes()
    for name in done:
        assert hub.served.get(name) == before.get(name), name  # not fetched again


def test_a_shard_damaged_twice_stops_the_pull_and_the_next_run_goes_on(hub, checkpoint, tmp_path):
    _, ref = checkpoint
    hub.corrupt[SHARDS[1]] = 2
    out = tmp_path / "syn.gguf"
    result = _pull(hub, tmp_path / "hf", REPO, str(out), "--type", TYPE, "--quiet")
    assert result.returncode != 0
    assert f"{SHARDS[1]} of {REPO} has sha256" in result.stderr and "after downloading it twice" in result.stderr
    assert "1 converted shard(s) are recorded in" in result.stderr
    assert not out.exists() and not (_snapshot(tmp_path / "hf") / SHARDS[1]).exists()  # the bad copy is gone
    result = _pull(hub, tmp_path / "hf", REPO, str(out), "--type", TYPE, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "resuming: 1 of 7 shards" in result.stderr
    assert out.read_bytes() == ref.read_bytes()


def test_delete_source_keeps_about_one_shard_on_disk(hub, checkpoint, tmp_path):
    """--delete-source: each shard leaves the cache once converted; at no time are more than two whole shards
    there (the one being converted and the next one)."""
    _, ref = checkpoint
    hub.bandwidth.rate = 4e6
    home = tmp_path / "hf"
    blobs = home / "hub" / ("models--" + REPO.replace("/", "--")) / "blobs"
    most, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            try:
                n = sum(1 for b in os.listdir(blobs) if re.fullmatch(r"[0-9a-f]{64}", b))
            except OSError:
                n = 0
            most[0] = max(most[0], n)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = _pull(hub, home, REPO, str(tmp_path / "syn.gguf"), "--type", TYPE, "--delete-source", "--quiet")
    finally:
        stop.set()
        watcher.join()
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "syn.gguf").read_bytes() == ref.read_bytes()
    assert 1 <= most[0] <= 2, most[0]
    assert not list(_snapshot(home).glob("*.safetensors"))
    assert not [b for b in os.listdir(blobs) if re.fullmatch(r"[0-9a-f]{64}", b)]
    assert (_snapshot(home) / "config.json").exists()


def test_offline_pull_reads_the_cache(hub, checkpoint, tmp_path):
    """With HF_HUB_OFFLINE=1 a pull of a cached checkpoint makes no request: the file list and the sha256 come
    from the cache (its blobs are named by their sha256)."""
    _, ref = checkpoint
    home = tmp_path / "hf"
    assert _pull(hub, home, REPO, str(tmp_path / "a.gguf"), "--type", TYPE, "--quiet").returncode == 0
    requests = len(hub.log)
    result = _pull(hub, home, REPO, str(tmp_path / "b.gguf"), "--type", TYPE, "--quiet", HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert len(hub.log) == requests
    assert (tmp_path / "b.gguf").read_bytes() == ref.read_bytes()
    missing = _pull(hub, tmp_path / "empty", REPO, str(tmp_path / "c.gguf"), HF_HUB_OFFLINE="1")
    assert missing.returncode != 0 and "not in the Hub cache" in missing.stderr


def test_pull_errors_name_the_problem(hub, tmp_path):
    result = _pull(hub, tmp_path / "hf", "deepseek-test/absent", str(tmp_path / "x.gguf"))
    assert result.returncode != 0 and "deepseek-test/absent is not on the Hub" in result.stderr
    (tmp_path / "x.gguf").write_bytes(b"")
    result = _pull(hub, tmp_path / "hf", REPO, str(tmp_path / "x.gguf"))
    assert result.returncode != 0 and "already exists (pass --force" in result.stderr
    result = _pull(hub, tmp_path / "hf", "not a repo")
    assert result.returncode != 0 and "expected org/repo" in result.stderr


def test_pull_of_a_gguf_repo_downloads_and_checks_the_file(checkpoint, tmp_path):
    """org/repo:QUANT takes the file llama.cpp's -hf would (and Q4_K_M, else Q8_0, without a tag), resumed after
    a dropped connection and downloaded again when damaged, and places it at OUT."""
    _, ref = checkpoint
    repo = tmp_path / "gguf-repo"
    (repo / "Q8_0").mkdir(parents=True)
    shutil.copy(ref, repo / "Q8_0" / "syn-Q8_0.gguf")
    (repo / "syn-Q4_K_M.gguf").write_bytes(ref.read_bytes()[::-1])
    (repo / "README.md").write_text("a GGUF repo\n")
    with FakeHub({GGUF_REPO: repo}, rate=8e6) as hub:
        hub.drop_once.add("Q8_0/syn-Q8_0.gguf")
        hub.corrupt["Q8_0/syn-Q8_0.gguf"] = 1
        out = tmp_path / "model.gguf"
        result = _pull(hub, tmp_path / "hf", f"{GGUF_REPO}:q8_0", str(out))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(out)
        assert out.read_bytes() == ref.read_bytes()
        assert "downloading it again" in result.stderr
        cached = _snapshot(tmp_path / "hf", GGUF_REPO) / "Q8_0" / "syn-Q8_0.gguf"
        assert cached.read_bytes() == ref.read_bytes()
        moved = tmp_path / "moved"
        moved.mkdir()
        result = _pull(hub, tmp_path / "hf", f"{GGUF_REPO}:Q8_0", str(moved), "--delete-source", "--quiet")
        assert result.returncode == 0, result.stderr
        assert (moved / "syn-Q8_0.gguf").read_bytes() == ref.read_bytes() and not cached.exists()
        result = _pull(hub, tmp_path / "hf", GGUF_REPO, "--quiet")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("syn-Q4_K_M.gguf")
        assert "README.md" not in [p[1].rsplit("/", 1)[-1] for p in hub.log]
        result = _pull(hub, tmp_path / "hf", f"{GGUF_REPO}:Q8_0", str(tmp_path / "y.gguf"), "--type", "q4_k")
        assert result.returncode != 0 and "--type, --tensor-type and --imatrix apply to safetensors" in result.stderr
        result = _pull(hub, tmp_path / "hf", f"{GGUF_REPO}:IQ1_S")
        assert result.returncode != 0 and "no GGUF model file whose name has 'IQ1_S'" in result.stderr
