"""fsutil on the real filesystem: modes from the first byte, atomic replace, clean failures."""

from __future__ import annotations

import fcntl
import grp
import os
import stat
import threading
from pathlib import Path

import pytest

from certd import fs as fsutil
from certd.core.errors import StoreError
from tests.support.tmpfs import fill, remount_ro, small_tmpfs

WWW_DATA = grp.getgrnam("www-data").gr_gid
SECRET = b"-----BEGIN PRIVATE KEY-----\nnot-a-real-key-but-secret\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def no_umask():
    """Run with umask 0 so only certd's own code keeps modes narrow."""
    old = os.umask(0)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _leftovers(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if fsutil.TMP_INFIX in n]


def test_atomic_write_sets_exact_mode_despite_umask(tmp_path):
    """The final mode is exactly the one asked for, whatever the process umask."""
    old = os.umask(0o077)
    try:
        fsutil.atomic_write(tmp_path / "cert.pem", b"cert", mode=0o644)
    finally:
        os.umask(old)
    assert (tmp_path / "cert.pem").read_bytes() == b"cert"
    assert _mode(tmp_path / "cert.pem") == 0o644


@pytest.mark.parametrize("mode,gid", [(0o600, -1), (0o640, WWW_DATA)])
def test_atomic_write_key_mode_and_group(tmp_path, no_umask, mode, gid):
    """A key file gets 0600, or 0640 owned by the configured group."""
    path = tmp_path / "privkey.pem"
    fsutil.atomic_write(path, SECRET, mode=mode, gid=gid)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == mode
    assert st.st_gid == (gid if gid != -1 else os.getegid())
    assert _leftovers(tmp_path) == []


def test_key_file_never_visible_with_wider_mode(tmp_path, no_umask):
    """An observer stat()ing the directory during 200 writes never sees a key file readable
    beyond 0640, nor group-readable while its group is not yet the configured one."""
    stop = threading.Event()
    seen: list[tuple[str, int, int]] = []

    def observe() -> None:
        while not stop.is_set():
            for entry in os.scandir(tmp_path):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                seen.append((entry.name, stat.S_IMODE(st.st_mode), st.st_gid))

    observer = threading.Thread(target=observe)
    observer.start()
    try:
        for i in range(200):
            fsutil.atomic_write(tmp_path / "privkey.pem", SECRET + str(i).encode(), mode=0o640, gid=WWW_DATA)
    finally:
        stop.set()
        observer.join()
    assert any(fsutil.TMP_INFIX in name for name, _, _ in seen), "the observer never caught a temporary file"
    wide = [(n, oct(m), g) for n, m, g in seen if m & ~0o640 or (m & 0o070 and g != WWW_DATA)]
    assert wide == []


def test_atomic_write_replaces_and_fsyncs_without_leftovers(tmp_path):
    """Replacing an existing file leaves only the new content and no temporary file."""
    path = tmp_path / "f"
    path.write_bytes(b"old")
    fsutil.atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_write_disk_full_keeps_old_file(tmp_path):
    """ENOSPC gives a one-line StoreError naming the path; the old file and no temp remain."""
    with small_tmpfs(tmp_path / "mnt") as mnt:
        path = mnt / "privkey.pem"
        path.write_bytes(b"old key")
        fill(mnt)
        with pytest.raises(StoreError) as e:
            fsutil.atomic_write(path, SECRET * 100, mode=0o600)
        msg = str(e.value)
        assert str(path) in msg and "No space left on device" in msg and "\n" not in msg
        assert b"secret" not in msg.encode()
        assert path.read_bytes() == b"old key"
        assert _leftovers(mnt) == []


def test_atomic_write_read_only_keeps_old_file(tmp_path):
    """EROFS gives a StoreError saying the filesystem is read-only; the old file is intact."""
    with small_tmpfs(tmp_path / "mnt") as mnt:
        path = mnt / "cert.pem"
        path.write_bytes(b"old")
        remount_ro(mnt)
        with pytest.raises(StoreError, match="Read-only file system.*read-only"):
            fsutil.atomic_write(path, b"new")
        assert path.read_bytes() == b"old"


def test_atomic_write_missing_directory_is_store_error(tmp_path):
    """A missing directory is a StoreError naming the target path."""
    with pytest.raises(StoreError, match=str(tmp_path / "nope" / "f")):
        fsutil.atomic_write(tmp_path / "nope" / "f", b"x")


