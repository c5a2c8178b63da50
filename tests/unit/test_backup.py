"""Sealed offline backups (certd.store.backup, certd.store.backupformat) on real state directories:
round trips between stores with different KEKs, and every way an archive can be wrong."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pyrage
import pytest

from certd.core.clock import FakeClock
from certd.core.errors import StoreError, UsageError
from certd.core.model import Bundle
from certd.crypto.custody import FileKek, KeyRing
from certd.store import backup
from certd.store.backupformat import (FORMAT, BackupError, CertRecord, Snapshot, VersionRecord, pack, unpack)
from certd.store.files import FileStore
from tests.support.certs import make_bundle

ACME = "https://127.0.0.1:14000/dir"
ROOT = Path(__file__).resolve().parents[2]


def ring() -> KeyRing:
    return KeyRing(FileKek(os.urandom(32), "test"))


def plain_keys_in(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and not p.is_symlink() and b"PRIVATE KEY" in p.read_bytes()]


class Keys:
    """An age identity in a 0600 file and its recipient."""

    def __init__(self, directory: Path) -> None:
        self.identity = pyrage.x25519.Identity.generate()
        self.recipient = str(self.identity.to_public())
        self.path = directory / "backup.key"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"# created: test\n# public key: {self.recipient}\n{self.identity}\n")


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def source_store(root: Path, keyring: KeyRing | None = None) -> FileStore:
    """www: versions 1-3, desired 2, with state; api: one version; one ACME account."""
    store = FileStore(root, keyring=keyring)
    with store.lock("www"):
        for _ in range(3):
            store.add_version("www", make_bundle(("www.example.test",)), {"initiator": "test"})
        store.set_current("www", 2)
        store.save_state("www", {"failures": 1, "last_result": "renewed"})
    with store.lock("api"):
        store.set_current("api", store.add_version("api", make_bundle(("api.example.test",)), {}))
    store.save_account(ACME, make_bundle().key_pem, json.dumps({"body": {"status": "valid"}, "uri": ACME + "/acct/1"}))
    return store


def export(store: FileStore, keys: Keys, path: Path, clock: FakeClock) -> backup.Exported:
    return backup.export(store, path, keys.recipient, initiator="test", clock=clock)


def restore(store: FileStore, keys: Keys, path: Path, clock: FakeClock) -> backup.Restored:
    return backup.restore(store, path, keys.path, initiator="test", clock=clock)


def same_contents(a: FileStore, b: FileStore) -> None:
    assert a.names() == b.names()
    for name in a.names():
        assert a.versions(name) == b.versions(name) and a.desired(name) == b.desired(name)
        assert a.load_state(name) == b.load_state(name)
        for v in a.versions(name):
            x, y = a.load(name, v), b.load(name, v)
            assert (x.bundle.cert_pem, x.bundle.chain_pem, x.bundle.key_pem) == \
                (y.bundle.cert_pem, y.bundle.chain_pem, y.bundle.key_pem)
            assert x.meta == y.meta
    assert a.load_account(ACME) == b.load_account(ACME)


def test_round_trip_reseals_every_key_under_the_targets_kek(tmp_path: Path, keys: Keys, clock: FakeClock) -> None:
    """A plain store exported and restored under a KEK: same versions, numbers, desired, state and
    account; the archive is 0600 and holds no readable key; the new dir holds no plain key."""
    src = source_store(tmp_path / "src")
    archive = tmp_path / "out" / "certd.age"
    archive.parent.mkdir()
    done = export(src, keys, archive, clock)
    assert (done.certificates, done.versions, done.accounts) == (2, 4, 1)
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in archive.read_bytes() and archive.read_bytes().startswith(b"age-encryption.org/v1")
    dst = FileStore(tmp_path / "dst", keyring=ring())
    got = restore(dst, keys, archive, clock)
    assert (got.certificates, got.versions, got.accounts) == (2, 4, 1) and got.custody.startswith("sealed under KEK")
    same_contents(src, dst)
    assert plain_keys_in(dst.root) == []
    assert dst.keys.census() == {dst.keys.ring.current.kek_id: 5}  # type: ignore[union-attr]
    exported = [r for r in src.audit.records() if r["event"] == "backup_exported"]
    restored = [r for r in dst.audit.records() if r["event"] == "backup_restored"]
    assert len(exported) == 1 and exported[0]["detail"]["recipient"] == keys.recipient
    assert len(restored) == 1 and restored[0]["detail"]["source_node"] == src.node


def test_sealed_store_restores_into_a_plain_one_with_a_destroyed_key(tmp_path: Path, keys: Keys,
                                                                      clock: FakeClock) -> None:
    """Keys sealed under one KEK come back plain without [keys]; a version whose key was destroyed
    comes back as the record it was, and the next version number follows the restored ones."""
    src = source_store(tmp_path / "src", ring())
    with src.lock("www"):
        src.destroy_key("www", 1)
    export(src, keys, tmp_path / "b.age", clock)
    dst = FileStore(tmp_path / "dst")
    restore(dst, keys, tmp_path / "b.age", clock)
    same_contents(src, dst)
    assert dst.load("www", 1).meta["key_destroyed"] and dst.load("www", 1).bundle.key_pem == b""
    with dst.lock("www"):
        assert dst.add_version("www", make_bundle(), {}) == 4


def test_restore_refuses_a_state_dir_that_is_not_empty_and_leaves_it_untouched(tmp_path: Path, keys: Keys,
                                                                               clock: FakeClock) -> None:
    """Restoring over existing certificates is refused with one line; nothing there changes."""
    export(source_store(tmp_path / "src"), keys, tmp_path / "b.age", clock)
    dst = FileStore(tmp_path / "dst")
    with dst.lock("www"):
        dst.set_current("www", dst.add_version("www", make_bundle(), {}))
    before = {p: p.read_bytes() for p in dst.root.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match="is not empty"):
        restore(dst, keys, tmp_path / "b.age", clock)
    assert {p: p.read_bytes() for p in dst.root.rglob("*") if p.is_file()} == before


def test_wrong_identity_is_refused_and_nothing_is_written(tmp_path: Path, keys: Keys, clock: FakeClock) -> None:
    """An identity the archive was not sealed to: one clear line, no certificate written."""
    export(source_store(tmp_path / "src"), keys, tmp_path / "b.age", clock)
    (tmp_path / "other").mkdir()
    other = Keys(tmp_path / "other")
    dst = FileStore(tmp_path / "dst")
    with pytest.raises(BackupError, match="does not open this backup"):
        backup.restore(dst, tmp_path / "b.age", other.path, initiator="test", clock=clock)
    assert dst.names() == [] and not (dst.root / "accounts").exists()


def test_a_tampered_archive_is_refused_and_nothing_is_written(tmp_path: Path, keys: Keys, clock: FakeClock) -> None:
    """One flipped byte in the sealed file: age's authentication refuses it before anything is written."""
    export(source_store(tmp_path / "src"), keys, tmp_path / "b.age", clock)
    data = bytearray((tmp_path / "b.age").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "b.age").write_bytes(bytes(data))
    dst = FileStore(tmp_path / "dst")
    with pytest.raises(BackupError, match="damaged, was altered"):
        restore(dst, keys, tmp_path / "b.age", clock)
    assert dst.names() == []


