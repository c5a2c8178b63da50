"""Prometheus metrics for ``certd run``: an HTTP endpoint and a node_exporter textfile.

Everything lives in one :class:`~prometheus_client.CollectorRegistry` owned by
:class:`Metrics` (never the process-global default registry, so nothing of the library's own
process collectors or of another registry leaks in, and tests can build as many as they like).

Two sources, on purpose:

- **The store**, read by :class:`_StoreCollector` through the manager's ``status()``: expiry,
  not-before, last issuance, next renewal, current version, last success, consecutive failures.
  These are right from the first scrape after a start. Each certificate's values are kept for
  :data:`STORE_TTL` seconds or until an event names it (a scrape of 1,000 unchanged certificates
  then reads no file), so a change made outside the daemon shows within that time.
- **Events and measurements** from the :class:`~certd.core.events.EventBus`: renewal and rollback
  counters, verification failures, ACME request and hook durations. Counters start at zero for
  every configured certificate and result, so ``increase()`` sees the first failure; they carry
  no ``_created`` series (a third of the lines, and nothing alerting uses).

The drift gauge is set by the daemon's reconcile (:mod:`certd.daemon.monitor`).

The endpoint (``[daemon] metrics_listen``) serves ``/metrics`` from a daemon thread. The
textfile (``[daemon] metrics_textfile``) is rewritten atomically (temporary file, fsync,
rename: node_exporter never reads half a file) by a writer thread shortly after every event
and every :data:`TEXTFILE_INTERVAL` seconds, so a slow disk never delays a rotation.
"""

from __future__ import annotations

import logging
import platform
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from certd import __version__
from certd import fs as fsutil
from certd.core.clock import Clock, SystemClock
from certd.config import CertificateConfig, Config
from certd.core.errors import CertdError
from certd.core.events import LifecycleEvent
from certd.ops.log import event

log = logging.getLogger("certd.metrics")

#: Seconds between periodic rewrites of the textfile (events also trigger a rewrite).
TEXTFILE_INTERVAL = 60.0
#: Seconds a certificate's store-backed values are reused between scrapes (see the essay).
STORE_TTL = 30.0
RENEWAL_RESULTS = ("success", "failed", "rolled_back", "rollback_failed", "deployed_unverified")
ROLLBACK_RESULTS = ("success", "failed", "operator")
DRIFT_KINDS = ("config", "store", "deployed", "served")
ACME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HOOK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class StatusSource(Protocol):
    """What the store-backed gauges read (the :class:`~certd.engine.manager.Manager` is one)."""

    config: Config

    def status(self, cert: CertificateConfig) -> dict[str, Any]: ...
    def load_state(self, name: str) -> Any: ...


