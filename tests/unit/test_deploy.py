"""deploy on the real filesystem: stage beside, switch by rename, modes, atomicity, drift."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import threading
from pathlib import Path

import pytest

from certd.deploy import stage as deploy
from certd.config import CertificateConfig, DeployConfig, FileTarget
from certd.core.errors import StoreError
from certd.core.model import Bundle
from tests.support.certs import make_bundle
from tests.support.tmpfs import fill, remount_ro, small_tmpfs

WWW_DATA = grp.getgrnam("www-data").gr_gid
NOBODY = pwd.getpwnam("nobody").pw_uid


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _cert(base: Path, *, group: str | None = None, files: tuple[FileTarget, ...] = (),
          live: bool = True, combined: bool = True) -> CertificateConfig:
    return CertificateConfig("www", ("www.example.test",), deploy=DeployConfig(
        live_dir=base / "ssl" / "www" if live else None,
        combined=base / "haproxy" / "www.pem" if combined else None,
        group=group, files=files))


def _snapshot(base: Path) -> dict[str, bytes | str]:
    """Every name under base (hidden ones too) with its content or link target."""
    out: dict[str, bytes | str] = {}
    for root, dirs, files in os.walk(base):
        for n in dirs + files:
            p = Path(root, n)
            out[str(p.relative_to(base))] = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


@pytest.fixture
def bundles() -> tuple[Bundle, Bundle]:
    return make_bundle(), make_bundle()


def _deploy(cert: CertificateConfig, version: int, bundle: Bundle) -> None:
    deploy.stage(cert, version, bundle)
    deploy.switch(cert, version)


# --- stage and switch ---------------------------------------------------------------------------

def test_stage_changes_nothing_readers_see(tmp_path, bundles):
    """Staging version 2 leaves live_dir and the combined file serving version 1."""
    cert = _cert(tmp_path)
    _deploy(cert, 1, bundles[0])
    deploy.stage(cert, 2, bundles[1])
    assert (tmp_path / "ssl" / "www" / "cert.pem").read_bytes() == bundles[0].cert_pem
    assert (tmp_path / "haproxy" / "www.pem").read_bytes() == bundles[0].combined_pem
    assert deploy.deployed_version(cert) == 1


def test_switch_makes_version_live_everywhere(tmp_path, bundles):
    """After switch the live_dir symlink and the combined file hold the new version."""
    cert = _cert(tmp_path)
    _deploy(cert, 1, bundles[0])
    _deploy(cert, 2, bundles[1])
    live = tmp_path / "ssl" / "www"
    assert os.readlink(live) == ".www.versions/0002"
    for name, data in (("cert.pem", bundles[1].cert_pem), ("chain.pem", bundles[1].chain_pem),
                       ("fullchain.pem", bundles[1].fullchain_pem), ("privkey.pem", bundles[1].key_pem)):
        assert (live / name).read_bytes() == data
    assert (tmp_path / "haproxy" / "www.pem").read_bytes() == bundles[1].combined_pem
    assert deploy.deployed_version(cert) == 2
    assert deploy.check(cert, 2, bundles[1]) == []


def test_previous_combined_kept_as_certd_prev(tmp_path, bundles):
    """The file replaced by a switch stays available as .<name>.certd-prev, also a manual original."""
    hap = tmp_path / "haproxy"
    hap.mkdir()
    (hap / "www.pem").write_bytes(b"manual original")
    cert = _cert(tmp_path, live=False)
    _deploy(cert, 1, bundles[0])
    assert (hap / ".www.pem.certd-prev").read_bytes() == b"manual original"
    _deploy(cert, 2, bundles[1])
    assert (hap / ".www.pem.certd-prev").read_bytes() == bundles[0].combined_pem


def test_stage_is_idempotent(tmp_path, bundles):
    """Staging the same version twice changes nothing on disk."""
    cert = _cert(tmp_path)
    _deploy(cert, 1, bundles[0])
    deploy.stage(cert, 2, bundles[1])
    before = _snapshot(tmp_path)
    deploy.stage(cert, 2, bundles[1])
    assert _snapshot(tmp_path) == before


def test_switch_to_live_version_is_noop(tmp_path, bundles):
    """Switching to the version already live renames nothing (same symlink and file inodes)."""
    cert = _cert(tmp_path)
    _deploy(cert, 1, bundles[0])
    link, comb = tmp_path / "ssl" / "www", tmp_path / "haproxy" / "www.pem"
    before = (os.lstat(link).st_ino, os.lstat(comb).st_ino)
    deploy.switch(cert, 1)
    assert (os.lstat(link).st_ino, os.lstat(comb).st_ino) == before


def test_switch_unstaged_version_changes_nothing(tmp_path, bundles):
    """Switching to a version that was not staged is a StoreError and no target moves."""
    cert = _cert(tmp_path)
    _deploy(cert, 1, bundles[0])
    before = _snapshot(tmp_path)
    with pytest.raises(StoreError, match="version 5 is not staged"):
        deploy.switch(cert, 5)
    assert _snapshot(tmp_path) == before


def test_rollback_to_staged_version(tmp_path, bundles):
    """Switching back to a still-staged version serves it again and it is reported as deployed."""
    cert = _cert(tmp_path)
    _deploy(cert, 1, bundles[0])
    _deploy(cert, 2, bundles[1])
    _deploy(cert, 1, bundles[0])
    assert deploy.deployed_version(cert) == 1
    assert deploy.check(cert, 1, bundles[0]) == []


def test_live_dir_real_directory_is_refused(tmp_path, bundles):
    """A real directory at live_dir (certbot's, a manual setup) is never clobbered."""
    live = tmp_path / "ssl" / "www"
    live.mkdir(parents=True)
    (live / "cert.pem").write_bytes(b"theirs")
    cert = _cert(tmp_path, combined=False)
    with pytest.raises(StoreError, match="real directory.*move it away"):
        deploy.stage(cert, 1, bundles[0])
    with pytest.raises(StoreError):
        deploy.switch(cert, 1)
    assert (live / "cert.pem").read_bytes() == b"theirs" and not live.is_symlink()
    assert deploy.deployed_version(cert) is None


def test_nothing_deployed(tmp_path):
    """deployed_version is None before the first switch."""
    assert deploy.deployed_version(_cert(tmp_path)) is None


def test_restaging_live_version_with_other_content_is_refused(tmp_path, bundles):
    """Staging different files under the number that is live is a StoreError, live untouched."""
    cert = _cert(tmp_path)
    _deploy(cert, 1, bundles[0])
    with pytest.raises(StoreError, match="is live"):
        deploy.stage(cert, 1, bundles[1])
    assert deploy.check(cert, 1, bundles[0]) == []


# --- modes and owners ---------------------------------------------------------------------------

def test_key_modes_default_0600(tmp_path, bundles):
    """Without a group, every file holding a key is 0600 and certificates are 0644."""
    old = os.umask(0)
    try:
        cert = _cert(tmp_path)
        _deploy(cert, 1, bundles[0])
    finally:
        os.umask(old)
    live = tmp_path / "ssl" / "www"
    assert _mode(live / "privkey.pem") == 0o600
    assert _mode(tmp_path / "haproxy" / "www.pem") == 0o600
    assert _mode(tmp_path / "haproxy" / ".www.pem.certd-0001") == 0o600
    assert all(_mode(live / n) == 0o644 for n in ("cert.pem", "chain.pem", "fullchain.pem"))


def test_key_modes_with_group_0640(tmp_path, bundles):
    """With deploy.group, key files are 0640 and owned by that group."""
    cert = _cert(tmp_path, group="www-data")
    _deploy(cert, 1, bundles[0])
    for key in (tmp_path / "ssl" / "www" / "privkey.pem", tmp_path / "haproxy" / "www.pem"):
        assert _mode(key) == 0o640 and os.stat(key).st_gid == WWW_DATA, key


def test_plain_files_owner_group_mode(tmp_path, bundles):
    """Plain file targets get their configured owner/group/mode, or 0600 (key) / 0644 defaults."""
    d = tmp_path / "app"
    files = (FileTarget(d / "key.pem", "privkey", owner="nobody", group="www-data", mode=0o640),
             FileTarget(d / "cert.pem", "fullchain"),
             FileTarget(d / "both.pem", "combined"))
    cert = _cert(tmp_path, live=False, combined=False, files=files)
    _deploy(cert, 1, bundles[0])
    st = os.stat(d / "key.pem")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, NOBODY, WWW_DATA)
    assert (d / "key.pem").read_bytes() == bundles[0].key_pem
    assert _mode(d / "cert.pem") == 0o644 and (d / "cert.pem").read_bytes() == bundles[0].fullchain_pem
    assert _mode(d / "both.pem") == 0o600
    assert deploy.deployed_version(cert) == 1
    assert deploy.check(cert, 1, bundles[0]) == []


