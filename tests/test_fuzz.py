"""What flashlite reads from disk, fuzzed: every input tools/fuzz.py once saw fail is replayed, and a short run of
each target must find nothing new (the long runs, a million inputs and more, are the tool's; see
tests/fixtures/fuzz/README.md)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import fuzz  # noqa: E402

REGRESSIONS = sorted(p for p in (ROOT / "tests" / "fixtures" / "fuzz").glob("*/*") if p.parent.name in fuzz.TARGETS)


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_saved_failure_is_refused_cleanly(path, tmp_path):
    def alarm(signum, frame):
        raise fuzz.Timeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        outcome = fuzz.run_one(fuzz.Target(path.parent.name, tmp_path), path, timeout=30)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcome in ("ok", "refused"), outcome


def test_short_fuzz_of_every_target_finds_nothing(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "fuzz.py"), "all", "--inputs", "300", "--seed", "11",
                          "--save-dir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [r["target"] for r in reports] == list(fuzz.TARGETS), run.stderr[-2000:]
    for r in reports:
        assert r["n_failures"] == 0, r["failures"]
        assert r["outcomes"].get("refused", 0) > r["inputs"] // 2  # the mutations reach the checks