class Metrics:
    """The registry, the event sink that feeds it, and its two outputs."""

    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.counters = _Counters()
        r.register(self.counters)
        self.acme_seconds = Histogram("certd_acme_request_duration_seconds",
                                      "Duration of HTTP requests to the ACME server.", buckets=ACME_BUCKETS, registry=r)
        self.hook_seconds = Histogram("certd_hook_duration_seconds", "Duration of reload hooks.", ["hook"],
                                      buckets=HOOK_BUCKETS, registry=r)
        self.drift = _Drift()
        r.register(self.drift)
        build = Gauge("certd_build_info", "certd's version and the Python running it.", ["version", "python"],
                      registry=r)
        build.labels(__version__, platform.python_version()).set(1)
        if config.cluster is not None:  # one series: the other series stay per certificate, scraped per node
            node = Gauge("certd_node_info", "This fleet node's name ([cluster] node) and certd's version.",
                         ["node", "version"], registry=r)
            node.labels(config.cluster.node, __version__).set(1)
        self.collector = _StoreCollector(clock or SystemClock())
        r.register(self.collector)
        self._lock = threading.Lock()
        self._server: Any = None
        self._writer: threading.Thread | None = None
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._init_labels(config.names)

    # -- wiring -------------------------------------------------------------------------------

    def bind(self, source: StatusSource) -> None:
        """Read the store-backed gauges through ``source`` (the daemon's manager)."""
        self.collector.source = source

    def reconfigure(self, config: Config) -> None:
        """Follow a reloaded configuration: new certificates get zeroed series, removed ones
        lose theirs."""
        with self._lock:
            old = set(self.config.names)
            self.config = config
        for name in old - set(config.names):
            self.counters.forget(name)
            self.drift.forget(name)
        self._init_labels(config.names)
        self.collector.forget()
        self._dirty.set()

    def _init_labels(self, names: Iterable[str]) -> None:
        for name in names:
            self.counters.add(name)

    # -- sinks ---------------------------------------------------------------------------------

    def on_event(self, ev: LifecycleEvent) -> None:
        """EventBus sink: count outcomes; schedule a textfile rewrite."""
        failed_step = ev.detail.get("failed_step") if isinstance(ev.detail, dict) else None
        inc = self.counters.inc
        if ev.kind == "renewed":
            inc("renewals", ev.name, "success")
        elif ev.kind == "renewal_failed":
            result = ev.outcome if ev.outcome in RENEWAL_RESULTS else "failed"
            inc("renewals", ev.name, result)
            if result == "deployed_unverified" and failed_step == "verify":  # a first issuance
                inc("verification_failures", ev.name)
        elif ev.kind in ("rolled_back", "rollback_failed"):
            inc("rollbacks", ev.name, "success" if ev.kind == "rolled_back" else "failed")
            if failed_step == "verify":
                inc("verification_failures", ev.name)
        elif ev.kind == "operator_rollback":
            inc("rollbacks", ev.name, "operator")
        if ev.name:
            self.collector.forget(ev.name)
        self._dirty.set()

    def on_measure(self, what: str, seconds: float, labels: dict[str, str]) -> None:
        """EventBus measurement sink: ``acme_request`` and ``hook`` durations."""
        if what == "acme_request":
            self.acme_seconds.observe(seconds)
        elif what == "hook":
            self.hook_seconds.labels(labels.get("hook", "?")).observe(seconds)

    def set_drift(self, name: str, counts: dict[str, int]) -> None:
        """The last drift check of ``name``: mismatches per kind (missing kinds are 0)."""
        self.drift.set(name, counts)
        self._dirty.set()

    def changed(self) -> None:
        """A gauge set outside the event bus changed (the fleet database probe): rewrite the
        textfile soon instead of at the next interval."""
        self._dirty.set()

    # -- outputs --------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text exposition format, as served on /metrics."""
        return generate_latest(self.registry)

    def start(self) -> None:
        """Open the endpoint and start the textfile writer, as configured. A port already in
        use is logged, not fatal: rotations matter more than their metrics."""
        listen = self.config.daemon.metrics_listen
        if listen is not None:
            from prometheus_client import start_http_server
            try:
                self._server, _ = start_http_server(listen.port, addr=listen.host, registry=self.registry)
            except OSError as e:
                event(log, "metrics_unavailable", logging.ERROR, listen=str(listen), error=e.strerror or str(e))
            else:
                event(log, "metrics_listening", listen=str(listen))
        if self.config.daemon.metrics_textfile is not None:
            self._dirty.set()  # write it at once: node_exporter should not wait for the first event
            self._writer = threading.Thread(target=self._write_loop, name="metrics-textfile", daemon=True)
            self._writer.start()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._writer is not None:
            self._writer.join(timeout=5)

    def write_textfile(self) -> None:
        """Write the exposition to ``metrics_textfile`` atomically (mode 0644)."""
        path = self.config.daemon.metrics_textfile
        if path is not None:
            fsutil.atomic_write(path, self.exposition(), mode=0o644)

    def _write_loop(self) -> None:
        while True:
            self._dirty.wait(TEXTFILE_INTERVAL)
            self._dirty.clear()
            try:
                self.write_textfile()
            except (CertdError, OSError) as e:
                event(log, "metrics_textfile_failed", logging.WARNING, error=str(e))
            if self._stop.is_set():
                return


