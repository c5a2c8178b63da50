"""The archive inside a sealed backup, format ``certd-backup/1``: build it, read it back, check it.

The plain archive is a gzip'd tar that only ever exists in memory (the age encryption around
it is :mod:`certd.store.backup`'s business)::

    manifest.json                                  what is in it; read first
    certs/<name>/state.json                        renewal bookkeeping, when there is any
    certs/<name>/versions/NNNN/cert.pem            the leaf
    certs/<name>/versions/NNNN/chain.pem           intermediates
    certs/<name>/versions/NNNN/privkey.pem         PEM, plain inside the encryption (absent: key destroyed)
    certs/<name>/versions/NNNN/meta.json           the version's metadata
    accounts/<n>/key.pem account.json directory.txt  one ACME account registration each

``manifest.json`` holds the format, when and where the archive was made, every certificate
with its desired version and its versions (serial, fingerprint, whether a key is there), every
account's directory URL, and the SHA-256 of every other member. :func:`unpack` refuses an
archive whose format it does not know (so a later certd can change the layout), a member the
manifest does not list or that differs from its hash, a certificate that does not parse, a
key that is not the certificate's, a desired version that is not there: one line saying
which, and nothing is returned to write.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from certd.core.errors import OperationFailed
from certd.core.model import Bundle, CertInfo, split_pem_chain, spki_sha256
from certd.crypto.keys import load_private_key
from certd.store.fileio import NAME_RE, version_dirname

FORMAT = "certd-backup/1"
MANIFEST = "manifest.json"
MAX_MEMBER = 1 << 20          # 1 MiB: a certificate, a chain, a key or a state file is a few KiB
MAX_TOTAL = 4 << 30           # what a restore will hold in memory, unpacked (about a million versions)
DAMAGED = "the archive is damaged"
ALTERED = "the archive is damaged or was altered"
_MEMBER_RE = re.compile(r"certs/[A-Za-z0-9][A-Za-z0-9._-]{0,63}/(state\.json|versions/\d{4,9}/"
                        r"(cert\.pem|chain\.pem|privkey\.pem|meta\.json))|accounts/\d{1,6}/"
                        r"(key\.pem|account\.json|directory\.txt)")


class BackupError(OperationFailed):
    """A backup cannot be read or restored: damaged, tampered with, or not a certd backup."""


@dataclass(frozen=True)
class VersionRecord:
    version: int
    bundle: Bundle       # key_pem is b"" for a version whose key was destroyed
    meta: dict[str, Any]


@dataclass
class CertRecord:
    name: str
    desired: int | None
    state: dict[str, Any] | None
    versions: list[VersionRecord] = field(default_factory=list)


@dataclass(frozen=True)
class AccountRecord:
    directory_url: str
    key_pem: bytes
    registration: str

    def __repr__(self) -> str:  # keep the key out of tracebacks
        return f"AccountRecord({self.directory_url!r}, key=<redacted>)"


@dataclass
class Snapshot:
    """Everything a backup carries. ``origin`` is the manifest's header (format, created, node...)."""

    certs: list[CertRecord]
    accounts: list[AccountRecord]
    origin: dict[str, Any] = field(default_factory=dict)

    @property
    def version_count(self) -> int:
        return sum(len(c.versions) for c in self.certs)


# --- writing -----------------------------------------------------------------------------------


