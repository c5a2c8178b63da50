"""FileStore on the real filesystem: versions, current pointer, prune, journal, accounts, lock."""

from __future__ import annotations

import grp
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from certd import fs as fsutil
from certd.core.errors import LockBusy, StoreError
from certd.store.files import FileStore
from tests.support.certs import make_bundle
from tests.support.tmpfs import fill, small_tmpfs

ROOT = Path(__file__).resolve().parents[2]
WWW_DATA = grp.getgrnam("www-data").gr_gid


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def store(tmp_path) -> FileStore:
    return FileStore(tmp_path / "state")


def _add(store: FileStore, n: int, name: str = "www") -> list[int]:
    return [store.add_version(name, make_bundle(), {"reason": f"test {i}"}) for i in range(n)]


# --- versions -------------------------------------------------------------------------------

def test_add_version_layout_and_modes(store, tmp_path):
    """A version is a directory of PEM files + meta.json; directories 0700, the key 0600."""
    old = os.umask(0)
    try:
        v = store.add_version("www", make_bundle(), {"reason": "first"})
    finally:
        os.umask(old)
    vdir = tmp_path / "state" / "certs" / "www" / "versions" / "0001"
    assert v == 1
    assert sorted(os.listdir(vdir)) == ["cert.pem", "chain.pem", "fullchain.pem", "meta.json", "privkey.pem"]
    for d in (tmp_path / "state", tmp_path / "state" / "certs", vdir.parent, vdir):
        assert _mode(d) == 0o700, d
    assert _mode(vdir / "privkey.pem") == 0o600
    assert _mode(vdir / "cert.pem") == 0o644


def test_key_group_makes_key_0640_to_group(tmp_path):
    """With key_group the key file is 0640 owned by that group, and its directories 0750."""
    store = FileStore(tmp_path / "state", key_group="www-data")
    store.add_version("www", make_bundle(), {})
    key = tmp_path / "state" / "certs" / "www" / "versions" / "0001" / "privkey.pem"
    assert _mode(key) == 0o640 and os.stat(key).st_gid == WWW_DATA
    assert _mode(key.parent) == 0o750 and os.stat(key.parent).st_gid == WWW_DATA


def test_unknown_key_group_is_refused(tmp_path):
    """A key_group that does not exist is a StoreError naming it."""
    with pytest.raises(StoreError, match="no-such-group"):
        FileStore(tmp_path, key_group="no-such-group")


def test_versions_ascending_and_not_current_until_set(store):
    """add_version numbers 1, 2, 3...; none is current until set_current; load round-trips."""
    bundles = [make_bundle(), make_bundle()]
    assert [store.add_version("www", b, {"i": i}) for i, b in enumerate(bundles)] == [1, 2]
    assert store.versions("www") == [1, 2]
    assert store.current("www") is None
    store.set_current("www", 2)
    assert store.current("www") == 2
    sv = store.load("www", 1)
    assert (sv.name, sv.version, sv.meta) == ("www", 1, {"i": 0})
    assert sv.bundle == bundles[0]
    assert store.names() == ["www"]


def test_set_current_is_one_symlink(store, tmp_path):
    """current is a relative symlink to versions/NNNN, replaced by rename (no temp left)."""
    _add(store, 2)
    store.set_current("www", 1)
    store.set_current("www", 2)
    cdir = tmp_path / "state" / "certs" / "www"
    assert os.readlink(cdir / "current") == "versions/0002"
    assert not [n for n in os.listdir(cdir) if ".tmp-" in n]


def test_set_current_unknown_version(store):
    """Pointing current at a version that does not exist is a StoreError; current is unchanged."""
    _add(store, 1)
    store.set_current("www", 1)
    with pytest.raises(StoreError, match="version 7"):
        store.set_current("www", 7)
    assert store.current("www") == 1


