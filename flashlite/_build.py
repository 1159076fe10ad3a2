"""cffi API-mode build of the C core: csrc/flashlite.h is the whole ABI and the cdef source."""
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def _cdef_text(header: Path) -> str:
    # cdef does not run the preprocessor, so the header keeps its directives on lines of their own.
    return "\n".join(line for line in header.read_text().splitlines() if not line.lstrip().startswith("#"))


ffi = FFI()
ffi.cdef(_cdef_text(CSRC / "flashlite.h"))
ffi.set_source(
    "flashlite._core",
    '#include "flashlite.h"',
    sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.rglob("*.c"))],
    include_dirs=[str(CSRC.relative_to(ROOT))],
    extra_compile_args=["-O3", "-std=gnu11", "-pthread", "-fno-strict-aliasing", "-ffp-contract=off"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