def pack(snap: Snapshot, origin: dict[str, Any]) -> bytes:
    """The gzip'd tar of ``snap`` with its manifest (``origin``: created, certd_version, source_node)."""
    members: dict[str, bytes] = {}
    certs = []
    for c in snap.certs:
        base = f"certs/{c.name}"
        if c.state is not None:
            members[f"{base}/state.json"] = _json(c.state)
        listed = []
        for v in c.versions:
            vdir = f"{base}/versions/{version_dirname(v.version)}"
            members[f"{vdir}/cert.pem"] = v.bundle.cert_pem
            members[f"{vdir}/chain.pem"] = v.bundle.chain_pem
            members[f"{vdir}/meta.json"] = _json(v.meta)
            if v.bundle.key_pem:
                members[f"{vdir}/privkey.pem"] = v.bundle.key_pem
            info = v.bundle.info
            listed.append({"version": v.version, "serial": info.serial, "fingerprint_sha256": info.fingerprint_sha256,
                           "not_after": info.not_after.isoformat(), "key": bool(v.bundle.key_pem)})
        certs.append({"name": c.name, "desired": c.desired, "state": c.state is not None, "versions": listed})
    accounts = []
    for i, a in enumerate(snap.accounts):
        members[f"accounts/{i}/key.pem"] = a.key_pem
        members[f"accounts/{i}/account.json"] = a.registration.encode()
        members[f"accounts/{i}/directory.txt"] = a.directory_url.encode() + b"\n"
        accounts.append({"directory_url": a.directory_url})
    manifest = {"format": FORMAT, **origin, "certificates": certs, "accounts": accounts,
                "files": {path: hashlib.sha256(data).hexdigest() for path, data in members.items()}}
    buf = io.BytesIO()
    # mtime=0 and fixed owners: the same store packs to the same bytes (before encryption)
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, MANIFEST, _json(manifest))
            for path, data in members.items():
                _add(tar, path, data)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, path: str, data: bytes) -> None:
    info = tarfile.TarInfo(path)
    info.size, info.mode, info.mtime = len(data), 0o600, 0
    tar.addfile(info, io.BytesIO(data))


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


# --- reading -----------------------------------------------------------------------------------


def unpack(data: bytes, where: str) -> Snapshot:
    """The checked contents of a plain archive (``where`` names it in errors); :class:`BackupError`."""
    members = _members(data, where)
    raw = members.pop(MANIFEST, None)
    if raw is None:
        raise BackupError(f"{where}: no {MANIFEST} in the archive; not a certd backup")
    manifest = _obj(raw, f"{where}: {MANIFEST}")
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise BackupError(f"{where}: archive format {fmt!r}; this certd reads {FORMAT} only (restore it with the "
                          f"certd release that made it, or a newer one)")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BackupError(f"{where}: {MANIFEST} lists no files; {DAMAGED}")
    for path in sorted(set(files) ^ set(members)):
        what = "is missing from the archive" if path in files else "is not listed in the manifest"
        raise BackupError(f"{where}: {path} {what}; {ALTERED}")
    for path, digest in files.items():
        if hashlib.sha256(members[path]).hexdigest() != digest:
            raise BackupError(f"{where}: {path} differs from the manifest's SHA-256; {ALTERED}")
    try:
        certs = [_cert(c, members, where) for c in manifest["certificates"]]
        accounts = [_account(i, a, members, where) for i, a in enumerate(manifest["accounts"])]
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise BackupError(f"{where}: {MANIFEST} is malformed ({type(e).__name__}: {e}); {DAMAGED}") from None
    names = [c.name for c in certs]
    if len(set(names)) != len(names):
        raise BackupError(f"{where}: {MANIFEST} names a certificate twice; {DAMAGED}")
    origin = {k: v for k, v in manifest.items() if k not in ("certificates", "accounts", "files")}
    return Snapshot(certs, accounts, origin)


def _members(data: bytes, where: str) -> dict[str, bytes]:
    """Every member, by path: regular files with the layout's names only, bounded in size."""
    found: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for m in tar:
                if not m.isfile() or not (m.name == MANIFEST or _MEMBER_RE.fullmatch(m.name)):
                    raise BackupError(f"{where}: unexpected archive member {m.name!r}; not a certd backup")
                # the manifest grows with the store (~500 bytes a version): only MAX_TOTAL bounds it
                if (m.size > MAX_MEMBER and m.name != MANIFEST) or m.name in found:
                    raise BackupError(f"{where}: archive member {m.name} is too large or repeated; {DAMAGED}")
                total += m.size
                if total > MAX_TOTAL:
                    raise BackupError(f"{where}: the archive unpacks to more than {MAX_TOTAL >> 30} GiB; refused")
                f = tar.extractfile(m)
                assert f is not None  # a regular file
                found[m.name] = f.read()
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as e:
        raise BackupError(f"{where}: the archive inside is unreadable ({type(e).__name__}); it is damaged") from None
    return found


