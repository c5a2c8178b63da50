"""Envelope encryption of stored keys: the KeyRing's format and guarantees, and a FileStore on a
real directory with [keys] (what is on disk, sealing an existing directory, a KEK rotation seen
by another process)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from certd.config import KeysConfig
from certd.core.errors import ConfigError
from certd.crypto.custody import CustodyError, FileKek, KeyRing, new_kek_secret, sealed_kek
from certd.crypto.kekload import create_kek_file, load_keyring
from certd.store.files import FileStore
from certd.store.port import OrderJournal
from tests.support.certs import make_bundle

KEY = b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n"


def kek() -> FileKek:
    return FileKek(new_kek_secret(), "test")


def on_disk(root: Path) -> list[bytes]:
    return [p.read_bytes() for p in root.rglob("*") if p.is_file()]


# -- the ring ---------------------------------------------------------------------------------


def test_a_sealed_key_opens_only_in_its_slot_and_under_a_known_kek() -> None:
    """A sealed key opens in the slot it was sealed for; another slot or an unknown KEK is a
    clear error naming what to configure."""
    a, b = kek(), kek()
    sealed = KeyRing(a).seal(KEY, "version/www/3")
    assert b"PRIVATE KEY" not in sealed and sealed_kek(sealed) == a.kek_id
    assert KeyRing(a).open(sealed, "version/www/3") == KEY
    with pytest.raises(CustodyError, match="sealed for 'version/www/3', found in 'version/www/4'"):
        KeyRing(a).open(sealed, "version/www/4")
    with pytest.raises(CustodyError, match=f"sealed under KEK {a.kek_id}, which is not configured.*old_kek_files"):
        KeyRing(b).open(sealed, "version/www/3")


def test_a_tampered_sealed_key_does_not_open() -> None:
    """Flipping a byte of the ciphertext or the wrapped data key is detected (AES-GCM)."""
    a = kek()
    doc = json.loads(KeyRing(a).seal(KEY, "order/www"))
    for field in ("ciphertext", "wrapped_dek"):
        bad = dict(doc)
        raw = bytearray(base64.b64decode(bad[field]))
        raw[-1] ^= 1
        bad[field] = base64.b64encode(bytes(raw)).decode()
        with pytest.raises(CustodyError):
            KeyRing(a).open(json.dumps(bad).encode(), "order/www")
    with pytest.raises(CustodyError, match="corrupt sealed key"):
        KeyRing(a).open(b'{"format": "certd-sealed-key/1"}', "order/www")


def test_rewrap_changes_only_the_wrapped_data_key() -> None:
    """Re-wrapping under a new KEK keeps the ciphertext, opens under the new KEK alone, and is
    a no-op the second time."""
    old, new = kek(), kek()
    sealed = KeyRing(old).seal(KEY, "account/abc")
    ring = KeyRing(old).with_current(new)
    fresh = ring.rewrap(sealed, "account/abc")
    assert fresh is not None and json.loads(fresh)["ciphertext"] == json.loads(sealed)["ciphertext"]
    assert KeyRing(new).open(fresh, "account/abc") == KEY
    assert ring.rewrap(fresh, "account/abc") is None


def test_kek_files_must_be_private_and_exactly_32_bytes(tmp_path: Path) -> None:
    """A KEK readable by others or of the wrong size is refused with the fix; kek init never
    overwrites one."""
    path = tmp_path / "kek"
    kek_id = create_kek_file(path)
    assert FileKek.load(path).kek_id == kek_id and (path.stat().st_mode & 0o777) == 0o600
    before = path.read_bytes()
    with pytest.raises(Exception, match="never overwritten"):
        create_kek_file(path)
    assert path.read_bytes() == before
    path.chmod(0o640)
    with pytest.raises(CustodyError, match="chmod 600"):
        FileKek.load(path)
    short = tmp_path / "short"
    short.write_bytes(b"x" * 16)
    short.chmod(0o600)
    with pytest.raises(CustodyError, match="exactly 32"):
        FileKek.load(short)


def test_kek_from_a_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kek_credential reads $CREDENTIALS_DIRECTORY/NAME, and says what to add when it is unset."""
    create_kek_file(tmp_path / "certd-kek")
    keys = KeysConfig(kek_credential="certd-kek")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(CustodyError, match="LoadCredential=certd-kek"):
        load_keyring(keys)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert load_keyring(keys).current.kek_id == FileKek.load(tmp_path / "certd-kek").kek_id


