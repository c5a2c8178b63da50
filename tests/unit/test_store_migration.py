"""A state directory written by the release before the store seam (tests/fixtures/state-v1.tar.gz,
made by that release's FileStore) is migrated on first open: journaled, resumable, idempotent."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from certd.core.errors import StoreError
from certd.store import migrate
from certd.store.files import FileStore

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests/fixtures/state-v1.tar.gz"
NODE = "host1"


@pytest.fixture
def state(tmp_path) -> Path:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="tar")
    return tmp_path / "state"


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every file's bytes and every link's target under ``root`` (what a second migration must not change)."""
    out: dict[str, bytes | str] = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = os.readlink(p) if p.is_symlink() else p.read_bytes()
    return out


def test_first_open_migrates_the_old_layout(state):
    """Opening a format-1 directory moves the journal to this node, records applied = current,
    marks the directory format 2 and keeps versions, pointer, state and account readable."""
    old_journal = json.loads((state / "certs/www/journal.json").read_text())
    store = FileStore(state, node=NODE)
    assert json.loads((state / "store.json").read_text()) == {"format": 2}
    assert not (state / "migration.json").exists()
    assert not (state / "certs/www/journal.json").exists()
    assert store.load_journal("www") == old_journal == store.load_rotation(NODE, "www")
    assert (store.desired("www"), store.applied(NODE, "www")) == (2, 2)
    assert (store.desired("api"), store.applied(NODE, "api")) == (1, 1)
    assert store.versions("www") == [1, 2, 3] and store.load("www", 3).bundle.key_pem
    assert store.read_state("www")[0] == {"failures": 1, "last_result": "failed", "last_error": "CA said no"}
    assert store.load_account("https://ca.test/dir") is not None
    lease = store.lease("www", "me", 10.0)
    assert lease.token == 2  # the migration's own lock() was token 1
    store.save_journal("www", None)  # finishing the rotation clears it; it never comes back
    assert store.load_journal("www") is None


def test_migration_is_idempotent(state):
    """A second open changes nothing; running the migration again by hand changes nothing."""
    FileStore(state, node=NODE)
    before = _tree(state)
    store = FileStore(state, node=NODE)
    assert _tree(state) == before
    migrate.migrate_cert(store, "www")
    assert {k: v for k, v in _tree(state).items() if not k.endswith("lease.json")} == \
        {k: v for k, v in before.items() if not k.endswith("lease.json")}


def test_killed_migration_resumes_on_next_open(state):
    """A process SIGKILLed after migrating the first certificate leaves the journal naming it
    and no marker; the next open finishes the rest and removes the journal."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), migrate.CRASH_ENV: "migrated_one"}
    code = "import sys; from pathlib import Path; from certd.store.files import FileStore; " \
           "FileStore(Path(sys.argv[1]), node=sys.argv[2])"
    proc = subprocess.run([sys.executable, "-c", code, str(state), NODE], env=env, timeout=60)
    assert proc.returncode == -9
    journal = json.loads((state / "migration.json").read_text())
    assert journal["done"] == ["api"] and not (state / "store.json").exists()
    store = FileStore(state, node=NODE)
    assert migrate.format_of(state) == 2 and not (state / "migration.json").exists()
    assert store.load_rotation(NODE, "www")["to_version"] == 3 and store.applied(NODE, "api") == 1


def test_certificate_busy_with_an_old_release_is_left_for_the_next_open(state):
    """A certificate whose lock an older certd holds is skipped (no wait, no marker) and its old
    journal is still read; the next open after it let go completes the migration."""
    fd = os.open(state / "certs/www/lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what certd <= issue 13 does while rotating
        store = FileStore(state, node=NODE)
        assert migrate.format_of(state) == 1
        assert store.applied(NODE, "api") == 1 and store.applied(NODE, "www") is None
        assert store.load_journal("www")["step"] == "staged"  # the old place, meanwhile
    finally:
        os.close(fd)
    FileStore(state, node=NODE)
    assert migrate.format_of(state) == 2 and (state / f"certs/www/nodes/{NODE}/journal.json").exists()


def test_a_newer_format_is_refused(state):
    """A directory written by a newer certd (format 3) is not opened."""
    (state / "store.json").write_text('{"format": 3}')
    with pytest.raises(StoreError, match="newer certd"):
        FileStore(state, node=NODE)


def test_new_directory_is_marked_current_without_migrating(tmp_path):
    """A state directory this release creates gets store.json at once (nothing to migrate)."""
    store = FileStore(tmp_path / "state")
    store.lease("www", "me", 10.0)
    assert migrate.format_of(tmp_path / "state") == 2
