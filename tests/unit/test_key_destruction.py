"""After keyCompromise: every non-live copy of a key in the deploy targets is zeroed and removed,
and text certd did not write (hook output) is redacted before it reaches a log or an error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from certd.deploy import stage as deploy
from certd.deploy.files import KeyMatch
from certd.crypto import keys
from certd.config import CertificateConfig, DeployConfig, FileTarget
from certd.ops.log import redact
from certd.core.errors import StoreError
from certd.core.model import Bundle
from tests.support.certs import make_bundle


def _cert(base: Path) -> CertificateConfig:
    return CertificateConfig("www", ("www.example.test",), deploy=DeployConfig(
        live_dir=base / "ssl" / "www", combined=base / "haproxy" / "www.pem",
        files=(FileTarget(base / "app" / "tls.key", "privkey"), FileTarget(base / "app" / "tls.crt", "cert"))))


def _deploy(cert: CertificateConfig, version: int, bundle: Bundle) -> None:
    deploy.stage(cert, version, bundle)
    deploy.switch(cert, version)


def _holding(base: Path, key: bytes) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*")
                  if p.is_file() and not p.is_symlink() and key in p.read_bytes())


def test_destroy_keys_removes_old_staged_and_backup_copies_but_never_the_live_one(tmp_path: Path) -> None:
    """Versions 1 and 2 share the compromised key, 3 is live with a new one: only 3's key remains."""
    cert = _cert(tmp_path)
    old = make_bundle()
    v2 = Bundle(make_bundle().cert_pem, old.chain_pem, old.key_pem)  # reuse_key: same key, other leaf
    new = make_bundle()
    for version, bundle in ((1, old), (2, v2), (3, new)):
        _deploy(cert, version, bundle)
    assert _holding(tmp_path, old.key_pem)  # .certd-prev and the staged copies hold it
    removed = deploy.destroy_keys(cert, [old.key_pem, b""])
    assert _holding(tmp_path, old.key_pem) == []
    assert len(removed) >= 4
    assert (tmp_path / "ssl" / "www" / "privkey.pem").read_bytes() == new.key_pem
    assert (tmp_path / "haproxy" / "www.pem").read_bytes() == new.combined_pem
    assert (tmp_path / "app" / "tls.key").read_bytes() == new.key_pem
    assert deploy.deployed_version(cert) == 3
    assert deploy.check(cert, 3, new) == []


def test_destroy_keys_zeroes_a_copy_that_shares_its_inode(tmp_path: Path) -> None:
    """A staged file hard-linked as .certd-prev is zeroed (both names dropped first), not only unlinked."""
    cert = _cert(tmp_path)
    old, new = make_bundle(), make_bundle()
    _deploy(cert, 1, old)
    _deploy(cert, 2, new)
    staged = tmp_path / "haproxy" / ".www.pem.certd-0001"
    prev = tmp_path / "haproxy" / ".www.pem.certd-prev"
    assert os.stat(staged).st_ino == os.stat(prev).st_ino
    fd = os.open(staged, os.O_RDONLY)  # keep the inode reachable to look at its bytes afterwards
    try:
        deploy.destroy_keys(cert, [old.key_pem])
        assert not staged.exists() and not prev.exists()
        data = os.pread(fd, 1 << 16, 0)
        assert data and set(data) == {0}
    finally:
        os.close(fd)


def test_destroy_keys_leaves_a_live_compromised_key_alone(tmp_path: Path) -> None:
    """If the rotation away from the key did not happen, the live files are not destroyed."""
    cert = _cert(tmp_path)
    old = make_bundle()
    _deploy(cert, 1, old)
    deploy.destroy_keys(cert, [old.key_pem])
    assert (tmp_path / "ssl" / "www" / "privkey.pem").read_bytes() == old.key_pem
    assert (tmp_path / "haproxy" / "www.pem").read_bytes() == old.combined_pem


def test_destroy_keys_by_spki_finds_copies_whose_bytes_are_unknown(tmp_path: Path) -> None:
    """A fleet node knows the compromised key only by its SPKI (the store's copy is gone): every
    non-live copy of it (version dir, .certd-prev, staged, inside a combined PEM) goes, the new key stays."""
    cert = _cert(tmp_path)
    old, new = make_bundle(), make_bundle()
    _deploy(cert, 1, old)
    _deploy(cert, 2, new)
    assert _holding(tmp_path, old.key_pem)
    removed = deploy.destroy_keys(cert, (), spkis=[old.info.spki_sha256])
    assert _holding(tmp_path, old.key_pem) == [] and len(removed) >= 3
    assert deploy.check(cert, 2, new) == [] and deploy.deployed_version(cert) == 2
    assert deploy.destroy_keys(cert, (), spkis=[new.info.spki_sha256]) == []  # live: never touched