def test_staged_key_never_visible_wider(tmp_path, bundles):
    """While staging 100 versions, an observer never sees a key-holding file in the combined
    directory with more than 0640 or group-readable by another group."""
    cert = _cert(tmp_path, live=False, group="www-data")
    hap = tmp_path / "haproxy"
    hap.mkdir()
    stop, seen = threading.Event(), []

    def observe() -> None:
        while not stop.is_set():
            for e in os.scandir(hap):
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                seen.append((e.name, stat.S_IMODE(st.st_mode), st.st_gid))

    t = threading.Thread(target=observe)
    old = os.umask(0)
    t.start()
    try:
        for v in range(1, 101):
            deploy.stage(cert, v, bundles[v % 2])
    finally:
        stop.set()
        t.join()
        os.umask(old)
    assert seen
    assert [s for s in seen if s[1] & ~0o640 or (s[1] & 0o070 and s[2] != WWW_DATA)] == []


# --- atomicity ----------------------------------------------------------------------------------

def test_readers_always_see_matching_cert_and_key(tmp_path, bundles):
    """A reader resolving live_dir once per read, and one reading the combined file, always get
    a cert and key of the same version while the main thread switches 500 times."""
    cert = _cert(tmp_path)
    for v, b in ((1, bundles[0]), (2, bundles[1])):
        deploy.stage(cert, v, b)
    deploy.switch(cert, 1)
    pairs = {(b.cert_pem, b.key_pem) for b in bundles}
    combined = {b.combined_pem for b in bundles}
    live, comb = tmp_path / "ssl" / "www", tmp_path / "haproxy" / "www.pem"
    stop = threading.Event()
    bad: list[str] = []
    reads = [0, 0]

    def read_live_dir() -> None:
        while not stop.is_set():
            try:
                fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)  # resolve the symlink once
                try:
                    pair = tuple(_read_at(fd, n) for n in ("cert.pem", "privkey.pem"))
                finally:
                    os.close(fd)
            except OSError as e:
                bad.append(f"live_dir: {e}")
                continue
            reads[0] += 1
            if pair not in pairs:
                bad.append("live_dir: cert and key of different versions")

    def read_combined() -> None:
        while not stop.is_set():
            try:
                data = comb.read_bytes()
            except OSError as e:
                bad.append(f"combined: {e}")
                continue
            reads[1] += 1
            if data not in combined:
                bad.append("combined: not a whole version")

    readers = [threading.Thread(target=read_live_dir), threading.Thread(target=read_combined)]
    for r in readers:
        r.start()
    try:
        for i in range(500):
            deploy.switch(cert, 2 if i % 2 == 0 else 1)
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert bad == []
    assert reads[0] > 50 and reads[1] > 50