def test_load_missing_or_corrupt(store, tmp_path):
    """load raises StoreError for a missing version, a corrupt meta.json or a missing cert."""
    _add(store, 2)
    with pytest.raises(StoreError, match="version 9"):
        store.load("www", 9)
    vdir = tmp_path / "state" / "certs" / "www" / "versions"
    (vdir / "0001" / "meta.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        store.load("www", 1)
    (vdir / "0002" / "cert.pem").unlink()
    with pytest.raises(StoreError, match="cert.pem is missing"):
        store.load("www", 2)


def test_meta_must_be_json_and_keyless(store):
    """meta that is not JSON-able or that contains key material is refused before writing."""
    b = make_bundle()
    with pytest.raises(ValueError, match="JSON"):
        store.add_version("www", b, {"when": object()})
    with pytest.raises(ValueError, match="key material"):
        store.add_version("www", b, {"oops": b.key_pem.decode()})
    assert store.versions("www") == []


def test_half_written_version_is_invisible_and_cleaned(store, tmp_path):
    """A leftover .NNNN.tmp-x directory is not a version and the next add_version removes it."""
    _add(store, 1)
    vroot = tmp_path / "state" / "certs" / "www" / "versions"
    stale = vroot / ".0002.tmp-x"
    stale.mkdir()
    (stale / "privkey.pem").write_bytes(b"half a key")
    assert store.versions("www") == [1]
    assert store.add_version("www", make_bundle(), {}) == 2
    assert sorted(os.listdir(vroot)) == ["0001", "0002"]


# --- prune and destroy ----------------------------------------------------------------------

def test_prune_keeps_newest_never_current(store):
    """prune leaves exactly `keep` versions, removing the oldest, and never the current one."""
    _add(store, 6)
    store.set_current("www", 6)
    assert store.prune("www", 3) == [1, 2, 3]
    assert store.versions("www") == [4, 5, 6]
    assert store.prune("www", 3) == []


def test_prune_skips_current_and_protected(store):
    """An old current and a protected version survive; the newest fill the rest of `keep`."""
    _add(store, 7)
    store.set_current("www", 2)
    assert store.prune("www", 3, protect={3}) == [1, 4, 5, 6]
    assert store.versions("www") == [2, 3, 7]
    assert store.current("www") == 2


def test_prune_zeroes_keys(store, tmp_path):
    """A pruned version's key bytes are overwritten with zeros before the file disappears."""
    _add(store, 2)
    store.set_current("www", 2)
    key = tmp_path / "state" / "certs" / "www" / "versions" / "0001" / "privkey.pem"
    with open(key, "rb") as held:
        store.prune("www", 1)
        assert set(held.read()) == {0}
    assert not key.parent.exists()


def test_destroy_key_keeps_cert_for_the_record(store, tmp_path):
    """destroy_key zeroes and removes the key, keeps cert and meta, and forbids making it current."""
    _add(store, 2)
    key = tmp_path / "state" / "certs" / "www" / "versions" / "0001" / "privkey.pem"
    cert = store.load("www", 1).bundle.cert_pem
    with open(key, "rb") as held:
        store.destroy_key("www", 1)
        assert set(held.read()) == {0}
    sv = store.load("www", 1)
    assert sv.bundle.key_pem == b"" and sv.bundle.cert_pem == cert and sv.meta["key_destroyed"] is True
    with pytest.raises(StoreError, match="destroyed"):
        store.set_current("www", 1)


def test_update_meta_merges(store):
    """update_meta merges keys into meta.json (e.g. key_compromised)."""
    store.add_version("www", make_bundle(), {"reason": "r"})
    store.update_meta("www", 1, {"key_compromised": True})
    assert store.load("www", 1).meta == {"reason": "r", "key_compromised": True}


# --- journal, state, accounts ---------------------------------------------------------------

def test_journal_round_trip_and_removal(store, tmp_path):
    """save_journal writes a 0600 JSON file, load_journal reads it back, None removes it."""
    assert store.load_journal("www") is None
    store.save_journal("www", {"step": "staged", "to_version": 2})
    path = tmp_path / "state" / "certs" / "www" / "nodes" / store.node / "journal.json"
    assert _mode(path) == 0o600
    assert store.load_journal("www") == {"step": "staged", "to_version": 2}
    store.save_journal("www", None)
    assert not path.exists() and store.load_journal("www") is None
    store.save_journal("www", None)  # removing twice is fine


def test_corrupt_journal_is_store_error(store, tmp_path):
    """A journal that is not a JSON object is a StoreError naming the file."""
    store.save_journal("www", {"x": 1})
    (tmp_path / "state" / "certs" / "www" / "nodes" / store.node / "journal.json").write_text("[1, 2")
    with pytest.raises(StoreError, match="journal.json"):
        store.load_journal("www")


def test_state_round_trip(store):
    """save_state/load_state keep per-certificate bookkeeping."""
    assert store.load_state("www") is None
    store.save_state("www", {"failures": 2})
    assert store.load_state("www") == {"failures": 2}


def test_account_round_trip(store, tmp_path):
    """An account is stored per directory URL: key 0600, registration, URL for humans."""
    url = "https://127.0.0.1:14000/dir"
    assert store.load_account(url) is None
    store.save_account(url, b"-----BEGIN PRIVATE KEY-----\nk\n-----END PRIVATE KEY-----\n", '{"uri": "x"}')
    assert store.load_account(url) == (b"-----BEGIN PRIVATE KEY-----\nk\n-----END PRIVATE KEY-----\n", '{"uri": "x"}')
    assert store.load_account("https://other/dir") is None
    (adir,) = (tmp_path / "state" / "accounts").iterdir()
    assert len(adir.name) == 16
    assert _mode(adir / "key.pem") == 0o600 and _mode(adir) == 0o700
    assert (adir / "directory.txt").read_text().strip() == url


# --- failures ---------------------------------------------------------------------------------

def test_disk_full_add_version_leaves_store_as_it_was(tmp_path):
    """On a full disk add_version raises StoreError; versions and current are unchanged, no temp left."""
    with small_tmpfs(tmp_path / "mnt", size="256k") as mnt:
        store = FileStore(mnt / "state")
        b = make_bundle()
        store.add_version("www", b, {})
        store.set_current("www", 1)
        fill(mnt)
        with pytest.raises(StoreError, match="No space left") as e:
            store.add_version("www", make_bundle(), {})
        assert b.key_pem not in str(e.value).encode()
        assert store.versions("www") == [1] and store.current("www") == 1
        assert store.load("www", 1).bundle == b
        vroot = mnt / "state" / "certs" / "www" / "versions"
        assert os.listdir(vroot) == ["0001"]


# --- the lock -------------------------------------------------------------------------------

_HOLD = """
import sys, time
from pathlib import Path
from certd.store.files import FileStore
with FileStore(Path(sys.argv[1])).lock("www"):
    print("locked", flush=True)
    time.sleep(120)
"""

_TRY = """
import sys
from pathlib import Path
from certd.core.errors import LockBusy
from certd.store.files import FileStore
try:
    with FileStore(Path(sys.argv[1])).lock("www", timeout=float(sys.argv[2])):
        print("acquired", flush=True)
except LockBusy as e:
    print("busy:", e, flush=True)
"""


def _python(snippet: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", snippet, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, **kw)


def test_lock_excludes_other_process_and_dies_with_holder(tmp_path):
    """A second process gets LockBusy while a first holds the lock, and gets it promptly once
    the holder is SIGKILLed: no stale lock."""
    state = str(tmp_path / "state")
    holder = _python(_HOLD, state)
    try:
        assert holder.stdout.readline().strip() == "locked"
        quick = _python(_TRY, state, "0")
        out, _ = quick.communicate(timeout=30)
        assert out.startswith("busy:") and "another certd process" in out
        waiter = _python(_TRY, state, "60")
        time.sleep(0.5)
        assert waiter.poll() is None  # still waiting for the lock
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        killed_at = time.monotonic()
        out, _ = waiter.communicate(timeout=30)
        assert out.strip() == "acquired"
        assert time.monotonic() - killed_at < 5
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_lock_excludes_threads(store):
    """Two threads of one process exclude each other; a second taker with timeout 0 gets LockBusy."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.lock("www"):
            holding.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert holding.wait(10)
        with pytest.raises(LockBusy, match="www"):
            with store.lock("www", timeout=0):
                pass
        with pytest.raises(LockBusy, match="after waiting 0.1s"):
            with store.lock("www", timeout=0.1):
                pass
    finally:
        release.set()
        t.join()
    with store.lock("www", timeout=1):
        pass


def test_lock_serialises_many_threads(store):
    """Four threads doing read-modify-write under the lock never overlap."""
    inside, overlaps, counter = [0], [0], [0]

    def work() -> None:
        for _ in range(25):
            with store.lock("www", timeout=30):
                inside[0] += 1
                if inside[0] > 1:
                    overlaps[0] += 1
                value = counter[0]
                time.sleep(0.0005)
                counter[0] = value + 1
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps[0] == 0 and counter[0] == 100


def test_lock_is_per_certificate(store):
    """Holding one certificate's lock does not block another's."""
    with store.lock("www"):
        with store.lock("api", timeout=0):
            pass


def test_account_registration_is_serialized_across_processes(tmp_path: Path) -> None:
    """FileStore.account_lock: while one process registers (holds the lock), another waits
    and then gives up with one line naming the lock; other CAs are not blocked."""
    import multiprocessing

    from certd.core.errors import LockBusy
    url = "https://127.0.0.1:14000/dir"
    store = FileStore(tmp_path / "state")
    held, release = multiprocessing.Event(), multiprocessing.Event()

    def hold() -> None:
        with FileStore(tmp_path / "state").account_lock(url):
            held.set()
            release.wait(10)

    proc = multiprocessing.get_context("fork").Process(target=hold)
    proc.start()
    try:
        assert held.wait(10)
        with pytest.raises(LockBusy, match=r"registering the ACME account .*\.lock"):
            with store.account_lock(url, timeout=0.2):
                pass
        with store.account_lock("https://other.example.test/dir", timeout=0.2):
            pass
        lock = next((tmp_path / "state" / "accounts").glob("*.lock"))
        assert lock.stat().st_mode & 0o777 == 0o600
    finally:
        release.set()
        proc.join(10)
    with store.account_lock(url, timeout=2):  # free again once the holder is done
        pass


def _journal(step: str, steps: int, rid: str = "r1") -> dict[str, object]:
    return {"id": rid, "name": "www", "kind": "renew", "from_version": 1, "to_version": 2, "step": step,
            "started": "2026-01-01T00:00:00Z", "history": [[s, "t"] for s in ["issued", "staged", "switched"][:steps]]}


def test_later_journal_steps_are_not_fsynced_and_a_torn_one_falls_back(store, tmp_path):
    """issued is fsynced; staged/switched are not, and a torn or foreign journal.next is ignored."""
    store.save_journal("www", _journal("issued", 1, rid="r0"))  # the directories exist from now on
    with fsutil.counting_fsyncs() as first:
        store.save_journal("www", _journal("issued", 1))
    with fsutil.counting_fsyncs() as later:
        store.save_journal("www", _journal("staged", 2))
        store.save_journal("www", _journal("switched", 3))
    assert first.total == 2 and later.total == 0
    assert store.load_journal("www")["step"] == "switched"
    nxt = tmp_path / "state" / "certs" / "www" / "nodes" / store.node / "journal.next"
    nxt.write_bytes(b"\0" * 40)  # what a power loss can leave of a file never fsynced
    assert store.load_journal("www")["step"] == "issued"  # recovery redoes the (idempotent) steps
    nxt.write_text(json.dumps(_journal("switched", 3, rid="older")))  # an earlier rotation's
    assert store.load_journal("www")["step"] == "issued"
    store.save_journal("www", None)
    assert store.load_journal("www") is None and not nxt.exists()


#: FileStore's methods that write nothing a certificate's status or plan is read from (reads,
#: leases and locks, accounts): every other method must be marked @writes (see own_writes).
WRITE_NO_CERTIFICATE = {"account_lock", "applied", "change_token", "check", "check_lock", "current", "desired",
                        "foreign_rotations", "lease", "load", "load_account", "load_info", "load_journal",
                        "load_order", "load_rotation", "load_state", "lock", "names", "own_writes", "read_state",
                        "release", "renew", "save_account", "subscribe", "versions"}


def test_every_method_that_writes_a_certificate_changes_own_writes(tmp_path):
    """The daemon's status listing trusts its facts while own_writes() is unchanged, so a write
    method that forgot to say so would leave a listing showing the old files: a new method is
    either marked @writes or listed above as writing no certificate's files."""
    import inspect
    methods = {n for n, m in inspect.getmembers(FileStore, callable) if not n.startswith("_")}
    unmarked = {n for n in methods if not getattr(getattr(FileStore, n), "writes_a_certificate", False)}
    assert unmarked == WRITE_NO_CERTIFICATE

    one, two = FileStore(tmp_path / "state"), FileStore(tmp_path / "state")  # shared within the process
    before = one.own_writes("www")
    two.set_current("www", two.add_version("www", make_bundle(("www.example.test",)), {}))
    after = one.own_writes("www")
    assert after != before and one.own_writes("api") == 0
    with pytest.raises(StoreError):
        two.set_current("www", 7)  # failed part-way or at once: counted all the same
    assert one.own_writes("www") != after
