"""The C core's own tests (tests/c/test_core.c, tests/c/test_api.c) built with AddressSanitizer and UBSan.

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


C_TESTS = ("test_core.c", "test_api.c")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
@pytest.mark.parametrize("name", C_TESTS)
def test_core_under_asan_ubsan(tmp_path, name):
    exe = tmp_path / name.removesuffix(".c")
    sources = sorted(str(p) for p in (ROOT / "csrc").rglob("*.c"))
    build = subprocess.run(
        ["gcc", "-std=gnu11", "-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
         "-fno-sanitize-recover=undefined", f"-I{ROOT / 'csrc'}", *sources, str(ROOT / "tests" / "c" / name),
         "-lm", "-pthread", "-o", str(exe)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    env.pop("FLASHLITE_SIMD", None)
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "runtime error" not in run.stderr, run.stderr[-4000:]
    assert run.stdout.strip().splitlines()[-1].startswith("ok: 0 failure(s)"), run.stdout[-4000:]


def test_every_function_of_the_abi_runs_under_the_sanitizers():
    """Every function flashlite.h declares is called by one of the C tests above."""
    from flashlite._native import lib

    functions = {name for name in dir(lib) if name.startswith("fl_") and callable(getattr(lib, name))}
    assert len(functions) > 30
    called = set()
    for name in C_TESTS:
        text = (ROOT / "tests" / "c" / name).read_text()
        called |= {f for f in functions if f"{f}(" in text}
    assert functions - called == set()
