"""Which store a process opens: the state directory on one host, the shared database in a fleet.

Without ``[cluster]`` that is :class:`~certd.store.files.FileStore` on ``daemon.state_dir``,
exactly as before fleets existed. With it, :class:`~certd.store.pg.PgStore` on the configured
database (``psycopg`` is the optional ``cluster`` extra, imported only then); the state
directory still holds what is this node's alone (the control socket's neighbours, the local
audit copy of what the database refused).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from certd.config import ClusterConfig, Config
from certd.core.clock import Clock
from certd.core.errors import ConfigError, StoreError
from certd.crypto.custody import CustodyError, read_secret_file
from certd.store.files import FileStore, Store, keyring_of

if TYPE_CHECKING:
    from certd.store.pg import PgStore


def open_store(config: Config, *, audit_group: str | None = None, clock: Clock | None = None) -> Store:
    """The store ``config`` names: :class:`FileStore` or, with ``[cluster]``, :class:`PgStore`
    (:class:`StoreError` when the database cannot be reached or its schema is newer)."""
    if config.cluster is None:
        ring, loader = keyring_of(config)
        return FileStore(config.daemon.state_dir, audit_group=audit_group, clock=clock, keyring=ring,
                         kek_loader=loader)
    return open_cluster(config, clock=clock)


def open_cluster(config: Config, *, clock: Clock | None = None) -> PgStore:
    """The fleet's database for ``config`` (which must have ``[cluster]``)."""
    cluster = config.cluster
    if cluster is None:
        raise ConfigError(f"{config.path}: no [cluster] section: this node keeps its state in "
                          f"{config.daemon.state_dir}")
    try:
        from certd.store.pg import PgStore
    except ImportError:
        raise ConfigError(f"{config.path}: [cluster] needs psycopg: install certd with its 'cluster' extra "
                          f"(pip install 'certd[cluster]')") from None
    from certd.store.pglease import fleet_ttl

    ring, _ = keyring_of(config)
    # renewals and the fleet's applies each run `workers` at a time, beside the fleet loop, the
    # finisher and the control socket: a pool of 4 made them wait out POOL_WAIT under a wave of
    # renewals and fail as "database unreachable" (the fleet soak)
    return PgStore(cluster_dsn(cluster), node=cluster.node, clock=clock, keyring=ring,
                   lease_ttl=fleet_ttl(config.acme.order_timeout), pool_size=2 * config.daemon.workers + 4)


def cluster_dsn(cluster: ClusterConfig) -> str:
    """``[cluster]``'s libpq connection string with its TLS settings and the password read from
    ``password_file`` (now, so a rotated password is picked up by the next connection's process)."""
    from psycopg.conninfo import make_conninfo

    extra: dict[str, str] = {}
    if cluster.sslmode is not None:
        extra["sslmode"] = cluster.sslmode
    if cluster.sslrootcert is not None:
        extra["sslrootcert"] = str(cluster.sslrootcert)
    if cluster.password_file is not None:
        try:
            secret = read_secret_file(cluster.password_file, "[cluster] password_file", "the fleet's database",
                                      "put the database password in it (mode 0600)")
            extra["password"] = secret.decode("utf-8").strip()
        except (CustodyError, UnicodeDecodeError) as e:
            raise StoreError(str(e) if isinstance(e, CustodyError) else
                             f"[cluster] password_file {cluster.password_file}: not UTF-8 text") from None
    return make_conninfo(cluster.database, **extra)
