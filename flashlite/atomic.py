"""Files written whole or not at all."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary path in the folder of `path` to write a file at; it replaces `path` once the block ends, or is
    removed if anything fails, so a crash never leaves half a file (for writers that open files themselves)."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.",
                               suffix=".partial")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_args):
    """A file to write that replaces `path` only once complete (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_args) as f:
        yield f
