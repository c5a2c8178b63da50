"""A parsed-config cache for read-only commands (``certd status`` without a daemon): the
validated :class:`Config` of the file's last load, kept in the state directory and keyed by the
file's identity (path, device, inode, size, mtime, ctime) and by certd's code, so 10,000
certificate tables are parsed and validated once per edit of the file instead of per command.

What it does not do, by design: re-check the world the validation looked at (hook executables
on PATH, secret files' modes, users and groups). ``check-config`` and ``run`` always load the
file afresh (:func:`certd.config.loading.load`) and report every problem exactly as before;
only read-only commands use :func:`load_for_reading`. A config holding a secret (any field
declared ``repr=False``, e.g. an EAB HMAC key or a bearer token) is never cached: the state
directory must not become a second home of a credential.

The file is owner-only (0600, refused when another user owns it or group/others may touch it),
replaced atomically by rename and not fsynced: a torn or lost cache only costs one full load.
It is decoded by an unpickler that builds nothing but certd's config types and a few value types.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import os
import pickle
import stat
import sys
from pathlib import Path
from typing import Any

import certd
from certd.config import loading
from certd.config.schema import Config, DaemonConfig

CACHE_NAME = "config.cache"
_MAGIC = b"certd-config-cache-1\n"
_DIGEST = 32
# What a cached Config may be built of: certd's config types (checked by module) and these.
_VALUE_TYPES = {("pathlib", "PosixPath"), ("pathlib", "Path"), ("datetime", "timedelta"),
                ("datetime", "timezone"), ("datetime", "datetime"), ("builtins", "frozenset"),
                ("builtins", "set"), ("ipaddress", "IPv4Address"), ("ipaddress", "IPv6Address"),
                ("certd.core.policy", "RenewBefore"), ("copyreg", "_reconstructor"), ("builtins", "object"),
                ("certd.core.release", "Rollout")}

_code_id: bytes | None = None


def code_identity() -> bytes:
    """A digest of certd's own source files (name, size, mtime) and Python's version: a cache
    written by another certd (an upgrade, an edit of the tree) is never read. ~1 ms."""
    global _code_id
    if _code_id is None:
        h = hashlib.sha256(f"{certd.__name__} {sys.version} {sys.implementation.cache_tag}".encode())
        root = Path(certd.__file__).parent
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(f for f in filenames if f.endswith(".py")):
                full = os.path.join(dirpath, name)
                st = os.stat(full)
                h.update(f"{os.path.relpath(full, root)} {st.st_size} {st.st_mtime_ns}\n".encode())
        _code_id = h.digest()
    return _code_id


def read_private(path: Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file of this process's user that group and
    others cannot touch (a cache written by another user is foreign), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError:
        return None
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> bool:
    """Replace ``path`` by ``data`` (0600 from the first byte, temp file + rename, no fsync:
    a cache lost to a crash is rebuilt). False when it cannot be written (a read-only state
    directory, a full disk): the caller carries on without it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def seal(payload: bytes) -> bytes:
    """``payload`` framed so that a torn or altered file is recognised (magic + SHA-256)."""
    return _MAGIC + hashlib.sha256(payload).digest() + payload


def unseal(blob: bytes | None) -> bytes | None:
    """The payload :func:`seal` framed, or None when ``blob`` is not one whole such frame."""
    if blob is None or not blob.startswith(_MAGIC):
        return None
    digest, payload = blob[len(_MAGIC):len(_MAGIC) + _DIGEST], blob[len(_MAGIC) + _DIGEST:]
    return payload if hashlib.sha256(payload).digest() == digest else None


class _ConfigUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module.startswith("certd.config.") and isinstance(getattr(sys.modules.get(module), name, None), type)) \
                or (module, name) in _VALUE_TYPES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a config type")


def _decode(payload: bytes) -> tuple[Any, ...] | None:
    paused = gc.isenabled()
    gc.disable()  # 10,000 configs' objects would trigger collections that find nothing: half the time
    try:
        found = _ConfigUnpickler(io.BytesIO(payload)).load()
    except Exception:  # noqa: BLE001 - any undecodable cache is only a miss
        return None
    finally:
        if paused:
            gc.enable()
    return found if isinstance(found, tuple) and len(found) == 3 else None


def peek_state_dir(path: Path) -> Path:
    """The state directory ``path`` names, from its ``[daemon]`` table alone (as the parser
    resolves it); the default when it cannot tell."""
    try:
        raw = loading._daemon_table(path.read_text("utf-8")).get("state_dir")
    except (OSError, UnicodeDecodeError, ValueError):
        raw = None
    if not isinstance(raw, str) or not raw:
        return DaemonConfig.state_dir
    p = Path(raw).expanduser()
    return p if p.is_absolute() else path.resolve().parent / p


def has_secret(value: Any) -> bool:
    """Whether any field declared ``repr=False`` (the schema's mark of a secret) is set."""
    if isinstance(value, (tuple, list)):
        return any(has_secret(v) for v in value)
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return False
    return any((not f.repr and getattr(value, f.name)) or has_secret(getattr(value, f.name))
               for f in dataclasses.fields(value))


def load_for_reading(path: Path) -> Config:
    """The configuration in ``path`` for a command that changes nothing: from the cache when it
    was validated in this very version of the file by this certd, else :func:`loading.load`
    (which raises ConfigError with every problem) and the cache refreshed."""
    try:
        source = loading.file_identity(path, os.stat(path))
    except OSError:
        return loading.load(path)  # it says what is wrong with the path
    cache = peek_state_dir(path) / CACHE_NAME
    found = _decode(unseal(read_private(cache)) or b"")
    if found is not None and found[0] == code_identity() and found[1] == source and isinstance(found[2], Config):
        return found[2]
    config = loading.load(path)
    # A fleet node's status reads the database, not the state dir, and its state dir is not its
    # store: the cache is for a single host only (nothing is written there for [cluster]).
    if config.source == source and config.daemon.state_dir / CACHE_NAME == cache and not has_secret(config) \
            and config.cluster is None and _owned(config.daemon.state_dir):
        write_private(cache, seal(pickle.dumps((code_identity(), source, config), protocol=pickle.HIGHEST_PROTOCOL)))
    return config


def _owned(directory: Path) -> bool:
    """Only the state directory's owner writes caches there (as root, certd would leave files
    the daemon's user finds foreign)."""
    try:
        return os.stat(directory).st_uid == os.geteuid()
    except OSError:
        return False