def _read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


# --- prune --------------------------------------------------------------------------------------

def test_prune_removes_unkept_never_live(tmp_path):
    """prune removes version dirs and staged files not kept, never the live one, zeroing keys."""
    cert = _cert(tmp_path)
    bs = {v: make_bundle() for v in range(1, 5)}
    for v, b in bs.items():
        deploy.stage(cert, v, b)
    deploy.switch(cert, 2)
    vroot, hap = tmp_path / "ssl" / ".www.versions", tmp_path / "haproxy"
    (vroot / ".0009.tmp-dead").mkdir()  # leftover of a killed stage
    (hap / "..www.pem.certd-0009.tmp-dead").write_bytes(b"partial key")
    with open(vroot / "0001" / "privkey.pem", "rb") as held:
        deploy.prune(cert, keep_versions={3, 4})
        assert set(held.read()) == {0}
    assert sorted(os.listdir(vroot)) == ["0002", "0003", "0004"]
    assert sorted(os.listdir(hap)) == [".www.pem.certd-0002", ".www.pem.certd-0003", ".www.pem.certd-0004", "www.pem"]
    assert deploy.check(cert, 2, bs[2]) == []


def test_prune_drops_prev_copy_of_pruned_version(tmp_path, bundles):
    """The .certd-prev backup goes with its version when that version is pruned (e.g. a
    compromised key), and stays while the version is kept."""
    cert = _cert(tmp_path, live=False)
    _deploy(cert, 1, bundles[0])
    _deploy(cert, 2, bundles[1])
    prev = tmp_path / "haproxy" / ".www.pem.certd-prev"
    deploy.prune(cert, {1, 2})
    assert prev.exists()
    deploy.prune(cert, {2})
    assert not prev.exists()
    assert (tmp_path / "haproxy" / "www.pem").read_bytes() == bundles[1].combined_pem