class _Counters(Collector):
    """The event counters, as ``CounterMetricFamily`` without ``_created`` samples."""

    FAMILIES = {
        "renewals": ("Renewal attempts that reached an outcome, by result.", ["name", "result"]),
        "rollbacks": ("Rollbacks: automatic after a failed rotation (success, failed) or asked for by an "
                      "operator (operator).", ["name", "result"]),
        "verification_failures": ("Rotations whose verify step never saw the new certificate served.", ["name"]),
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Only the counts an event made: the zero series of every configured certificate are
        # made at collection. Zeros kept as eight series a certificate cost ~0.9 KB each, 90 MB
        # of the daemon's memory at 100,000 certificates (issue 20).
        self._values: dict[str, dict[tuple[str, ...], float]] = {f: {} for f in self.FAMILIES}
        self._names: set[str] = set()

    def add(self, name: str) -> None:
        """Zero-valued series for a configured certificate (existing counts are kept)."""
        with self._lock:
            self._names.add(name)

    def inc(self, family: str, *labels: str) -> None:
        with self._lock:
            series = self._values[family]
            series[labels] = series.get(labels, 0.0) + 1

    def forget(self, name: str) -> None:
        with self._lock:
            self._names.discard(name)
            for series in self._values.values():
                for key in [k for k in series if k[0] == name]:
                    del series[key]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = {f: dict(v) for f, v in self._values.items()}
            names = sorted(self._names)
        zeros: dict[str, list[tuple[str, ...]]] = {
            "renewals": [(n, r) for n in names for r in RENEWAL_RESULTS],
            "rollbacks": [(n, r) for n in names for r in ROLLBACK_RESULTS],
            "verification_failures": [(n,) for n in names]}
        for family, (doc, labels) in self.FAMILIES.items():
            fam = CounterMetricFamily(f"certd_{family}", doc, labels=labels)
            values = snapshot[family]
            for key in sorted(set(values).union(zeros[family])):
                fam.add_metric(list(key), values.get(key, 0.0))
            yield fam


class _Drift(Collector):
    """``certd_drift{name, kind}``: a series for each kind of every certificate a drift check
    has looked at, kept as the counts of the certificates that drifted and the names of the
    rest (a labelled Gauge's four children cost ~2.8 KB a certificate: 280 MB at 100,000)."""

    DOC = "Mismatches found by the last drift check, by kind (config, store, deployed, served)."

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checked: set[str] = set()
        self._found: dict[str, tuple[int, ...]] = {}   # name -> counts in DRIFT_KINDS order, not all 0

    def set(self, name: str, counts: dict[str, int]) -> None:
        found = tuple(counts.get(kind, 0) for kind in DRIFT_KINDS)
        with self._lock:
            self._checked.add(name)
            if any(found):
                self._found[name] = found
            else:
                self._found.pop(name, None)

    def forget(self, name: str) -> None:
        with self._lock:
            self._checked.discard(name)
            self._found.pop(name, None)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            checked, found = sorted(self._checked), dict(self._found)
        fam = GaugeMetricFamily("certd_drift", self.DOC, labels=["name", "kind"])
        clean = (0,) * len(DRIFT_KINDS)
        for name in checked:
            for kind, value in zip(DRIFT_KINDS, found.get(name, clean)):
                fam.add_metric([name, kind], value)
        yield fam


class _StoreCollector(Collector):
    """Per-certificate gauges read from the store (see the module essay for the cache)."""

    def __init__(self, clock: Clock) -> None:
        self.source: StatusSource | None = None
        self.clock = clock
        #: False while the store is known unreachable (a fleet's database): the last values are
        #: served as they are, and a certificate never read is left out, instead of a scrape
        #: waiting on a database that is not there (certd.daemon.storehealth).
        self.store_up: Callable[[], bool] = lambda: True
        self._issued: dict[tuple[str, int], float | None] = {}
        self._cache: dict[str, tuple[float, dict[str, float | None]]] = {}   # name -> (read at, values)

    def forget(self, name: str | None = None) -> None:
        """Read ``name`` (everything, with None) from the store at the next collection. The old
        values are kept as stale, not dropped: while the store is down they are still served (an
        event during an outage, such as a refused renewal, must not blank the expiry gauge)."""
        for key in list(self._cache) if name is None else [name]:
            if key in self._cache:
                self._cache[key] = (float("-inf"), self._cache[key][1])

    def collect(self) -> Iterator[Metric]:
        def family(suffix: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"certd_{suffix}", doc, labels=["name"])

        fams = {
            "not_after": family("certificate_expiration_timestamp_seconds", "notAfter of the current certificate."),
            "not_before": family("certificate_not_before_timestamp_seconds", "notBefore of the current certificate."),
            "issued": family("certificate_issued_timestamp_seconds", "When the newest stored version was issued."),
            "next_renewal": family("certificate_next_renewal_timestamp_seconds", "When certd plans to renew."),
            "version": family("certificate_version", "The store's current version number."),
            "last_success": family("last_success_timestamp_seconds", "When the last renewal committed."),
            "failures": family("certificate_consecutive_failures", "Failed renewal attempts since the last success."),
            "broken": family("certificate_broken",
                             "1 while certd cannot plan or deploy the certificate (state broken)."),
        }
        blocked = GaugeMetricFamily("certd_renewal_blocked", "1 while a certificate's renewal waits for the CA: "
                                    "reason held (a permanent refusal) or rate_limited.", labels=["name", "reason"])
        source = self.source
        if source is not None:
            now = self.clock.monotonic()
            for cert in source.config.certificates:
                cached = self._cache.get(cert.name)
                if cached is not None and (now - cached[0] < STORE_TTL or not self.store_up()):
                    values = cached[1]
                elif not self.store_up():
                    continue
                else:
                    try:
                        values = self._values(source, cert)
                    except CertdError as e:  # one unreadable certificate must not fail the scrape
                        event(log, "metrics_store_unreadable", logging.WARNING, name=cert.name, error=str(e))
                        continue
                    self._cache[cert.name] = (now, values)
                for key, value in values.items():
                    if key == "blocked":
                        if value is not None:
                            blocked.add_metric([cert.name, str(value)], 1.0)
                    elif value is not None:
                        fams[key].add_metric([cert.name], value)
        yield from fams.values()
        yield blocked

    def _values(self, source: StatusSource, cert: CertificateConfig) -> dict[str, float | None]:
        row = source.status(cert)
        if row.get("state") == "broken":  # its store may be unreadable: only what is known
            return {"broken": 1.0, "failures": float(row.get("failures") or 0)}
        state = source.load_state(cert.name)
        version = row.get("version")
        return {"not_after": _ts(row.get("not_after")), "not_before": _ts(row.get("not_before")),
                "issued": self._issued_at(source, cert.name),
                "next_renewal": _ts(row.get("next_renewal")) if version is not None else None,
                "version": float(version) if version is not None else None,
                "last_success": _ts(getattr(state, "last_success", None)),
                "failures": float(getattr(state, "failures", 0) or 0), "broken": 0.0,
                "blocked": row["state"] if row.get("state") in ("held", "rate_limited") else None}

    def _issued_at(self, source: StatusSource, name: str) -> float | None:
        store = getattr(source, "store", None)
        if store is None:
            return None
        versions = store.versions(name)
        if not versions:
            return None
        key = (name, versions[-1])
        if key not in self._issued:  # versions are immutable: read each one's meta once (meta.json
            # alone: the whole version, key and chain parsed, made a first scrape of 100,000 take 148 s)
            self._issued[key] = _ts(store.load_info(name, versions[-1]).meta.get("created"))
        return self._issued[key]


def _ts(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
