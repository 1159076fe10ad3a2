"""Files written whole or not at all."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_args):
    """A file to write that replaces `path` only once complete: it is written under a temporary name in the same
    folder and renamed over path at the end, or removed if anything fails, so a crash never leaves half a file."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.",
                               suffix=".partial")
    try:
        with os.fdopen(fd, mode, **open_args) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