def test_atomic_symlink_replaces_link(tmp_path):
    """atomic_symlink points an existing link somewhere else, leaving no temporary link."""
    link = tmp_path / "live"
    fsutil.atomic_symlink("a", link)
    fsutil.atomic_symlink("b", link)
    assert os.readlink(link) == "b"
    assert sorted(os.listdir(tmp_path)) == ["live"]


def test_atomic_symlink_refuses_real_directory(tmp_path):
    """Renaming a symlink over a real directory fails with StoreError; the directory stays."""
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "keep").write_text("x")
    with pytest.raises(StoreError):
        fsutil.atomic_symlink("elsewhere", tmp_path / "live")
    assert (tmp_path / "live" / "keep").read_text() == "x"
    assert _leftovers(tmp_path) == []


def test_secure_delete_zeroes_before_unlinking(tmp_path):
    """The key's bytes are overwritten with zeros (seen through an fd held open) and the name is gone."""
    path = tmp_path / "privkey.pem"
    path.write_bytes(SECRET)
    with open(path, "rb") as held:
        fsutil.secure_delete(path)
        assert held.read() == b"\0" * len(SECRET)
    assert not path.exists()


def test_secure_delete_spares_other_hard_links(tmp_path):
    """A file with another hard link is only unlinked: the other name keeps its content."""
    path, other = tmp_path / "staged", tmp_path / "live"
    path.write_bytes(SECRET)
    os.link(path, other)
    fsutil.secure_delete(path)
    assert other.read_bytes() == SECRET and not path.exists()


def test_secure_delete_missing_and_symlink(tmp_path):
    """A missing file is fine; a symlink is removed without touching its target."""
    fsutil.secure_delete(tmp_path / "missing")
    target = tmp_path / "target"
    target.write_bytes(SECRET)
    os.symlink(target, tmp_path / "link")
    fsutil.secure_delete(tmp_path / "link")
    assert target.read_bytes() == SECRET and not os.path.lexists(tmp_path / "link")


def test_ensure_dir_creates_exact_mode_and_parents(tmp_path, no_umask):
    """ensure_dir creates missing parents and the directory with exactly the mode asked for."""
    d = tmp_path / "a" / "b" / "state"
    fsutil.ensure_dir(d, 0o700)
    assert _mode(d) == 0o700 and _mode(d.parent) == 0o755
    fsutil.ensure_dir(d, 0o700)  # existing: fine


def test_ensure_dir_refuses_a_file(tmp_path):
    """A file where a directory should be is a StoreError telling the operator to move it."""
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        fsutil.ensure_dir(tmp_path / "f", 0o700)


def test_remove_stale_temps_skips_ones_in_use(tmp_path):
    """Leftover temporaries are removed, except one flock()ed by a writer right now."""
    stale, busy = tmp_path / ".f.tmp-aaaa", tmp_path / ".f.tmp-bbbb"
    stale.write_bytes(SECRET)
    busy.write_bytes(SECRET)
    (tmp_path / ".0003.tmp-cccc").mkdir()
    (tmp_path / ".0003.tmp-cccc" / "privkey.pem").write_bytes(SECRET)
    (tmp_path / "f").write_bytes(b"keep")
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        removed = fsutil.remove_stale_temps(tmp_path)
    finally:
        os.close(fd)
    assert sorted(removed) == [".0003.tmp-cccc", ".f.tmp-aaaa"]
    assert sorted(os.listdir(tmp_path)) == [".f.tmp-bbbb", "f"]


def test_temp_dir_discarded_unless_published(tmp_path):
    """A TempDir left without publish() is removed; a published one appears under its final name."""
    with fsutil.TempDir(tmp_path, "0001", mode=0o700) as t:
        t.write("privkey.pem", SECRET, mode=0o600)
    assert os.listdir(tmp_path) == []
    with fsutil.TempDir(tmp_path, "0001", mode=0o700) as t:
        t.write("privkey.pem", SECRET, mode=0o600)
        assert t.publish(tmp_path / "0001")
    assert os.listdir(tmp_path) == ["0001"]
    assert _mode(tmp_path / "0001") == 0o700 and _mode(tmp_path / "0001" / "privkey.pem") == 0o600


def test_temp_dir_write_on_a_full_disk_names_the_final_path(tmp_path):
    """A version that cannot be written is reported under its published name, not the hidden temp name."""
    with small_tmpfs(tmp_path / "mnt", size="256k") as mnt:
        with fsutil.TempDir(mnt, "0002", mode=0o700) as t:
            fill(mnt)
            with pytest.raises(StoreError) as e:
                t.write("cert.pem", SECRET * 4096)
        msg = str(e.value)
        assert msg.startswith(f"cannot write {mnt / '0002' / 'cert.pem'}: No space left on device"), msg
        assert fsutil.TMP_INFIX not in msg
        assert [n for n in os.listdir(mnt) if n != ".filler"] == []