def _obj(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BackupError(f"{what}: not valid JSON; {DAMAGED}") from None
    if not isinstance(obj, dict):
        raise BackupError(f"{what}: not a JSON object; {DAMAGED}")
    return obj


def _cert(entry: dict[str, Any], members: dict[str, bytes], where: str) -> CertRecord:
    name = entry["name"]
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BackupError(f"{where}: {MANIFEST} names an invalid certificate {name!r}")
    base = f"certs/{name}"
    state = _obj(members[f"{base}/state.json"], f"{where}: {base}/state.json") if entry["state"] else None
    rec = CertRecord(name, entry["desired"], state)
    for v in entry["versions"]:
        rec.versions.append(_version(name, v, members, f"{where}: {base}/versions/{version_dirname(v['version'])}"))
    have = {v.version: v for v in rec.versions}
    if len(have) != len(rec.versions):
        raise BackupError(f"{where}: {name}: a version is listed twice; {DAMAGED}")
    if rec.desired is not None and (rec.desired not in have or not have[rec.desired].bundle.key_pem):
        raise BackupError(f"{where}: {name}: desired version {rec.desired} is not in the archive with its key")
    return rec


def _version(name: str, entry: dict[str, Any], members: dict[str, bytes], where: str) -> VersionRecord:
    version = entry["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BackupError(f"{where}: invalid version number {version!r}")
    vdir = f"certs/{name}/versions/{version_dirname(version)}"
    meta = _obj(members[f"{vdir}/meta.json"], f"{where}/meta.json")
    if b"PRIVATE KEY" in members[f"{vdir}/meta.json"]:
        raise BackupError(f"{where}/meta.json: holds key material; the archive was altered")
    key = members.get(f"{vdir}/privkey.pem", b"")
    if bool(key) != bool(entry["key"]) or (not key and not meta.get("key_destroyed")):
        raise BackupError(f"{where}: the private key is missing (and the version is not marked key_destroyed)")
    bundle = Bundle(members[f"{vdir}/cert.pem"], members[f"{vdir}/chain.pem"], key)
    try:
        info = CertInfo.from_pem(bundle.cert_pem)
        for block in split_pem_chain(bundle.chain_pem):
            x509.load_pem_x509_certificate(block)
    except (ValueError, IndexError):
        raise BackupError(f"{where}: a certificate does not parse; {DAMAGED}") from None
    if info.fingerprint_sha256 != entry["fingerprint_sha256"]:
        raise BackupError(f"{where}: cert.pem is not the certificate the manifest lists (fingerprint differs)")
    if key:
        try:
            public = load_private_key(key).public_key()
        except ValueError:
            raise BackupError(f"{where}: privkey.pem is not a readable private key; {DAMAGED}") from None
        if spki_sha256(public) != info.spki_sha256:
            raise BackupError(f"{where}: privkey.pem does not belong to cert.pem; {ALTERED}")
    return VersionRecord(version, bundle.with_info(info), meta)


def _account(i: int, entry: dict[str, Any], members: dict[str, bytes], where: str) -> AccountRecord:
    base = f"accounts/{i}"
    url = members[f"{base}/directory.txt"].decode("utf-8", "replace").strip()
    if url != entry["directory_url"] or not url or not url.isprintable():
        raise BackupError(f"{where}: {base}/directory.txt differs from the manifest; {DAMAGED}")
    _obj(members[f"{base}/account.json"], f"{where}: {base}/account.json")
    try:
        load_private_key(members[f"{base}/key.pem"])
    except ValueError:
        raise BackupError(f"{where}: {base}/key.pem is not a readable private key; {DAMAGED}") from None
    return AccountRecord(url, members[f"{base}/key.pem"], members[f"{base}/account.json"].decode("utf-8"))