def test_identity_readable_by_others_is_refused(tmp_path: Path, keys: Keys, clock: FakeClock) -> None:
    """An identity file other users can read is refused with the chmod that fixes it."""
    export(source_store(tmp_path / "src"), keys, tmp_path / "b.age", clock)
    keys.path.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        restore(FileStore(tmp_path / "dst"), keys, tmp_path / "b.age", clock)


def test_a_bad_recipient_is_refused_before_anything_is_written(tmp_path: Path, clock: FakeClock) -> None:
    """A backup_recipient that is not an age recipient: a usage error, no file."""
    with pytest.raises(UsageError, match="not an age X25519 recipient"):
        backup.export(source_store(tmp_path / "src"), tmp_path / "b.age", "age1" + "q" * 58, initiator="t",
                      clock=clock)
    assert not (tmp_path / "b.age").exists()


def test_restore_version_refuses_a_number_that_exists(tmp_path: Path) -> None:
    """restore_version never overwrites a stored version."""
    store = FileStore(tmp_path / "s")
    with store.lock("www"):
        store.restore_version("www", 7, make_bundle(), {})
        assert store.versions("www") == [7]
        with pytest.raises(StoreError, match="already in the store"):
            store.restore_version("www", 7, make_bundle(), {})


# --- the archive format, unsealed ----------------------------------------------------------------