# -- a FileStore with [keys] ------------------------------------------------------------------


def test_a_sealed_store_writes_no_private_key_to_disk(tmp_path: Path) -> None:
    """Versions, the order journal and the account key are sealed on disk and plain when read."""
    store = FileStore(tmp_path / "state", keyring=KeyRing(kek()))
    bundle = make_bundle()
    with store.lock("www"):
        v = store.add_version("www", bundle, {"reason": "test"})
        store.save_order("www", OrderJournal("https://ca.test/order/1", KEY, "2026-12-03T00:00:00Z"))
    store.save_account("https://ca.test/dir", KEY, '{"uri": "x"}')
    assert not [b for b in on_disk(tmp_path) if b"PRIVATE KEY" in b]
    assert store.load("www", v).bundle.key_pem == bundle.key_pem
    assert store.load_order("www").key_pem == KEY  # type: ignore[union-attr]
    assert store.load_account("https://ca.test/dir") == (KEY, '{"uri": "x"}')


def test_a_sealed_key_moved_to_another_version_is_refused(tmp_path: Path) -> None:
    """Copying version 1's sealed key over version 2's fails to open instead of serving it."""
    store = FileStore(tmp_path / "state", keyring=KeyRing(kek()))
    with store.lock("www"):
        store.add_version("www", make_bundle(), {})
        store.add_version("www", make_bundle(), {})
    vdir = tmp_path / "state" / "certs" / "www" / "versions"
    (vdir / "0002" / "privkey.sealed").write_bytes((vdir / "0001" / "privkey.sealed").read_bytes())
    with pytest.raises(CustodyError, match="sealed for 'version/www/1', found in 'version/www/2'"):
        store.load("www", 2)


def test_sealing_an_existing_store_leaves_nothing_plain_and_resumes(tmp_path: Path) -> None:
    """Plain keys are sealed once (marked done); a crash between sealing and removing the plain
    file is finished by the next run; dropping [keys] drops the mark."""
    plain = FileStore(tmp_path / "state")
    with plain.lock("www"):
        plain.add_version("www", make_bundle(), {})
        plain.add_version("www", make_bundle(), {})
    plain.save_account("https://ca.test/dir", KEY, "{}")
    ring = KeyRing(kek())
    v1 = tmp_path / "state" / "certs" / "www" / "versions" / "0001"
    (v1 / "privkey.sealed").write_bytes(ring.seal((v1 / "privkey.pem").read_bytes(), "version/www/1"))  # the crash
    sealed = FileStore(tmp_path / "state", keyring=ring)
    assert sorted(sealed.keys.seal_existing()) == sorted(["version/www/1", "version/www/2", sealed_slot(tmp_path)])
    assert not [b for b in on_disk(tmp_path) if b"PRIVATE KEY" in b]
    assert sealed.keys.census() == {ring.current.kek_id: 3}
    assert sealed.keys.seal_existing() == []  # marked done: not scanned again
    FileStore(tmp_path / "state").keys.seal_existing()
    assert not (tmp_path / "state" / "keys.sealed").exists()
    with pytest.raises(CustodyError, match="no \\[keys\\] section"):
        FileStore(tmp_path / "state").load("www", 1)


def sealed_slot(tmp_path: Path) -> str:
    (account,) = os.listdir(tmp_path / "state" / "accounts")
    return f"account/{account}"