# --- descriptor-based operations (issue 12: F3, F5) ---------------------------------------------

def _victim(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    for i in range(5):
        (victim / f"{i}.pem").write_bytes(SECRET)
    return victim


def test_secure_rmtree_swapped_subdir_is_unlinked_not_followed(tmp_path, monkeypatch):
    """A subdirectory replaced by a symlink between listing and removal (F3) is only unlinked:
    the files it points at keep their bytes."""
    victim = _victim(tmp_path)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_bytes(SECRET)
    real_lstat = fsutil.lstat_at
    swapped = []

    def swap_then_lstat(dirfd, name):
        st = real_lstat(dirfd, name)
        if name == "sub" and not swapped:
            swapped.append(1)
            os.rename(tree / "sub", tmp_path / "moved")
            os.symlink(victim, tree / "sub")
        return st

    monkeypatch.setattr(fsutil, "lstat_at", swap_then_lstat)
    fsutil.secure_rmtree(tree)
    assert sorted(os.listdir(victim)) == [f"{i}.pem" for i in range(5)]
    assert all((victim / f"{i}.pem").read_bytes() == SECRET for i in range(5))
    assert not os.path.lexists(tree)


def test_secure_delete_never_chmods_through_a_symlink(tmp_path):
    """secure_delete of a symlink to a read-only file (F5) leaves the target's mode and bytes."""
    target = tmp_path / "root-only"
    target.write_bytes(SECRET)
    os.chmod(target, 0o400)
    os.symlink(target, tmp_path / "key")
    fsutil.secure_delete(tmp_path / "key")
    assert _mode(target) == 0o400 and target.read_bytes() == SECRET
    assert not os.path.lexists(tmp_path / "key")


def test_delete_at_leaves_a_replaced_entry(tmp_path):
    """delete_at with the inode it expected leaves a file that was replaced meanwhile."""
    (tmp_path / "a").write_bytes(SECRET)
    st = os.lstat(tmp_path / "a")
    os.rename(tmp_path / "a", tmp_path / "kept")  # still alive: its inode cannot be reused
    (tmp_path / "a").write_bytes(b"other")
    with fsutil.dir_fd(tmp_path) as d:
        assert not fsutil.delete_at(d, "a", expected=(st.st_dev, st.st_ino))
    assert (tmp_path / "a").read_bytes() == b"other"


def test_open_own_dir_refuses_symlink_and_foreign_owner(tmp_path):
    """A symlink, or a directory owned by another user, is refused with one line."""
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    (tmp_path / "theirs").mkdir()
    os.chown(tmp_path / "theirs", 65534, 65534)
    with fsutil.dir_fd(tmp_path) as d:
        with pytest.raises(StoreError, match="not a real directory"):
            fsutil.open_own_dir(d, "link", tmp_path / "link")
        with pytest.raises(StoreError, match=r"owned by .*65534.*refuses"):
            fsutil.open_own_dir(d, "theirs", tmp_path / "theirs")
        os.close(fsutil.open_own_dir(d, "real", tmp_path / "real"))


def test_remove_stale_temps_leaves_other_users_lookalikes(tmp_path):
    """A temp-looking file certd's user does not own is not certd's leftover: it stays."""
    theirs = tmp_path / ".f.tmp-aaaa"
    theirs.write_bytes(SECRET)
    os.chown(theirs, 65534, 65534)
    assert fsutil.remove_stale_temps(tmp_path) == []
    assert theirs.read_bytes() == SECRET


def test_an_atomic_write_survives_a_sweep_taking_its_temporary_file(tmp_path: Path) -> None:
    """A stale-temp sweep in another thread may take a writer's temporary file between its
    creation and its flock; the write still lands, every time (76 of 3,000 failed before)."""
    stop, errors, swept = threading.Event(), [], [0]

    def sweeper() -> None:
        while not stop.is_set():
            swept[0] += len(fsutil.remove_stale_temps(tmp_path, (".lease.json",)))

    t = threading.Thread(target=sweeper)
    t.start()
    try:
        for i in range(3000):
            try:
                fsutil.atomic_write(tmp_path / "lease.json", b"%d\n" % i, mode=0o600)
            except StoreError as e:
                errors.append(str(e))
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert (tmp_path / "lease.json").read_bytes() == b"2999\n"
    assert [p.name for p in tmp_path.iterdir()] == ["lease.json"]
