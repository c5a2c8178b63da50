"""OSError -> one actionable StoreError line; the temporary names certd writes under.

See :mod:`certd.fs` for the rules."""

from __future__ import annotations

import errno
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from certd.core.errors import StoreError


TMP_INFIX = ".tmp-"


_HINTS = {
    errno.ENOSPC: "the filesystem is full; free some space",
    errno.EDQUOT: "the disk quota is exhausted; free some space or raise the quota",
    errno.EROFS: "the filesystem is mounted read-only",
    errno.EACCES: "permission denied; check the owner and mode of the directory",
    errno.EPERM: "operation not permitted; check the owner, mode and attributes (chattr) of the directory",
}


def temp_name(final_name: str) -> str:
    """The hidden name a temporary file for ``final_name`` gets in the same directory."""
    return f".{final_name}{TMP_INFIX}{secrets.token_hex(6)}"


def store_error(err: OSError, path: Path | str, action: str = "write") -> StoreError:
    """``cannot write /etc/ssl/x/privkey.pem: No space left on device (the filesystem is full...)``."""
    reason = err.strerror or str(err)
    hint = _HINTS.get(err.errno or 0)
    return StoreError(f"cannot {action} {path}: {reason}" + (f" ({hint})" if hint else ""))


@contextmanager
def os_errors(path: Path | str, action: str = "write") -> Iterator[None]:
    """Turn an ``OSError`` raised in the block into :class:`StoreError` about ``path``."""
    try:
        yield
    except OSError as e:
        raise store_error(e, path, action) from e
