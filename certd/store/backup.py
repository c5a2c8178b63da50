"""Sealed offline backups: ``certd backup export FILE`` and ``certd backup restore FILE --identity ID``.

Why age, and why the keys are plain inside it
---------------------------------------------
A backup of the state directory as it is (``tar /var/lib/certd``) is either a copy of every
private key certd ever kept (no ``[keys]``) or useless without the KEK (with ``[keys]``; and a
backup of the KEK next to it brings us back to the first case). An export instead seals the
whole store to an **age recipient** (``[keys] backup_recipient = "age1..."``): encrypting
needs only that public key, so neither the certd host nor the machine that stores the
backups can read them; only the age identity (kept offline) opens them. Inside the
encryption the keys are plain PEM, because the restoring machine has a KEK of its own (or
none): a restore re-seals every key under whatever the target's ``[keys]`` says.

Nothing plain touches a disk: the archive (:mod:`certd.store.backupformat`) is built in
memory, encrypted in memory, and written 0600 by temp file + fsync + rename. A restore reads
and checks *everything* (age's authentication, the manifest, every member's hash, every
certificate, every key against its certificate) before it writes the first file, writes only
into a state directory holding no certificate and no ACME account, keeps the original
version numbers and the desired version, and removes what it wrote if a write fails part way.

What is not in a backup: the audit log (not secret, and its hash chain belongs to the host
that wrote it: ship it with the ordinary backups; the restored directory's log starts with a
``backup_restored`` record naming the archive), rotation journals and applied versions (what
one host had deployed), an order in flight (the next renewal orders afresh), leases and locks.

pyrage (the ``keys`` extra) is imported only when a backup command runs.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certd import __version__
from certd import fs as fsutil
from certd.core.clock import Clock, isoformat
from certd.core.errors import CertdError, StoreError, UsageError
from certd.core.events import LifecycleEvent
from certd.ops.audit import AuditRefused
from certd.store import fileio
from certd.store.backupformat import (FORMAT, AccountRecord, BackupError, CertRecord, Snapshot, VersionRecord,
                                      pack, unpack)
from certd.store.files import FileStore

__all__ = ["BackupError", "Exported", "Restored", "export", "restore", "collect", "load_identities", "FORMAT"]

LOCK_WAIT = 300.0  # seconds to wait for a rotation in flight before reading that certificate
MAX_ARCHIVE = 4 << 30
NEEDS_PYRAGE = "certd backup needs pyrage: pip install 'certd[keys]'"


def age() -> Any:
    """The pyrage module; :class:`UsageError` naming the extra when it is not installed."""
    try:
        import pyrage
    except ImportError:
        raise UsageError(NEEDS_PYRAGE) from None
    return pyrage


@dataclass(frozen=True)
class Exported:
    path: Path
    certificates: int
    versions: int
    accounts: int
    size: int
    sha256: str
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Restored:
    path: Path
    certificates: int
    versions: int
    accounts: int
    origin: dict[str, Any]
    custody: str
    warnings: list[str] = field(default_factory=list)


# --- export ------------------------------------------------------------------------------------


def export(store: FileStore, path: Path, recipient: str, *, initiator: str, clock: Clock) -> Exported:
    """Seal every certificate's versions, state and desired version, and the ACME accounts, to
    ``recipient``; write ``path`` (0600, atomically). Audited as ``backup_exported``."""
    pyrage = age()
    try:
        rcpt = pyrage.x25519.Recipient.from_str(recipient)
    except pyrage.RecipientError:
        raise UsageError(f"[keys] backup_recipient {recipient!r} is not an age X25519 recipient "
                         f"(`age-keygen -y IDENTITY` prints one)") from None
    snap = collect(store)
    origin = {"created": isoformat(clock.now()), "certd_version": __version__, "source_node": store.node,
              "source_state_dir": str(store.root)}
    sealed: bytes = pyrage.encrypt(pack(snap, origin), [rcpt])
    fsutil.atomic_write(path, sealed, mode=0o600)
    digest = hashlib.sha256(sealed).hexdigest()
    counts = {"certificates": len(snap.certs), "versions": snap.version_count, "accounts": len(snap.accounts)}
    warning = _audit(store, LifecycleEvent(
        "backup_exported", "", clock.now(), initiator=initiator,
        reason=f"sealed backup of {counts['certificates']} certificates to {recipient}",
        detail={"path": str(path), **counts, "recipient": recipient, "bytes": len(sealed), "sha256": digest}))
    return Exported(path, counts["certificates"], counts["versions"], counts["accounts"], len(sealed), digest,
                    [warning] if warning else [])


def collect(store: FileStore) -> Snapshot:
    """Everything a backup carries, read through ``store`` (keys opened with its KEK); each
    certificate under its lock, so a rotation in flight is never seen half done."""
    certs = []
    for name in store.names():
        with store.lock(name, timeout=LOCK_WAIT):
            versions = []
            for v in store.versions(name):
                sv = store.load(name, v)
                versions.append(VersionRecord(v, sv.bundle, sv.meta))
            certs.append(CertRecord(name, store.desired(name), store.read_state(name)[0], versions))
    return Snapshot(certs, _accounts(store))


def _accounts(store: FileStore) -> list[AccountRecord]:
    found = []
    for entry in _account_dirs(store.root):
        try:
            url = fileio.read(f"{store.root}/accounts/{entry}/directory.txt").decode("utf-8").strip()
        except FileNotFoundError:
            continue  # a registration that never completed
        except (OSError, UnicodeDecodeError) as e:
            raise StoreError(f"{store.root}/accounts/{entry}/directory.txt: unreadable ({e})") from None
        account = store.load_account(url)
        if account is not None:
            found.append(AccountRecord(url, account[0], account[1]))
    return found


def _account_dirs(root: Path) -> list[str]:
    try:
        return sorted(e for e in os.listdir(root / "accounts") if os.path.isdir(root / "accounts" / e))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise fsutil.store_error(e, root / "accounts", "list") from e


# --- restore -----------------------------------------------------------------------------------


def restore(store: FileStore, path: Path, identity: Path, *, initiator: str, clock: Clock) -> Restored:
    """Open ``path`` with the age identity in ``identity``, check all of it, and write it into
    ``store`` (empty: no certificate, no account), keys sealed under the store's KEK (plain
    without ``[keys]``). Nothing is written when anything is wrong. Audited as ``backup_restored``."""
    pyrage = age()
    identities = load_identities(identity)
    ensure_empty(store)
    sealed = _read_archive(path)
    try:
        plain = pyrage.decrypt(sealed, identities)
    except pyrage.DecryptError as e:
        if "no matching keys" in str(e).lower():
            raise BackupError(f"{path}: the identity in {identity} does not open this backup (it was sealed to "
                              f"another recipient); give the identity whose recipient is [keys] backup_recipient "
                              f"on the machine that exported it") from None
        raise BackupError(f"{path}: cannot be decrypted ({e}): the file is damaged, was altered, or is not "
                          f"an age file; restore another copy") from None
    snap = unpack(plain, str(path))
    del plain
    _write(store, snap)
    store.keys.seal_existing()  # nothing plain was written: this only marks a sealed directory as such
    ring = store.keys.ring
    custody = f"sealed under KEK {ring.current.kek_id}" if ring else "stored unencrypted (no [keys] section)"
    counts = {"certificates": len(snap.certs), "versions": snap.version_count, "accounts": len(snap.accounts)}
    origin = {k: snap.origin.get(k) for k in ("format", "created", "certd_version", "source_node")}
    warning = _audit(store, LifecycleEvent(
        "backup_restored", "", clock.now(), initiator=initiator,
        reason=f"restored {counts['certificates']} certificates from a backup of {origin['source_node']} "
               f"made {origin['created']}",
        detail={"path": str(path), "sha256": hashlib.sha256(sealed).hexdigest(), **counts, **origin,
                "keys": custody}))
    return Restored(path, counts["certificates"], counts["versions"], counts["accounts"], origin, custody,
                    [warning] if warning else [])


def load_identities(path: Path) -> list[Any]:
    """The age X25519 identities (``AGE-SECRET-KEY-1...`` lines, as ``age-keygen`` writes them)
    in ``path``, which no other user may read; :class:`UsageError` otherwise. Errors never
    quote the file's content."""
    pyrage = age()
    try:
        st = os.stat(path)
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise UsageError(f"{path}: the age identity is accessible to other users (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 {path}")
        text = Path(path).read_text(encoding="ascii")
    except FileNotFoundError:
        raise UsageError(f"--identity {path}: no such file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not an age identity file (it is not text)") from None
    except OSError as e:
        raise UsageError(f"--identity {path}: cannot read it ({e.strerror})") from None
    identities = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line.startswith("AGE-SECRET-KEY-"):
            try:
                identities.append(pyrage.x25519.Identity.from_str(line))
            except pyrage.IdentityError:
                raise UsageError(f"{path}: line {n} is not a valid age X25519 identity") from None
    if not identities:
        raise UsageError(f"{path}: holds no AGE-SECRET-KEY- line; give the identity file age-keygen wrote")
    return identities


