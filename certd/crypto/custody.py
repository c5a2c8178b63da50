"""Keys at rest: envelope encryption under a key-encryption key (KEK).

Every private key certd stores (each version's key, the ACME account keys, the key of an order
in flight) is sealed on its own::

    data key (DEK)   32 random bytes, one per sealed key, never stored in plain text
    ciphertext       AES-256-GCM(DEK, nonce, key PEM, aad = format | slot)
    wrapped DEK      the KEK's wrap(DEK, aad = format | slot): AES-256-GCM under a KEK file, or
                     inside a PKCS#11 token (certd.crypto.pkcs11kek) where the KEK never leaves it

and stored as one line of JSON (:func:`is_sealed` tells it from a PEM key)::

    {"format": "certd-sealed-key/1", "kek": "<KEK id>", "slot": "version/www/3",
     "wrapped_dek": "<b64>", "nonce": "<b64>", "ciphertext": "<b64>"}

The *slot* (certificate name and version, account id, order) is authenticated twice, so a sealed
key copied into another slot fails to open instead of serving the wrong key. The KEK id says
which KEK to unwrap with; a KEK rotation re-wraps the DEK (:meth:`KeyRing.rewrap`) and never
touches the ciphertext, so no key is ever written in plain text while it runs. Destroying a
sealed key (overwriting the file) destroys its only wrapped DEK: crypto-shredding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from certd.core.errors import StoreError

FORMAT = "certd-sealed-key/1"
KEK_BYTES = 32
_MAGIC = b'{"format": "certd-sealed-key/'


class CustodyError(StoreError):
    """A sealed key cannot be opened or sealed: the KEK is missing, wrong, or unreachable. The
    message names the KEK and what to configure; nothing was written."""

    transient = False


class Kek(Protocol):
    """A key-encryption key: wraps and unwraps data keys, with associated data."""

    @property
    def kek_id(self) -> str:
        """Stable, public name of this KEK (never derived reversibly from its secret)."""
        ...

    def wrap(self, dek: bytes, aad: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        """The DEK; :class:`CustodyError` when ``wrapped`` was not made by this KEK for ``aad``."""
        ...


class FileKek:
    """A KEK of 32 random bytes read from a file (``certd kek init``), or from a systemd
    credential. Wraps with AES-256-GCM: ``nonce(12) || ciphertext || tag``."""

    def __init__(self, secret: bytes, source: str = "") -> None:
        if len(secret) != KEK_BYTES:
            raise CustodyError(f"{source or 'KEK'}: holds {len(secret)} bytes, a KEK is exactly {KEK_BYTES} random "
                               f"bytes; create one with `certd kek init`")
        self._aead = AESGCM(secret)
        self.source = source
        self._id = "file:" + hashlib.sha256(b"certd kek id\0" + secret).hexdigest()[:16]

    @property
    def kek_id(self) -> str:
        return self._id

    @classmethod
    def load(cls, path: Path) -> FileKek:
        secret = read_secret_file(path, "KEK file", "every stored key",
                                  "create it with `certd kek init` (or restore it from where you keep it)",
                                  limit=KEK_BYTES + 1)
        return cls(secret, str(path))

    def wrap(self, dek: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, dek, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:12], wrapped[12:], aad)
        except (InvalidTag, ValueError):
            raise CustodyError(f"the data key does not unwrap under KEK {self._id} ({self.source}): the KEK file "
                               f"was replaced or the sealed key was altered") from None


def read_secret_file(path: Path, what: str, unlocks: str, if_missing: str, limit: int = 4096) -> bytes:
    """The bytes of a secret file (a KEK, a PIN), refused with one actionable line when it is
    missing, unreadable, or accessible to other users (it unlocks ``unlocks``)."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read(limit)
    except FileNotFoundError:
        raise CustodyError(f"{what} {path} does not exist; {if_missing}") from None
    except OSError as e:
        raise CustodyError(f"{what} {path}: cannot read it ({e.strerror}); it must be readable by certd's "
                           f"user only") from None
    if st.st_mode & 0o077:
        raise CustodyError(f"{what} {path} is accessible to other users (mode {st.st_mode & 0o777:04o}); it "
                           f"unlocks {unlocks}: chmod 600 {path}")
    return data


def new_kek_secret() -> bytes:
    return os.urandom(KEK_BYTES)