def test_destroy_keys_by_spki_never_follows_a_symlink(tmp_path: Path) -> None:
    """A .certd-prev that is a symlink to a file holding the key is not read through, nor its target removed."""
    cert = _cert(tmp_path)
    old, new = make_bundle(), make_bundle()
    _deploy(cert, 1, new)
    outside = tmp_path / "elsewhere.pem"
    outside.write_bytes(old.key_pem)
    prev = tmp_path / "app" / ".tls.key.certd-prev"
    prev.unlink(missing_ok=True)
    prev.symlink_to(outside)
    deploy.destroy_keys(cert, (), spkis=[old.info.spki_sha256])
    assert outside.read_bytes() == old.key_pem and prev.is_symlink()


def test_key_match_reads_only_private_key_blocks() -> None:
    """A file with a certificate and an unreadable block matches nothing; the key block inside a combined PEM does."""
    b = make_bundle()
    match = KeyMatch.of((), [b.info.spki_sha256])
    assert match.found_in(b.combined_pem) and not match.found_in(b.fullchain_pem)
    assert not match.found_in(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    assert not KeyMatch.of([b""], [""])
    assert b.key_pem.decode() not in repr(KeyMatch.of([b.key_pem])) and "1 keys" in repr(KeyMatch.of([b.key_pem]))


# an EC key on sect163k1, a binary curve this cryptography build cannot load (UnsupportedAlgorithm)
UNLOADABLE = b"""-----BEGIN EC PRIVATE KEY-----
MFMCAQEEFQG0AMpu0YSrZW+l9LLF5tC9Ivj7LqAHBgUrgQQAAaEuAywABAJsvi30
pzj/xf8qjDuyyEIMxzT2GgK2+pDq8o8fXduzROjnNhFzGszNRg==
-----END EC PRIVATE KEY-----
"""


def test_a_key_block_this_library_cannot_load_is_skipped_not_raised() -> None:
    """A planted (or foreign) key on a curve the library lacks is not certd's copy: the search
    goes on to the next block — it raised UnsupportedAlgorithm out of every fleet pass (review)."""
    b = make_bundle()
    assert KeyMatch.of((), [b.info.spki_sha256]).found_in(UNLOADABLE + b.key_pem)


def test_a_planted_file_too_large_for_a_key_fails_the_destruction(tmp_path: Path) -> None:
    """A .certd-prev of unmatched BEGIN lines in a deploy directory someone else can write is not
    searched (it froze the daemon: a quadratic scan under the GIL, 11 s for 216 KB): the
    destruction fails, to be tried again, rather than read it or count it as key-free."""
    cert = _cert(tmp_path)
    old, new = make_bundle(), make_bundle()
    _deploy(cert, 1, new)
    planted = tmp_path / "app" / ".tls.key.certd-prev"
    planted.unlink(missing_ok=True)
    planted.write_bytes(b"-----BEGIN PRIVATE KEY-----\n" * 40_000)  # 1.1 MB
    with pytest.raises(StoreError, match="larger than any key file certd writes"):
        deploy.destroy_keys(cert, (), spkis=[old.info.spki_sha256])
    planted.write_bytes(b"-----BEGIN PRIVATE KEY-----\n" * 20_000 + old.key_pem)  # under the limit
    assert [p.name for p in deploy.destroy_keys(cert, (), spkis=[old.info.spki_sha256])] == [planted.name]


@pytest.mark.parametrize("cut", ["whole", "head_cut", "tail_cut", "bare_line"])
def test_redact_hides_keys_in_text_such_as_hook_output(cut: str) -> None:
    """Whole PEM keys, keys cut short by output truncation, and bare lines of a known key are redacted."""
    key = keys.generate_private_key("rsa-2048").decode()
    lines = key.splitlines()
    text = {"whole": f"before\n{key}after", "head_cut": "\n".join(lines[5:]) + "\nafter",
            "tail_cut": "before\n" + "\n".join(lines[:5]), "bare_line": f"x {lines[3]} y"}[cut]
    out = redact(text, [key.encode()])
    assert "PRIVATE KEY" not in out and "[private key redacted]" in out
    assert not any(line in out for line in lines[1:-1] if len(line) >= 16)