# --- failures -----------------------------------------------------------------------------------

def test_disk_full_stage_keeps_live_files(tmp_path, bundles):
    """On a full disk staging fails with StoreError; live files are as they were, no temp left."""
    with small_tmpfs(tmp_path / "mnt", size="128k") as mnt:
        cert = _cert(mnt)
        _deploy(cert, 1, bundles[0])
        fill(mnt)
        before = _snapshot(mnt)
        with pytest.raises(StoreError, match="No space left on device") as e:
            deploy.stage(cert, 2, bundles[1])
        assert bundles[1].key_pem not in str(e.value).encode()
        assert _snapshot(mnt) == before
        assert deploy.check(cert, 1, bundles[0]) == []


def test_read_only_deploy_dir_keeps_live_files(tmp_path, bundles):
    """On a read-only filesystem stage and switch fail with StoreError; live files unchanged."""
    with small_tmpfs(tmp_path / "mnt", size="128k") as mnt:
        cert = _cert(mnt)
        _deploy(cert, 1, bundles[0])
        deploy.stage(cert, 2, bundles[1])
        remount_ro(mnt)
        before = _snapshot(mnt)
        with pytest.raises(StoreError, match="read-only"):
            deploy.stage(cert, 3, make_bundle())
        with pytest.raises(StoreError, match="read-only"):
            deploy.switch(cert, 2)
        assert _snapshot(mnt) == before
        assert deploy.deployed_version(cert) == 1
        assert deploy.check(cert, 1, bundles[0]) == []


# --- drift --------------------------------------------------------------------------------------

def test_drift_detects_changed_byte_mode_and_owner(tmp_path, bundles):
    """check reports a changed byte, a wrong mode and a wrong owner, naming the file; no key bytes."""
    cert = _cert(tmp_path, group="www-data")
    _deploy(cert, 1, bundles[0])
    assert deploy.check(cert, 1, bundles[0]) == []
    live, comb = tmp_path / "ssl" / "www", tmp_path / "haproxy" / "www.pem"
    data = bytearray((live / "cert.pem").read_bytes())
    data[100] ^= 1
    os.chmod(live / "cert.pem", 0o600)  # writable for the edit below, and a wrong mode
    (live / "cert.pem").write_bytes(bytes(data))
    os.chmod(live / "cert.pem", 0o644)
    os.chmod(live / "privkey.pem", 0o644)
    os.chown(comb, NOBODY, 0)
    problems = deploy.check(cert, 1, bundles[0])
    assert f"{live / 'cert.pem'}: content differs from the stored version" in problems
    assert f"{live / 'privkey.pem'}: mode 0644, expected 0640" in problems
    assert any(p.startswith(f"{comb}: owner nobody") for p in problems)
    assert any(p.startswith(f"{comb}: group root") for p in problems)
    assert len(problems) == 4
    assert not any(bundles[0].key_pem.decode()[30:60] in p for p in problems)


def test_drift_detects_wrong_version_live(tmp_path, bundles):
    """check reports a live_dir pointing at another version than expected."""
    cert = _cert(tmp_path, combined=False)
    _deploy(cert, 1, bundles[0])
    deploy.stage(cert, 2, bundles[1])
    problems = deploy.check(cert, 2, bundles[1])
    assert problems == [f"{tmp_path / 'ssl' / 'www'}: points at '.www.versions/0001', expected .www.versions/0002"]


def test_restage_repairs_mode_drift(tmp_path, bundles):
    """Staging the live version again puts a drifted mode right without rewriting content."""
    cert = _cert(tmp_path)
    _deploy(cert, 1, bundles[0])
    os.chmod(tmp_path / "ssl" / "www" / "privkey.pem", 0o644)
    os.chmod(tmp_path / "haproxy" / "www.pem", 0o644)
    deploy.stage(cert, 1, bundles[0])
    assert deploy.check(cert, 1, bundles[0]) == []