@dataclass(frozen=True)
class Sealed:
    """A parsed sealed key."""

    kek: str
    slot: str
    wrapped_dek: bytes
    nonce: bytes
    ciphertext: bytes

    def to_bytes(self) -> bytes:
        b64 = (lambda b: base64.b64encode(b).decode())  # noqa: E731
        doc = {"format": FORMAT, "kek": self.kek, "slot": self.slot, "wrapped_dek": b64(self.wrapped_dek),
               "nonce": b64(self.nonce), "ciphertext": b64(self.ciphertext)}
        return json.dumps(doc).encode() + b"\n"

    @classmethod
    def parse(cls, data: bytes, where: str = "sealed key") -> Sealed:
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise CustodyError(f"{where}: format {doc.get('format')!r} is not {FORMAT!r}; a newer certd wrote "
                                   f"it, or it is not a sealed key")
            b64 = (lambda k: base64.b64decode(doc[k], validate=True))  # noqa: E731
            return cls(str(doc["kek"]), str(doc["slot"]), b64("wrapped_dek"), b64("nonce"), b64("ciphertext"))
        except CustodyError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            raise CustodyError(f"{where}: corrupt sealed key (not {FORMAT} JSON); restore it from a backup "
                               f"(`certd backup restore`) or remove the version") from None


def is_sealed(data: bytes) -> bool:
    return data.lstrip().startswith(_MAGIC)


def _aad(slot: str) -> bytes:
    return f"{FORMAT}|{slot}".encode()


class KeyRing:
    """The KEK that seals new keys plus the older KEKs still accepted for opening them.

    ``seal`` always uses :attr:`current`; ``open`` and ``rewrap`` pick the KEK by the id
    recorded in the sealed key, and say which KEK to configure when it is not in the ring.
    """

    def __init__(self, current: Kek, accepted: Iterable[Kek] = ()) -> None:
        self.current = current
        self._by_id: dict[str, Kek] = {current.kek_id: current}
        for k in accepted:
            self._by_id.setdefault(k.kek_id, k)

    @property
    def kek_ids(self) -> list[str]:
        return list(self._by_id)

    def kek(self, kek_id: str) -> Kek:
        """The KEK with this id (KeyError if it is not in the ring)."""
        return self._by_id[kek_id]

    def with_current(self, kek: Kek) -> KeyRing:
        """This ring sealing under ``kek`` from now on, still opening everything it could."""
        return KeyRing(kek, [k for k in self._by_id.values() if k.kek_id != kek.kek_id])

    def seal(self, key_pem: bytes, slot: str) -> bytes:
        dek = os.urandom(32)
        nonce = os.urandom(12)
        ciphertext = AESGCM(dek).encrypt(nonce, key_pem, _aad(slot))
        wrapped = self.current.wrap(dek, _aad(slot))
        return Sealed(self.current.kek_id, slot, wrapped, nonce, ciphertext).to_bytes()

    def open(self, data: bytes, slot: str, where: str = "sealed key") -> bytes:
        sealed = Sealed.parse(data, where)
        if sealed.slot != slot:
            raise CustodyError(f"{where}: sealed for {sealed.slot!r}, found in {slot!r}; a sealed key cannot be "
                               f"moved to another certificate, version or account")
        dek = self._kek(sealed.kek, where).unwrap(sealed.wrapped_dek, _aad(slot))
        try:
            return AESGCM(dek).decrypt(sealed.nonce, sealed.ciphertext, _aad(slot))
        except (InvalidTag, ValueError):
            raise CustodyError(f"{where}: the key does not decrypt (altered ciphertext); restore it from a "
                               f"backup") from None

    def rewrap(self, data: bytes, slot: str, where: str = "sealed key") -> bytes | None:
        """The same sealed key with its DEK wrapped under :attr:`current`; None if it already is.
        The ciphertext is kept as it is: the key never exists in plain text here."""
        sealed = Sealed.parse(data, where)
        if sealed.kek == self.current.kek_id:
            return None
        if sealed.slot != slot:
            raise CustodyError(f"{where}: sealed for {sealed.slot!r}, found in {slot!r}; not re-wrapping it")
        dek = self._kek(sealed.kek, where).unwrap(sealed.wrapped_dek, _aad(slot))
        wrapped = self.current.wrap(dek, _aad(slot))
        return Sealed(self.current.kek_id, slot, wrapped, sealed.nonce, sealed.ciphertext).to_bytes()

    def _kek(self, kek_id: str, where: str) -> Kek:
        try:
            return self._by_id[kek_id]
        except KeyError:
            raise CustodyError(f"{where}: sealed under KEK {kek_id}, which is not configured (configured: "
                               f"{', '.join(self._by_id)}); add its file to [keys] old_kek_files") from None


def sealed_kek(data: bytes) -> str | None:
    """The KEK id a sealed key names (None for a plain key or garbage): for status and rotation."""
    if not is_sealed(data):
        return None
    try:
        return Sealed.parse(data).kek
    except CustodyError:
        return None
