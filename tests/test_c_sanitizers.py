"""The C core's own test (tests/c/test_core.c) built with AddressSanitizer and UndefinedBehaviorSanitizer.

It checks every SIMD kernel table this CPU runs against the generic dots, fl_matmul at every level, thread
count and odd shape against double precision, the thread pool and the error codes; any sanitizer report
fails the run.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_core_under_asan_ubsan(tmp_path):
    exe = tmp_path / "test_core"
    sources = sorted(str(p) for p in (ROOT / "csrc").rglob("*.c"))
    build = subprocess.run(
        ["gcc", "-std=gnu11", "-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
         "-fno-sanitize-recover=undefined", f"-I{ROOT / 'csrc'}", *sources, str(ROOT / "tests/c/test_core.c"),
         "-lm", "-pthread", "-o", str(exe)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    env.pop("FLASHLITE_SIMD", None)
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "runtime error" not in run.stderr, run.stderr[-4000:]
    assert run.stdout.strip().splitlines()[-1].startswith("ok: 0 failure(s)"), run.stdout[-4000:]
