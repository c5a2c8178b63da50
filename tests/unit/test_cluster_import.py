"""certd.store.clusterimport on a private PostgreSQL (tests/support/postgres.py): what moves
from a FileStore (version numbers with gaps, plain or sealed keys re-sealed, a destroyed key,
state, an order in flight, accounts), that a rerun resumes, and what is refused."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from certd.core.errors import UsageError
from certd.crypto.custody import FileKek, KeyRing, is_sealed
from certd.store.files import FileStore
from certd.store.port import OrderJournal
from tests.support.certs import make_bundle

psycopg = pytest.importorskip("psycopg")
from certd.store.clusterimport import Importer  # noqa: E402
from certd.store.pg import PgStore  # noqa: E402

NOW = datetime(2026, 12, 3, 8, 0, tzinfo=timezone.utc)
DIRECTORY = "https://ca.example.test/dir"


def ring() -> KeyRing:
    return KeyRing(FileKek(bytes(range(32)), "kek"))


def host(root: Path, keyring: KeyRing | None) -> FileStore:
    """www: versions 1-3 with 1 pruned and 2's key destroyed, 3 desired; state, an order, an account."""
    store = FileStore(root, keyring=keyring)
    with store.lock("www"):
        for _ in range(3):
            store.add_version("www", make_bundle(), {"reason": "test"})
        store.set_current("www", 3)
        store.destroy_key("www", 2)
        store.prune("www", 2)
        store.save_state("www", {"failures": 2, "ari": {"window": "x"}})
        store.save_order("www", OrderJournal("https://ca.example.test/order/1", make_bundle().key_pem, "now"))
    store.save_account(DIRECTORY, make_bundle().key_pem, '{"kid": "acct/1"}')
    return store


def run(source: FileStore, target: PgStore, node: str = "web1", **kw: Any) -> Any:
    return Importer(source, target, ring(), node=node, initiator="uid=0(root)", now=NOW).run(**kw)


@pytest.fixture
def target(postgres: str) -> Any:
    with PgStore(postgres, node="web1", keyring=ring()) as store:
        yield store


@pytest.mark.parametrize("sealed", [False, True], ids=["plain-host", "sealed-host"])
def test_everything_moves_with_its_numbers_and_keys_sealed(tmp_path: Path, target: PgStore, sealed: bool) -> None:
    """Versions keep their numbers (a destroyed key stays so); pointers, state, order, account move; keys sealed."""
    source = FileStore(tmp_path, keyring=ring())
    host(tmp_path, ring() if sealed else None)
    original = source.load("www", 3).bundle
    report = run(source, target)
    assert [c.name for c in report.moved] == ["www"] and report.accounts == 1 and report.audit == "none"
    assert target.versions("www") == [2, 3] and target.desired("www") == 3 and target.applied("web1", "www") == 3
    assert target.load("www", 3).bundle.key_pem == original.key_pem
    assert target.load("www", 2).bundle.key_pem == b"" and target.load("www", 2).meta["key_destroyed"]
    assert target.load_state("www") == {"failures": 2, "ari": {"window": "x"}}
    order = target.load_order("www")
    assert order is not None and order.order_url == "https://ca.example.test/order/1"
    assert target.load_account(DIRECTORY) is not None
    with target.tx() as cur:
        keys = [bytes(k) for (k,) in cur.execute("SELECT key FROM certd_versions WHERE key <> ''")]
        keys += [bytes(k) for (k,) in cur.execute("SELECT key FROM certd_orders UNION ALL SELECT key FROM certd_accounts")]
    assert len(keys) == 3 and all(is_sealed(k) and b"PRIVATE KEY" not in k for k in keys)


def test_a_rerun_resumes_and_moves_nothing_twice(tmp_path: Path, target: PgStore) -> None:
    """An import that stopped after www (api not yet there) is run again: www is recognised, api moves."""
    source = host(tmp_path, ring())
    run(source, target)
    with source.lock("api"):
        source.set_current("api", source.add_version("api", make_bundle(("api.example.test",)), {}))
    report = run(source, target)
    assert report.resumed == ["www"] and [c.name for c in report.moved] == ["api"]
    assert target.versions("www") == [2, 3] and target.versions("api") == [1]
    again = run(source, target)
    assert again.resumed == ["api", "www"] and not again.moved and again.accounts_kept == 1


def test_names_from_elsewhere_are_refused_before_anything_is_written(tmp_path: Path, target: PgStore) -> None:
    """Another node's state dir with the same name: refused in one line naming it; --skip-existing skips it."""
    run(host(tmp_path / "a", ring()), target)
    other = host(tmp_path / "b", ring())
    with other.lock("api"):
        other.set_current("api", other.add_version("api", make_bundle(("api.example.test",)), {}))
    with pytest.raises(UsageError, match="already holds www .*--skip-existing") as e:
        run(other, target, node="web2")
    assert "\n" not in str(e.value) and target.versions("api") == []
    report = run(other, target, node="web2", skip_existing=True)
    assert report.skipped == ["www"] and [c.name for c in report.moved] == ["api"]
    assert target.versions("www") == [2, 3] and target.applied("web2", "www") is None


def test_a_rotation_in_flight_is_refused(tmp_path: Path, target: PgStore) -> None:
    """A journal a crash left mid-rotation: one line saying to finish it first; nothing written."""
    source = host(tmp_path, ring())
    with source.lock("www"):
        source.save_journal("www", {"name": "www", "step": "switched"})
    with pytest.raises(UsageError, match="www has a rotation in progress"):
        run(source, target)
    assert target.names() == []


def test_a_certificate_with_state_only_moves_once(tmp_path: Path, target: PgStore) -> None:
    """A certificate never issued but held by the CA (state, no version) moves, and a rerun knows it."""
    source = FileStore(tmp_path, keyring=ring())
    with source.lock("new"):
        source.save_state("new", {"failures": 1, "failure_kind": "held"})
    assert [c.name for c in run(source, target).moved] == ["new"]
    assert target.load_state("new") == {"failures": 1, "failure_kind": "held"}
    assert run(source, target).resumed == ["new"]