def test_a_rotation_is_seen_by_a_process_still_on_the_old_kek(tmp_path: Path) -> None:
    """Once a rotation is recorded, another process configured with the old KEK seals under the
    new one and opens keys re-wrapped under it, without a restart."""
    old_path, new_path = tmp_path / "old", tmp_path / "new"
    create_kek_file(old_path)
    create_kek_file(new_path)
    daemon = FileStore(tmp_path / "state", keyring=KeyRing(FileKek.load(old_path)))
    with daemon.lock("www"):
        daemon.add_version("www", make_bundle(), {})
    cli = FileStore(tmp_path / "state", keyring=KeyRing(FileKek.load(old_path)))
    new = FileKek.load(new_path)
    cli.keys.begin_rotation(new, str(new_path), "2026-12-03T00:00:00Z")
    assert cli.keys.rewrap_all() == 1
    cli.keys.finish_rotation(1, "2026-12-03T00:00:01Z")
    bundle = make_bundle()
    with daemon.lock("www"):
        v2 = daemon.add_version("www", bundle, {})
    assert daemon.load("www", 1).bundle.key_pem and daemon.load("www", v2).bundle.key_pem == bundle.key_pem
    assert daemon.keys.census() == {new.kek_id: 2}
    after = FileStore(tmp_path / "state", keyring=KeyRing(new))  # the config updated, the old KEK dropped
    assert after.load("www", 1).bundle.key_pem and after.keys.rotation() is not None  # the record is kept
    with daemon.lock("www"):  # ... so the daemon still on the old config keeps working meanwhile
        v3 = daemon.add_version("www", make_bundle(), {})
    assert after.load("www", v3).bundle.key_pem


def test_a_second_rotation_before_the_config_changed_loses_nothing(tmp_path: Path) -> None:
    """old -> k2 -> k3 with every process still configured with the old KEK: each key opens in
    an old-config process and in one configured with k3 alone, even once k2's file is gone."""
    paths = [tmp_path / n for n in ("old", "k2", "k3")]
    for p in paths:
        create_kek_file(p)
    old = FileStore(tmp_path / "state", keyring=KeyRing(FileKek.load(paths[0])))
    with old.lock("www"):
        old.add_version("www", make_bundle(), {})
    for p in paths[1:]:
        old.keys.begin_rotation(FileKek.load(p), str(p), "2026-12-03T00:00:00Z")
        with old.lock("www"):
            old.add_version("www", make_bundle(), {})  # sealed under the newest KEK meanwhile
        old.keys.rewrap_all()
        old.keys.finish_rotation(1, "2026-12-03T00:00:01Z")
    k3 = FileKek.load(paths[2])
    assert old.keys.census() == {k3.kek_id: 3}
    paths[1].unlink()
    fresh = FileStore(tmp_path / "state", keyring=KeyRing(k3))
    assert all(fresh.load("www", v).bundle.key_pem for v in (1, 2, 3))
    assert all(FileStore(tmp_path / "state", keyring=KeyRing(FileKek.load(paths[0]))).load("www", v).bundle.key_pem
               for v in (1, 2, 3))


def test_a_reload_that_would_lose_the_keys_is_refused(tmp_path: Path) -> None:
    """Dropping [keys], or a KEK that cannot open what is stored, is refused; nothing changes."""
    a, b = kek(), kek()
    store = FileStore(tmp_path / "state", keyring=KeyRing(a))
    with store.lock("www"):
        store.add_version("www", make_bundle(), {})
    with pytest.raises(CustodyError, match="removing \\[keys\\]"):
        store.keys.reconfigure(None)
    with pytest.raises(CustodyError, match=f"does not accept KEK {a.kek_id}.*old_kek_files"):
        store.keys.reconfigure(KeyRing(b))
    store.keys.reconfigure(KeyRing(b, [a]))  # the old KEK kept for opening: fine
    assert store.load("www", 1).bundle.key_pem