def ensure_empty(store: FileStore) -> None:
    """:class:`UsageError` unless ``store`` holds no certificate and no ACME account."""
    names, accounts = store.names(), _account_dirs(store.root)
    if names or accounts:
        raise UsageError(f"backup restore: {store.root} is not empty ({len(names)} certificate(s), {len(accounts)} "
                         f"ACME account(s)); restore into an empty or absent state dir ([daemon] state_dir); nothing "
                         f"was changed")


def _read_archive(path: Path) -> bytes:
    try:
        size = os.stat(path).st_size
        if size > MAX_ARCHIVE:
            raise BackupError(f"{path}: {size} bytes, more than a restore holds in memory ({MAX_ARCHIVE >> 30} GiB)")
        return fileio.read(os.fspath(path))
    except FileNotFoundError:
        raise UsageError(f"backup restore: {path}: no such file") from None
    except OSError as e:
        raise UsageError(f"backup restore: {path}: cannot read it ({e.strerror})") from None


def _write(store: FileStore, snap: Snapshot) -> None:
    """Write ``snap`` into the (checked empty) ``store``; on any failure remove what was written."""
    accounts_before = set(_account_dirs(store.root))
    written: list[str] = []
    current = "?"
    try:
        for c in snap.certs:
            current = c.name
            written.append(c.name)
            with store.lock(c.name):
                for v in c.versions:
                    store.restore_version(c.name, v.version, v.bundle, v.meta)
                if c.state is not None:
                    store.write_state(c.name, c.state, expected=None)
                if c.desired is not None:
                    store.set_desired(c.name, c.desired)
        for a in snap.accounts:
            current = f"the ACME account for {a.directory_url}"
            store.save_account(a.directory_url, a.key_pem, a.registration)
    except CertdError as e:
        _undo(store, written, accounts_before)
        raise BackupError(f"backup restore stopped at {current}: {e}; what it had written was removed (keys "
                          f"zeroed), {store.root} is as before") from e
    except BaseException:
        _undo(store, written, accounts_before)
        raise


def _undo(store: FileStore, names: list[str], accounts_before: set[str]) -> None:
    """Best effort: zero and remove what a failed restore wrote (the directory was empty before)."""
    targets = [store.root / "certs" / n for n in names]
    targets += [store.root / "accounts" / e for e in _account_dirs(store.root) if e not in accounts_before]
    for target in targets:
        try:
            fsutil.secure_rmtree(target)
        except (CertdError, OSError):
            pass  # the error being reported says what stopped; a rerun refuses a non-empty dir


def _audit(store: FileStore, ev: LifecycleEvent) -> str | None:
    """Append ``ev`` to the store's audit log; a warning line instead of a failure (the backup
    itself is done by then, and an audit log that refuses must not hide that)."""
    try:
        store.audit.append(ev)
    except (CertdError, AuditRefused) as e:
        return f"the audit log did not record {ev.kind}: {e}"
    return None
