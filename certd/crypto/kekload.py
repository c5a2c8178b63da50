"""``[keys]`` -> the :class:`~certd.crypto.custody.KeyRing` the store seals and opens keys with.

The KEK comes from exactly one source: ``kek_file``, a systemd credential (``kek_credential``,
read from ``$CREDENTIALS_DIRECTORY`` so the file need not be readable by certd's user outside
the service), or a PKCS#11 token (``kek``, :mod:`certd.crypto.pkcs11kek`). ``old_kek_files``
are accepted for opening only. ``certd kek init`` creates a KEK file (:func:`create_kek_file`).
"""

from __future__ import annotations

import os
from pathlib import Path

from certd.config.schema import KeysConfig
from certd.core.errors import UsageError
from certd.crypto.custody import CustodyError, FileKek, Kek, KeyRing, new_kek_secret
from certd import fs as fsutil


def load_kek(keys: KeysConfig) -> Kek:
    """The configured (current) KEK; :class:`CustodyError` with what to fix."""
    if keys.kek is not None:
        return load_source(keys, keys.kek)
    if keys.kek_credential is not None:
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if not cred_dir:
            raise CustodyError(f"[keys] kek_credential = {keys.kek_credential!r}, but $CREDENTIALS_DIRECTORY is not "
                               f"set: "
                               f"add LoadCredential={keys.kek_credential}:/etc/certd/kek to certd.service, or use "
                               f"kek_file outside systemd")
        return FileKek.load(Path(cred_dir) / keys.kek_credential)
    assert keys.kek_file is not None  # the parser guarantees one source
    return FileKek.load(keys.kek_file)


def load_source(keys: KeysConfig, source: str) -> Kek:
    """A KEK named by a path or a ``pkcs11:`` URI (on the configured module and PIN): what
    ``certd kek rotate --new`` takes and the rotation record keeps."""
    if source.startswith("pkcs11:"):
        from certd.crypto.pkcs11kek import Pkcs11Kek  # type: ignore[import-not-found,unused-ignore]  # an extra
        if keys.pkcs11_module is None or keys.pkcs11_pin_file is None:
            raise CustodyError(f"{source}: a PKCS#11 KEK needs pkcs11_module and pkcs11_pin_file in [keys]")
        return Pkcs11Kek.open(source, keys.pkcs11_module, keys.pkcs11_pin_file)
    return FileKek.load(Path(source))


def generate_token_kek(keys: KeysConfig) -> Kek:
    """``certd kek init`` with ``kek = "pkcs11:..."``: generate the AES KEK on the token,
    non-extractable (refused if the object exists)."""
    from certd.crypto.pkcs11kek import Pkcs11Kek  # type: ignore[import-not-found,unused-ignore]  # an extra
    if keys.kek is None or keys.pkcs11_module is None or keys.pkcs11_pin_file is None:
        raise CustodyError("kek init on a token needs kek = \"pkcs11:...\", pkcs11_module and pkcs11_pin_file "
                           "in [keys]")
    kek: Kek = Pkcs11Kek.generate(keys.kek, keys.pkcs11_module, keys.pkcs11_pin_file)
    return kek


def load_keyring(keys: KeysConfig) -> KeyRing:
    """The current KEK plus every readable ``old_kek_files`` entry. An old KEK file that is gone
    is skipped (the operator destroyed it after a rotation): opening a key still sealed under it
    then fails naming that KEK."""
    current = load_kek(keys)
    old: list[Kek] = []
    for path in keys.old_kek_files:
        try:
            old.append(FileKek.load(path))
        except CustodyError:
            if os.path.lexists(path):
                raise
    return KeyRing(current, old)


def create_kek_file(path: Path, *, owner_like: Path | None = None) -> str:
    """Write 32 random bytes to a new file ``path`` (0600 from the first byte; refused if it
    exists: overwriting a KEK would lose every key sealed under it). As root, the file is given
    to the owner of ``owner_like`` (the state directory: certd's user). Returns the KEK id."""
    secret = new_kek_secret()
    if os.path.lexists(path):
        raise UsageError(f"{path} already exists; a KEK is never overwritten (every key sealed under it would be "
                           f"lost): choose another file, e.g. {path}.new, and rotate with `certd kek rotate --new`")
    if not path.parent.is_dir():
        raise UsageError(f"directory {path.parent} does not exist; create it (root-owned, 0755) first")
    uid = gid = -1
    if owner_like is not None and os.geteuid() == 0:
        try:
            st = os.stat(owner_like)
            uid, gid = st.st_uid, st.st_gid
        except FileNotFoundError:
            pass
    fsutil.atomic_write(path, secret, mode=0o600, uid=uid, gid=gid)
    return FileKek(secret, str(path)).kek_id