def test_plain_keys_written_after_sealing_are_sealed_by_the_next_full_scan(tmp_path: Path) -> None:
    """A process without [keys] writing after the directory was marked sealed: the daemon's
    start (a full scan) seals that key too."""
    ring = KeyRing(kek())
    sealed = FileStore(tmp_path / "state", keyring=ring)
    with sealed.lock("www"):
        sealed.add_version("www", make_bundle(), {})
    sealed.keys.seal_existing()
    (tmp_path / "state" / "keys.sealed").write_text("{}")  # as if marked, then an old-config writer came
    plain = FileStore(tmp_path / "state")  # a writer on the old config (it does not drop the mark itself)
    with plain.lock("www"):
        plain.add_version("www", make_bundle(), {})
    assert sealed.keys.census().get("plain") == 1 and sealed.keys.seal_existing() == []
    assert sealed.keys.seal_existing(full_scan=True) == ["version/www/2"]
    assert sealed.keys.census() == {ring.current.kek_id: 2}


def test_a_sealed_leftover_that_does_not_open_is_replaced_not_trusted(tmp_path: Path) -> None:
    """Sealing finds a plain key beside a sealed file it cannot open (sealed under a KEK that was
    re-created since): the plain key is sealed again rather than destroyed."""
    plain = FileStore(tmp_path / "state")
    bundle = make_bundle()
    with plain.lock("www"):
        plain.add_version("www", bundle, {})
    v1 = tmp_path / "state" / "certs" / "www" / "versions" / "0001"
    (v1 / "privkey.sealed").write_bytes(KeyRing(kek()).seal(bundle.key_pem, "version/www/1"))  # a lost KEK's
    ring = KeyRing(kek())
    store = FileStore(tmp_path / "state", keyring=ring)
    assert store.keys.seal_existing() == ["version/www/1"]
    assert store.load("www", 1).bundle.key_pem == bundle.key_pem


def test_a_key_that_cannot_be_rewrapped_does_not_block_the_rotation(tmp_path: Path) -> None:
    """One corrupt sealed key: the others are re-wrapped, the corrupt one is left and counted."""
    old_path, new_path = tmp_path / "old", tmp_path / "new"
    create_kek_file(old_path)
    create_kek_file(new_path)
    store = FileStore(tmp_path / "state", keyring=KeyRing(FileKek.load(old_path)))
    with store.lock("a"):
        store.add_version("a", make_bundle(), {})
    with store.lock("b"):
        store.add_version("b", make_bundle(), {})
    (tmp_path / "state" / "certs" / "a" / "versions" / "0001" / "privkey.sealed").write_text("{garbage")
    new = FileKek.load(new_path)
    store.keys.begin_rotation(new, str(new_path), "2026-12-03T00:00:00Z")
    assert store.keys.rewrap_all() == 1
    assert store.keys.census() == {new.kek_id: 1, "corrupt": 1}


def test_keys_config_needs_exactly_one_kek_source(tmp_path: Path) -> None:
    """[keys] with no KEK source, or two, is one actionable line; a bad age recipient too."""
    import tomllib

    from certd.config import parse as parse_data

    def parse(text: str, path: Path) -> object:
        return parse_data(tomllib.loads(text), path)

    base = (f'[daemon]\nstate_dir = "{tmp_path}"\ncontrol_socket = "{tmp_path}/s"\n'
            f'[acme]\ndirectory = "https://127.0.0.1:14000/dir"\n')
    with pytest.raises(ConfigError, match="set exactly one KEK source.*found none"):
        parse(base + "[keys]\nold_kek_files = []\n", tmp_path / "c.toml")
    with pytest.raises(ConfigError, match="found kek_file, kek_credential"):
        parse(base + '[keys]\nkek_file = "/k"\nkek_credential = "k"\n', tmp_path / "c.toml")
    with pytest.raises(ConfigError, match="not an age recipient"):
        parse(base + '[keys]\nkek_file = "/k"\nbackup_recipient = "age1nope"\n', tmp_path / "c.toml")
    cfg = parse_data(tomllib.loads(base + '[keys]\nkek_file = "kek"\nold_kek_files = ["old"]\n'), tmp_path / "c.toml")
    assert cfg.keys is not None and cfg.keys.kek_file == tmp_path / "kek" and cfg.keys.old_kek_files == (tmp_path / "old",)