def test_stage_cleans_leftovers_of_a_killed_switch(tmp_path, bundles):
    """Temporary symlinks and hard links a killed switch left beside the targets are removed."""
    cert = _cert(tmp_path)
    _deploy(cert, 1, bundles[0])
    os.symlink(".www.versions/0001", tmp_path / "ssl" / ".www.tmp-dead")
    os.link(tmp_path / "haproxy" / "www.pem", tmp_path / "haproxy" / ".www.pem.tmp-dead")
    deploy.stage(cert, 2, bundles[1])
    assert not os.path.lexists(tmp_path / "ssl" / ".www.tmp-dead")
    assert not os.path.lexists(tmp_path / "haproxy" / ".www.pem.tmp-dead")
    assert (tmp_path / "haproxy" / "www.pem").read_bytes() == bundles[0].combined_pem


# --- a deploy directory someone else can write (issue 12: F1, F2, F4) ----------------------------

def _victim_versions(tmp_path: Path, bundle: Bundle) -> Path:
    """Another certificate's stored versions: what F1 pointed .www.versions at."""
    victim = tmp_path / "victim"
    for v in ("0001", "0002"):
        (victim / v).mkdir(parents=True)
        (victim / v / "privkey.pem").write_bytes(bundle.key_pem)
        os.chmod(victim / v / "privkey.pem", 0o600)
    return victim


def test_versions_symlink_is_refused_and_its_target_untouched(tmp_path, bundles):
    """.www.versions replaced by a symlink (F1): stage, prune and destroy_keys refuse with one
    line naming it; the directory it points at keeps every file, bytes and modes."""
    cert = _cert(tmp_path, combined=False)
    _deploy(cert, 1, bundles[0])
    victim = _victim_versions(tmp_path, bundles[1])
    before = _snapshot(victim)
    root = tmp_path / "ssl" / ".www.versions"
    os.rename(root, tmp_path / "ssl" / "moved")
    os.symlink(victim, root)
    for action in (lambda: deploy.stage(cert, 2, bundles[1]), lambda: deploy.prune(cert, [2]),
                   lambda: deploy.destroy_keys(cert, [bundles[1].key_pem])):
        with pytest.raises(StoreError, match=rf"{root} is not a real directory") as e:
            action()
        assert "\n" not in str(e.value)
    assert _snapshot(victim) == before
    assert _mode(victim / "0001" / "privkey.pem") == 0o600


def test_versions_dir_owned_by_someone_else_is_refused(tmp_path, bundles):
    """A .www.versions directory the deploy dir's owner made (not certd's user) is refused."""
    cert = _cert(tmp_path, combined=False)
    root = tmp_path / "ssl" / ".www.versions"
    root.mkdir(parents=True)
    os.chown(root, NOBODY, -1)
    with pytest.raises(StoreError, match=r"owned by nobody .* refuses to use it"):
        deploy.stage(cert, 1, bundles[0])


def test_staged_symlink_is_not_followed_by_attribute_fix(tmp_path, bundles):
    """A staged name replaced by a symlink to a 0600 file (F2) does not make that file 0644:
    staging replaces the symlink and the target keeps its mode and bytes."""
    cert = _cert(tmp_path, live=False)
    deploy.stage(cert, 1, bundles[0])
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root secret\n")
    os.chmod(secret, 0o600)
    staged = tmp_path / "haproxy" / ".www.pem.certd-0001"
    os.unlink(staged)
    os.symlink(secret, staged)
    deploy.stage(cert, 1, bundles[0])
    deploy.switch(cert, 1)
    assert _mode(secret) == 0o600 and secret.read_bytes() == b"root secret\n"
    assert not staged.is_symlink() and (tmp_path / "haproxy" / "www.pem").read_bytes() == bundles[0].combined_pem


def test_switch_does_not_link_through_a_symlink(tmp_path, bundles):
    """A staged name swapped for a symlink just before switch (F4) is refused: the live file
    never becomes a hard link of the symlink's target."""
    cert = _cert(tmp_path, live=False)
    deploy.stage(cert, 1, bundles[0])
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root secret\n")
    os.chmod(secret, 0o600)
    staged = tmp_path / "haproxy" / ".www.pem.certd-0001"
    os.unlink(staged)
    os.symlink(secret, staged)
    with pytest.raises(StoreError, match="not staged|not a regular file certd staged"):
        deploy.switch(cert, 1)
    assert os.lstat(secret).st_nlink == 1
    assert not os.path.lexists(tmp_path / "haproxy" / "www.pem")