def snapshot(bundle: Bundle | None = None) -> Snapshot:
    b = bundle or make_bundle()
    return Snapshot([CertRecord("www", 1, {"x": 1}, [VersionRecord(1, b, {"initiator": "t"})])], [])


def members_of(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]


def repack(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def with_manifest(members: dict[str, bytes], change: Any) -> dict[str, bytes]:
    manifest = json.loads(members["manifest.json"])
    change(manifest)
    return {**members, "manifest.json": json.dumps(manifest).encode()}


def test_pack_unpack_round_trip_keeps_everything() -> None:
    """The plain archive carries the versions, keys, meta, state and origin it was given."""
    b = make_bundle()
    snap = unpack(pack(snapshot(b), {"created": "2026-01-01T00:00:00Z", "source_node": "n1"}), "test")
    assert snap.origin["format"] == FORMAT and snap.origin["source_node"] == "n1"
    (c,) = snap.certs
    assert (c.name, c.desired, c.state) == ("www", 1, {"x": 1})
    v = c.versions[0].bundle
    assert (v.cert_pem, v.chain_pem, v.key_pem) == (b.cert_pem, b.chain_pem, b.key_pem)


def _set_format(m: dict[str, Any]) -> None:
    m["format"] = "certd-backup/2"


def _drop_files(m: dict[str, Any]) -> None:
    del m["files"]


def _desired_missing(m: dict[str, Any]) -> None:
    m["certificates"][0]["desired"] = 5


def _other_fingerprint(m: dict[str, Any]) -> None:
    m["certificates"][0]["versions"][0]["fingerprint_sha256"] = "0" * 64


@pytest.mark.parametrize("change, message", [
    (_set_format, "archive format 'certd-backup/2'; this certd reads certd-backup/1 only"),
    (_drop_files, "lists no files"),
    (_desired_missing, "desired version 5 is not in the archive"),
    (_other_fingerprint, "not the certificate the manifest lists"),
])
def test_a_bad_manifest_is_refused_with_one_line(change: Any, message: str) -> None:
    """A manifest from a later format, or one that disagrees with the members, is refused."""
    members = with_manifest(members_of(pack(snapshot(), {})), change)
    with pytest.raises(BackupError, match=message):
        unpack(repack(members), "b.age")


def test_members_must_match_the_manifest() -> None:
    """A member not listed, a listed one missing, or one changed after packing: refused."""
    members = members_of(pack(snapshot(), {}))
    key = "certs/www/versions/0001/privkey.pem"
    cases = [
        ({**members, "certs/www/versions/0001/extra.pem": b"x"}, "unexpected archive member"),
        ({**members, "certs/api/state.json": b"{}"}, "is not listed in the manifest"),
        ({k: v for k, v in members.items() if k != key}, "is missing from the archive"),
        ({**members, "certs/www/state.json": b'{"x": 2}\n'}, "differs from the manifest's SHA-256"),
        ({**members, "../escape": b""}, "unexpected archive member"),
    ]
    for bad, message in cases:
        with pytest.raises(BackupError, match=message):
            unpack(repack(bad), "b.age")


def test_a_key_that_is_not_the_certificates_is_refused() -> None:
    """A version whose key does not belong to its certificate (hashes consistent): refused."""
    b, other = make_bundle(), make_bundle()
    with pytest.raises(BackupError, match="does not belong to cert.pem"):
        unpack(pack(snapshot(Bundle(b.cert_pem, b.chain_pem, other.key_pem)), {}), "b.age")


def test_a_manifest_over_the_member_limit_is_read() -> None:
    """The manifest grows with the store (~500 bytes a version, over 1 MiB past ~2,000 versions):
    the 1 MiB limit for one certificate or key does not apply to it."""
    data = pack(snapshot(), {"source_node": "n" * (1 << 20)})
    assert len(members_of(data)["manifest.json"]) > 1 << 20
    assert unpack(data, "b.age").version_count == 1


def test_not_an_archive_is_refused() -> None:
    """Bytes that are not a gzip'd tar: one line, no traceback."""
    with pytest.raises(BackupError, match="unreadable"):
        unpack(b"not a tar", "b.age")


def test_a_sealed_bad_member_writes_nothing(tmp_path: Path, keys: Keys, clock: FakeClock) -> None:
    """A correctly sealed archive with one bad member: refused before the first file is written."""
    b, other = make_bundle(), make_bundle()
    good = CertRecord("api", 1, None, [VersionRecord(1, make_bundle(("api.example.test",)), {})])
    bad = CertRecord("www", 1, None, [VersionRecord(1, Bundle(b.cert_pem, b.chain_pem, other.key_pem), {})])
    sealed = pyrage.encrypt(pack(Snapshot([good, bad], []), {}), [pyrage.x25519.Recipient.from_str(keys.recipient)])
    (tmp_path / "b.age").write_bytes(sealed)
    dst = FileStore(tmp_path / "dst")
    with pytest.raises(BackupError, match="does not belong"):
        restore(dst, keys, tmp_path / "b.age", clock)
    assert dst.names() == []


# --- the command line ------------------------------------------------------------------------------


def test_without_pyrage_the_command_names_the_extra(tmp_path: Path, keys: Keys) -> None:
    """Where pyrage is not installed (an import of it fails), `certd backup export` exits 2 with
    one line naming the extra to install, and writes nothing."""
    from tests.unit.test_config import GOOD
    shadow = tmp_path / "no-pyrage" / "pyrage"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("No module named \'pyrage\'")\n')
    config = tmp_path / "certd.toml"
    config.write_text(GOOD + f'\n[keys]\nkek_file = "kek"\nbackup_recipient = "{keys.recipient}"\n')
    (tmp_path / "run").mkdir()
    r = subprocess.run([sys.executable, "-m", "certd.cli", "--config", str(config), "backup", "export",
                        str(tmp_path / "b.age")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), str(ROOT)])})
    assert (r.returncode, r.stderr) == (2, "certd: certd backup needs pyrage: pip install 'certd[keys]'\n")
    assert not (tmp_path / "b.age").exists() and not (tmp_path / "state").exists()


def test_a_write_failing_part_way_removes_what_the_restore_wrote(tmp_path: Path) -> None:
    """The store refuses a write after one certificate was restored (here: a desired version whose
    key was destroyed, which unpack would have refused first): everything written is removed."""
    b = make_bundle()
    good = CertRecord("api", 1, {"x": 1}, [VersionRecord(1, make_bundle(("api.example.test",)), {})])
    bad = CertRecord("www", 1, None, [VersionRecord(1, Bundle(b.cert_pem, b.chain_pem, b""), {"key_destroyed": True})])
    dst = FileStore(tmp_path / "dst", keyring=ring())
    with pytest.raises(BackupError, match="stopped at www: .*key was destroyed.*is as before"):
        backup._write(dst, Snapshot([good, bad], []))
    assert dst.names() == [] and plain_keys_in(dst.root) == [] and list(dst.root.rglob("*.sealed")) == []
