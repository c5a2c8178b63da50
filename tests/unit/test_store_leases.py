"""FileStore's leases across real processes, and what only files can show (modes, restarts)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from certd.core.clock import SystemClock
from certd.core.errors import LockBusy, StoreError
from certd.store.files import FileStore
from certd.store.port import Fenced, OrderJournal
from tests.support.certs import make_bundle

ROOT = Path(__file__).resolve().parents[2]

# Takes a 1 s lease, says its token, waits for a line on stdin, then tries a fenced write.
_STALLER = """
import sys
from pathlib import Path
from certd.store.files import FileStore
from certd.store.port import Fenced
store = FileStore(Path(sys.argv[1]), node="staller")
lease = store.lease("www", "staller", 1.0)
print(lease.token, flush=True)
sys.stdin.readline()
try:
    store.save_rotation("staller", "www", {"step": "switched"}, lease=lease)
    print("written", flush=True)
except Fenced as e:
    print("fenced:", e, flush=True)
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_stalled_process_is_fenced_after_its_ttl(tmp_path):
    """A process SIGSTOPped while holding a 1 s lease keeps its flock, yet another process takes
    the lease once the TTL ran out, and the stalled one's write after SIGCONT is refused."""
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    staller = subprocess.Popen([sys.executable, "-c", _STALLER, str(state)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
    try:
        token = int(staller.stdout.readline())
        os.kill(staller.pid, signal.SIGSTOP)
        store = FileStore(state, node="taker")
        with pytest.raises(LockBusy):
            store.lease("www", "taker", 30.0)  # unexpired: the staller may still be working
        taken = store.lease("www", "taker", 30.0, wait=20.0)  # polls until the staller's TTL ran out
        assert taken.token == token + 1
        os.kill(staller.pid, signal.SIGCONT)
        out, _ = staller.communicate("go\n", timeout=30)
        assert out.startswith("fenced:") and "stale" in out
        assert store.load_rotation("staller", "www") is None
    finally:
        if staller.poll() is None:
            os.kill(staller.pid, signal.SIGCONT)
            staller.kill()
            staller.wait()


def test_tokens_survive_a_restart_of_the_store(tmp_path):
    """A new FileStore on the same directory continues the token sequence (lease.json)."""
    first = FileStore(tmp_path / "state")
    lease = first.lease("www", "a", 10.0)
    first.release(lease)
    again = FileStore(tmp_path / "state")
    assert again.lease("www", "a", 10.0).token == lease.token + 1
    assert _mode(tmp_path / "state/certs/www/lease.json") == 0o600


def test_a_symlink_at_lease_json_is_refused_not_followed(tmp_path):
    """lease.json swapped for a symlink (to another record, or dangling) is refused with the
    path; certd neither imports the other record's token nor starts the tokens again at 1."""
    store = FileStore(tmp_path / "state")
    store.release(store.lease("www", "a", 10.0))
    elsewhere = tmp_path / "other.json"
    elsewhere.write_text('{"token": 99, "owner": null, "expires": 0.0, "flock": true}\n')
    record = tmp_path / "state/certs/www/lease.json"
    before = record.read_bytes()
    record.unlink()
    for target in (elsewhere, tmp_path / "missing.json"):
        if record.is_symlink():
            record.unlink()
        record.symlink_to(target)
        with pytest.raises(StoreError, match="lease.json.*symbolic link"):
            store.lease("www", "a", 10.0)
    record.unlink()
    record.write_bytes(before)
    assert store.lease("www", "a", 10.0).token == 2


def test_order_key_is_0600_and_zeroed_on_removal(tmp_path):
    """The order journal's key file is 0600 from creation and goes away with the record."""
    store = FileStore(tmp_path / "state", clock=SystemClock())
    lease = store.lease("www", "a", 10.0)
    store.save_order("www", OrderJournal("https://ca.test/o/1", make_bundle().key_pem, "t"), lease=lease)
    d = tmp_path / "state/certs/www"
    assert _mode(d / "order.key") == 0o600 and _mode(d / "order.json") == 0o600
    assert b"PRIVATE KEY" not in (d / "order.json").read_bytes()
    store.save_order("www", None, lease=lease)
    assert not (d / "order.key").exists() and not (d / "order.json").exists()


def test_stale_lock_write_is_refused_across_processes(tmp_path):
    """A fenced write with a token older than the newest is refused even from a fresh client."""
    a = FileStore(tmp_path / "state", node="a")
    old = a.lease("www", "a", 10.0)
    a.release(old)
    b = FileStore(tmp_path / "state", node="b")
    b.lease("www", "b", 10.0)
    with pytest.raises(Fenced):
        a.add_version("www", make_bundle(), {}, lease=old)
    assert a.versions("www") == []
