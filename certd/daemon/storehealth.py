"""Whether this node reaches the fleet's database, and what the daemon says while it does not.

A :class:`StoreHealth` probe runs ``SELECT 1`` on a connection of its own every
:data:`PROBE_INTERVAL` seconds (connect timeout :data:`PROBE_TIMEOUT`; never the store's pool,
whose waits are long), and keeps ``up`` and ``since`` (when it last changed). It exposes:

- the gauge ``certd_store_up{node}`` (1/0) in the daemon's metrics registry; the alert rules
  ``CertdStoreDown`` and ``CertdStoreDownAtEmergency`` (monitoring/certd-alerts.yml) fire on it;
- while down, the store-backed certificate gauges keep their last values instead of being read
  (a scrape must not wait on a database that is not there, and ``expiration`` must stay visible
  for the expiry alerts);
- ``certd status`` through the daemon: while down, one row per certificate built from what this
  node *deploys* (the live files: version, serial, notAfter), state ``store_unreachable``, with
  no store read; and a line saying since when the database is unreachable and what that means.

The decisions for a database outage (docs/FLEET.md "When the database is unreachable"): a node
keeps serving what it deployed (no file is touched: nothing can be staged without the store);
no order is placed (a renewal takes the certificate's lease in the database first, and that
fails); and a certificate past its emergency point is *not* ordered alone: S1 (one certificate
per renewal) cannot hold for a node that cannot see whether another node is ordering the same
certificate right now. The probe logs ``store_down_at_emergency`` (ERROR) for it, the status
line names it, and the alert pages; the operator restores the database or takes the node out of
the fleet deliberately (docs/FLEET.md).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from certd.config import CertificateConfig, Config
from certd.core import policy
from certd.core.clock import Clock, isoformat
from certd.core.errors import OperationFailed
from certd.core.model import CertInfo
from certd.deploy import stage
from certd.ops.log import event

log = logging.getLogger("certd.daemon")

PROBE_INTERVAL = 5.0   # seconds between probes
PROBE_TIMEOUT = 3      # libpq connect_timeout (whole seconds; libpq's minimum is 2)
EMERGENCY_LOOK = 60.0  # seconds between looks at the deployed files for emergencies while down
STATE = "store_unreachable"


class StoreHealth:
    """The database probe of one node (see the module essay). ``connect(dsn, timeout)`` opens a
    connection that ``execute``s and closes (psycopg's by default)."""

    def __init__(self, dsn: str, node: str, clock: Clock, *, interval: float = PROBE_INTERVAL,
                 config: Callable[[], Config] | None = None, connect: Callable[[str, int], Any] | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.dsn, self.node, self.clock, self.interval = dsn, node, clock, interval
        self._config = config
        self._connect = connect or _psycopg_connect
        self.up = True
        self.since: datetime = clock.now()
        self.error: str | None = None
        self._gauge: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()  # serials already logged as past their emergency point
        self._looked: float | None = None  # monotonic time of the last look at the deployed files
        self._on_change = on_change
        #: called (in the probe's thread) when the database answers again after an outage
        self.on_up: list[Callable[[], None]] = []

    def is_up(self) -> bool:
        return self.up

    def register(self, registry: Any) -> None:
        """Add ``certd_store_up{node}`` to a prometheus registry (the daemon's metrics)."""
        from prometheus_client import Gauge
        self._gauge = Gauge("certd_store_up", "1 while this node reaches the fleet's database ([cluster]), "
                            "0 while it does not.", ["node"], registry=registry)
        self._gauge.labels(self.node).set(1 if self.up else 0)

    # -- probing ---------------------------------------------------------------------------

    def probe(self) -> bool:
        """One ``SELECT 1``; records a change of state (logged, gauge set). Returns ``up``."""
        try:
            with self._connect(self.dsn, PROBE_TIMEOUT) as conn:
                conn.execute("SELECT 1")
            ok, error = True, None
        except Exception as e:  # noqa: BLE001 - any failure to answer is "unreachable"
            ok, error = False, _one_line(e)
        if ok != self.up:
            self.up, self.since = ok, self.clock.now()
            event(log, "store_up" if ok else "store_down", logging.INFO if ok else logging.ERROR, node=self.node,
                  error=error, detail=None if ok else "serving what is deployed; no order until the database is back")
            self._looked = None
            if self._on_change is not None:
                self._on_change()
            for hook in self.on_up if ok else ():
                try:
                    hook()
                except Exception as e:  # noqa: BLE001 - a hook must not stop the probe; it is retried later
                    event(log, "store_up_hook_failed", logging.WARNING, hook=getattr(hook, "__name__", str(hook)),
                          error=_one_line(e))
        self.error = error
        if self._gauge is not None:
            self._gauge.labels(self.node).set(1 if ok else 0)
        if not ok:
            self._check_emergencies()
        else:
            self._warned.clear()
        return ok

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="store-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=PROBE_TIMEOUT + 2)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.probe()
            self._stop.wait(self.interval)

    # -- what the daemon says while down ---------------------------------------------------

    def _check_emergencies(self) -> None:
        """Log each deployed certificate past its emergency point once; reads the deployed files
        at most every :data:`EMERGENCY_LOOK` seconds (every probe would be too often at 10,000)."""
        now_m = self.clock.monotonic()
        if self._config is None or (self._looked is not None and now_m - self._looked < EMERGENCY_LOOK):
            return
        self._looked = now_m
        now = self.clock.now()
        for cert in self._config().certificates:
            info = deployed_info(cert)
            if info is not None and now >= policy.expiring_at(info.not_before, info.not_after) \
                    and info.serial not in self._warned:
                self._warned.add(info.serial)
                event(log, "store_down_at_emergency", logging.ERROR, name=cert.name, serial=info.serial,
                      not_after=isoformat(info.not_after),
                      detail="past its emergency point with the database unreachable: this node does not order "
                             "alone (one certificate per renewal); restore the database (docs/FLEET.md)")

    def lines(self) -> list[str]:
        """What ``certd status`` prints last (nothing while the database answers)."""
        if self.up:
            return []
        out = [f"database: UNREACHABLE from node {self.node} since {isoformat(self.since)} ({self.error}); this node "
               f"keeps serving what it deployed and orders nothing until the database is back"]
        now = self.clock.now()
        for cert in (self._config().certificates if self._config is not None else ()):
            info = deployed_info(cert)
            if info is not None and now >= policy.expiring_at(info.not_before, info.not_after):
                out.append(f"{cert.name}: past its emergency point (expires {isoformat(info.not_after)}) and not "
                           f"renewed: a node cut off from the database never orders alone; restore the database "
                           f"(docs/FLEET.md)")
        return out

    def refuse_order(self) -> None:
        """:class:`~certd.core.errors.OperationFailed` (exit 1) while the database is down: an
        operator's renewal is refused at once, instead of failing after the store's pool timeout."""
        if not self.up:
            raise OperationFailed(f"the fleet database is unreachable from node {self.node} since "
                                  f"{isoformat(self.since)} ({self.error}); no order is placed without it "
                                  f"(one certificate per renewal); see docs/FLEET.md")

    def rows(self, certs: list[CertificateConfig]) -> list[dict[str, Any]]:
        """One status row per certificate from the deployed files alone (no store read)."""
        return [degraded_row(cert, self.since) for cert in certs]

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "up": self.up, "since": isoformat(self.since), "error": self.error}


def degraded_row(cert: CertificateConfig, since: datetime) -> dict[str, Any]:
    """``certd status``'s row for ``cert`` while the database is unreachable: what is deployed."""
    info = deployed_info(cert)
    try:
        version = stage.deployed_version(cert)
    except Exception:  # noqa: BLE001 - a status row never fails
        version = None
    return {"name": cert.name, "domains": list(cert.domains), "ip_addresses": list(cert.ip_addresses),
            "state": STATE, "version": version, "serial": info.serial if info else None,
            "not_before": isoformat(info.not_before) if info else None,
            "not_after": isoformat(info.not_after) if info else None,
            "fingerprint_sha256": info.fingerprint_sha256 if info else None, "key_type": cert.key_type,
            "next_renewal": None, "last_result": None, "last_error": None, "failures": None, "rotation": None,
            "profile": None, "key_class": cert.key_class, "key_age_days": None,
            "renewal_reason": f"the fleet database is unreachable since {isoformat(since)}: serving the deployed "
                              f"version; no order until it is back"}


def deployed_info(cert: CertificateConfig) -> CertInfo | None:
    """The leaf this node deploys for ``cert`` (live_dir's fullchain, the combined file, or the
    first file target holding the certificate); None when there is none or it is unreadable."""
    d = cert.deploy
    candidates: list[Path] = []
    if d.live_dir is not None:
        candidates.append(Path(d.live_dir) / "fullchain.pem")
    if d.combined is not None:
        candidates.append(Path(d.combined))
    candidates += [Path(f.path) for f in d.files if f.content in ("cert", "fullchain", "combined")]
    for path in candidates:
        try:
            return CertInfo.from_pem(path.read_bytes())
        except (OSError, ValueError, IndexError):
            continue
    return None


def for_daemon(config: Config, store: Any, clock: Clock, metrics: Any,
               current: Callable[[], Config]) -> StoreHealth | None:
    """The probe for a ``[cluster]`` node (None on a single host), registered in ``metrics``
    (whose store-backed gauges then keep their last values while the database is down)."""
    dsn = getattr(store, "dsn", None)
    if config.cluster is None or not isinstance(dsn, str):
        return None
    health = StoreHealth(dsn, config.cluster.node, clock, config=current,
                         on_change=metrics.changed if metrics is not None else None)
    if metrics is not None:
        health.register(metrics.registry)
        metrics.collector.store_up = health.is_up
    return health


def _psycopg_connect(dsn: str, timeout: int) -> Any:
    import psycopg
    return psycopg.connect(dsn, connect_timeout=timeout, autocommit=True)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]
