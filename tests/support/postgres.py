"""A private PostgreSQL cluster for the tests (Debian's postgresql 15, installed by scripts/setup.sh).

Fixtures (registered as a pytest plugin by ``tests/conftest.py``):

- ``postgres_cluster`` (session) -> :class:`PgCluster`: initdb into a temporary directory owned
  by the ``postgres`` user (PostgreSQL refuses to run as root; as another user the fixture runs
  it as that user), started with ``pg_ctl`` on a free loopback port, its unix socket in that
  private directory, ``fsync=off``; stopped at the end of the session by its postmaster's PID
  (a fast shutdown), never by name: the system cluster is never touched.
- ``postgres`` -> a DSN of a fresh database (``CREATE DATABASE test_<n>``) for this test.

Skips where PostgreSQL or psycopg is not installed, naming what is missing; fails instead
under CI (``CI`` set), where scripts/setup.sh must have installed both.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import free_port

PGBIN = Path("/usr/lib/postgresql/15/bin")
_serial = itertools.count(1)


class PgCluster:
    """One running private cluster; :meth:`database` makes a fresh database and returns its DSN."""

    def __init__(self, base: Path, port: int, pid: int, opts: str = "") -> None:
        self.base = base
        self.port = port
        self.pid = pid
        self.opts = opts  # pg_ctl -o, so start() brings it back on the same port

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=10"

    def database(self) -> str:
        import psycopg
        name = f"test_{next(_serial)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def stop(self) -> None:
        """Fast shutdown of this cluster's postmaster (SIGINT to its PID), immediate after 30 s."""
        for sig, wait in ((signal.SIGINT, 30.0), (signal.SIGQUIT, 10.0)):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)


    def start(self) -> None:
        """Start this (stopped) cluster again on its port, as it was (an outage ending)."""
        r = subprocess.run(_as_owner([str(PGBIN / "pg_ctl"), "-D", str(self.base / "data"), "-l",
                                      str(self.base / "log"), "-w", "-t", "60", "-o", self.opts, "start"]),
                           capture_output=True, text=True, timeout=90)
        if r.returncode != 0:
            raise RuntimeError(f"the private PostgreSQL cluster did not start again: {r.stdout}{r.stderr}")
        self.pid = int((self.base / "data" / "postmaster.pid").read_text().split()[0])

    def destroy(self) -> None:
        """Stop it and remove its files (a cluster a test started for itself)."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def _as_owner(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what}: scripts/setup.sh should have installed it", pytrace=False)
    pytest.skip(f"{what}: run scripts/setup.sh")


def start_cluster(*, durable: bool = False) -> PgCluster:
    """Start a private cluster; ``durable`` keeps PostgreSQL's fsync and synchronous commit (a
    benchmark's figures; tests run without them)."""
    if not (PGBIN / "initdb").exists():
        _missing(f"PostgreSQL 15 is not installed ({PGBIN}/initdb)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("psycopg is not installed (the cluster extra)")
    base = Path(tempfile.mkdtemp(prefix="certd-pg-"))
    if os.geteuid() == 0:
        pg = pwd.getpwnam("postgres")
        os.chown(base, pg.pw_uid, pg.pw_gid)
    os.chmod(base, 0o700)
    subprocess.run(_as_owner([str(PGBIN / "initdb"), "-D", str(base / "data"), "-A", "trust", "-U", "postgres",
                              "--no-sync", "-E", "UTF8", "--locale", "C"]),
                   check=True, capture_output=True, timeout=120)
    last = ""
    for _ in range(5):  # the free port may be taken before the postmaster binds it
        port = free_port()
        fast = "" if durable else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 {fast}-c max_connections=200"
        r = subprocess.run(_as_owner([str(PGBIN / "pg_ctl"), "-D", str(base / "data"), "-l", str(base / "log"),
                                      "-w", "-t", "60", "-o", opts, "start"]), capture_output=True, text=True,
                           timeout=90)
        pidfile = base / "data" / "postmaster.pid"
        if r.returncode == 0 and pidfile.exists():
            return PgCluster(base, port, int(pidfile.read_text().split()[0]), opts)
        last = r.stdout + r.stderr + ((base / "log").read_text() if (base / "log").exists() else "")
    shutil.rmtree(base, ignore_errors=True)
    raise RuntimeError(f"the private PostgreSQL cluster did not start:\n{last[-2000:]}")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PgCluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.base, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[PgCluster]:
    """A private cluster for one test alone, which may stop and start it (others share the
    session's); destroyed after the test."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def postgres(postgres_cluster: PgCluster) -> str:
    """The DSN of a database of this test's own on the session's private cluster."""
    return postgres_cluster.database()
