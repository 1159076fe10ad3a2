"""The C core (flashlite._core, built by cffi) and the mapping of its status codes to exceptions."""
from flashlite._core import ffi, lib

_ERRORS = {
    lib.FL_EINVAL: ValueError,
    lib.FL_ETYPE: TypeError,
    lib.FL_ENOMEM: MemoryError,
    lib.FL_EIO: OSError,
}


def check(status: int, what: str) -> None:
    """Raise the exception of a C status code, with `what` naming the call and its tensor."""
    if status != lib.FL_OK:
        raise _ERRORS.get(status, RuntimeError)(f"{what}: C core returned status {status}")


__all__ = ["ffi", "lib", "check"]
