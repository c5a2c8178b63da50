"""ACME account registrations on a local directory (part of FileStore)::

    accounts/<sha256(directory URL)[:16]>/key.pem (0600) or key.sealed, account.json directory.txt
    accounts/<id>.lock     flock()ed while registering (the CLI and the daemon never register twice)
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager
from pathlib import Path

from certd.core.clock import Clock
from certd.core.errors import StoreError
from certd import fs as fsutil
from certd.store.filekeys import KeyFiles, account_place
from certd.store.filelease import flocked


class FileAccounts:
    """The :class:`~certd.store.port.Accounts` contract under ``root``."""

    def __init__(self, root: Path, clock: Clock, dir_mode: int, gid: int, keys: KeyFiles) -> None:
        self.root = root
        self._keys = keys
        self._clock = clock
        self._dir_mode = dir_mode
        self._gid = gid

    def _account_dir(self, directory_url: str) -> Path:
        return self.root / "accounts" / hashlib.sha256(directory_url.encode()).hexdigest()[:16]

    def load_account(self, directory_url: str) -> tuple[bytes, str] | None:
        """(key PEM, registration JSON) for this ACME directory; None if not registered yet."""
        adir = self._account_dir(directory_url)
        try:
            stored_url = (adir / "directory.txt").read_text().strip()
            registration = (adir / "account.json").read_text()
        except FileNotFoundError:
            return None  # a key without a saved registration was never completed
        except OSError as e:
            raise fsutil.store_error(e, adir, "read account in") from e
        key_pem = self._keys.read(account_place(str(adir)), f"ACME account for {directory_url}")
        if key_pem is None:
            return None
        if stored_url != directory_url:
            raise StoreError(f"{adir}: belongs to {stored_url!r}, not {directory_url!r}; move the directory aside")
        return key_pem, registration

    def account_lock(self, directory_url: str, timeout: float = 60.0) -> AbstractContextManager[None]:
        """Serialize ACME account registration for ``directory_url`` across processes (the CLI
        and the daemon never register twice): an flock on ``accounts/<id>.lock``."""
        adir = self._account_dir(directory_url)
        for p in (self.root, adir.parent):
            fsutil.ensure_dir(p, 0o700 if p != self.root else self._dir_mode, gid=self._gid if p == self.root else -1)
        path = adir.parent / (adir.name + ".lock")
        busy = (f"another certd process has been registering the ACME account for {directory_url} for "
                f"{timeout:g}s (lock {path}); try again later")
        return flocked(path, self._clock, timeout, busy)

    def save_account(self, directory_url: str, key_pem: bytes, registration_json: str) -> None:
        """Key (0600) first, registration last: a saved registration always has its key."""
        adir = self._account_dir(directory_url)
        for p in (self.root, self.root / "accounts", adir):
            fsutil.ensure_dir(p, 0o700 if p != self.root else self._dir_mode,
                              gid=self._gid if p == self.root else -1)
        fsutil.atomic_write(adir / "directory.txt", directory_url.encode() + b"\n", mode=0o644)
        self._keys.write(account_place(str(adir)), key_pem)
        fsutil.atomic_write(adir / "account.json", registration_json.encode(), mode=0o600)
