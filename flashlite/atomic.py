"""Files written whole or not at all."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


def partial_file(path: str | os.PathLike) -> str:
    """A new empty temporary file next to `path`, named `.NAME.PID.XXXX.partial` so that a later writer of the same
    path can tell it from a live writer's (remove_stale_partials). Mode 0666 less the umask, as a plain open gives."""
    path = os.fspath(path)
    remove_stale_partials(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".partial")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the file private to its writer
    return tmp


def remove_stale_partials(path: str | os.PathLike) -> list[str]:
    """Remove the temporary files that writers of `path` killed before they could clean up (SIGKILL, power loss)
    left behind: those whose writing process is gone. Returns their names."""
    path = os.fspath(path)
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        if not (entry.startswith(f".{name}.") and entry.endswith(".partial")):
            continue
        pid = entry[len(name) + 2:].split(".", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(folder, entry))
            removed.append(entry)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary path in the folder of `path` to write a file at; it replaces `path` once the block ends, or is
    removed if anything fails, so a crash never leaves half a file (for writers that open files themselves)."""
    path = os.fspath(path)
    tmp = partial_file(path)
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
