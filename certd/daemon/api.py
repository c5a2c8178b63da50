"""The control API's handlers: what each endpoint of the control socket does in the daemon
(the transport, peer credentials and limits are :mod:`certd.daemon.control`'s).

Long operations run in the worker pool as flights and stream their progress; a renewal joins
a rotation of the same certificate already in flight (one order per certificate), while a
rollback or revocation is refused during one (it would change what that one commits).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterable, Iterator

from certd.config import CertificateConfig, Config
from certd.core.errors import OperationFailed, UsageError
from certd.core.textsafe import check_reason
from certd.daemon.control import Caller, Handler, Preformatted
from certd.daemon.jobs import Jobs
from certd.daemon.storehealth import StoreHealth
from certd.daemon.wiring import rotate_kek_with
from certd.daemon.monitor import Monitor
from certd.daemon.scheduler import UNFORCED, Flight, ShuttingDown
from certd.engine.keycustody import custody_lines
from certd.engine.lifecycle import parse_reason
from certd.engine.outcome import Outcome
from certd.ops import audit
from certd.ops.log import event
from certd.verify import drift

log = logging.getLogger("certd.daemon")
_REQUESTED = {"rollback": "rollback_requested", "revoke": "revocation_requested"}  # log event per kind

#: The endpoints that change something: root, certd's user and control_group members only.
MUTATING = frozenset({"/v1/renew", "/v1/rollback", "/v1/reload", "/v1/verify", "/v1/revoke", "/v1/kek/rotate"})


class ControlAPI:
    """The handlers, over the daemon's jobs (its manager, flights and scheduler) and monitor;
    ``reload_config(source)`` is the daemon's."""

    def __init__(self, config: Callable[[], Config], jobs: Jobs, monitor: Monitor,
                 reload_config: Callable[[str], tuple[bool, list[str]]], *,
                 store_health: StoreHealth | None = None) -> None:
        self._config, self.jobs, self.monitor, self._reload_config = config, jobs, monitor, reload_config
        self.store_health = store_health  # [cluster]: while the database is down, status reads no store
        self.manager, self.flights, self.scheduler = jobs.manager, jobs.flights, jobs.scheduler

    def routes(self) -> dict[tuple[str, str], Handler]:
        return {
            ("GET", "/v1/status"): self.status,
            ("POST", "/v1/renew"): self.renew,
            ("POST", "/v1/rollback"): self.rollback,
            ("POST", "/v1/revoke"): self.revoke,
            ("POST", "/v1/verify"): self.verify,
            ("POST", "/v1/reload"): self.reload,
            ("GET", "/v1/drift"): self.drift,
            ("GET", "/v1/history"): self.history,
            ("POST", "/v1/kek/rotate"): self.kek_rotate,
            ("GET", "/v1/keys"): self.keys,
        }

    def _select(self, names: Any) -> list[CertificateConfig]:
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise UsageError("names must be a list of strings")
        return self.manager.select(names or [])

    def status(self, caller: Caller, query: dict[str, Any]) -> dict[str, Any]:
        """The status rows (see Planner.listing_json: the whole listing trusts what the daemon
        wrote itself; rows named are checked against the store each time), as one line each
        with ``format=lines`` (the CLI prints or parses the document as it is)."""
        names = query.get("name")
        certs, runs = self._select(names), self.scheduler.next_runs()
        if self.store_health is not None and not self.store_health.up:  # what this node deploys
            rows: Iterable[str | dict[str, Any]] = self.store_health.rows(certs)
        elif names:
            rows = [self.manager.status_json(c, next_run=runs.get(c.name)) for c in certs]
        else:
            rows = self.manager.listing_json(certs, runs)
        if query.get("format") == ["lines"]:
            return Preformatted("certificates", rows)  # type: ignore[return-value]
        return {"certificates": [json.loads(r) if isinstance(r, str) else r for r in rows]}

    def renew(self, caller: Caller, body: dict[str, Any]) -> Iterator[dict[str, Any]] | dict[str, Any]:
        certs = list(self._config().certificates) if body.get("all") else self._select(body.get("names"))
        force = bool(body.get("force"))
        if self.store_health is not None:
            try:
                self.store_health.refuse_order()  # no order without the fleet's database (docs/FLEET.md)
            except OperationFailed as e:  # an operator's action, refused: audited (spooled while down)
                for cert in certs:
                    self.manager.emit("renew_refused", cert.name, initiator=str(caller), outcome="refused",
                                      reason=str(e), detail={"force": force})
                raise
        default = "forced by operator" if force else "requested by operator"
        reason = check_reason(body.get("reason") or "", "reason") or default
        initiator = str(caller)
        flights = []
        for cert in certs:
            args: dict[str, Any] = {"force": force, "reason": reason, "initiator": initiator}
            if force and body.get("ignore_duplicate_limit"):
                args["ignore_duplicate_limit"] = True
            try:
                flight, started = self.flights.begin(cert.name, "forced" if force else "requested",
                                                     forced=args if force else None)
            except ShuttingDown as e:
                raise UsageError(str(e)) from None
            if started:
                event(log, "renewal_requested", name=cert.name, initiator=initiator, force=force, reason=reason)
                self.scheduler.submit(self.jobs.run_flight, flight, "renew", job_id=f"run:{cert.name}", **args)
            else:
                event(log, "renewal_joined", name=cert.name, initiator=initiator, running=flight.kind)
                then = " (renewing after it if it finds nothing due)" if force and flight.kind in UNFORCED else ""
                flight.say(f"joined the {flight.kind} rotation already in progress (one order per certificate){then}")
            flights.append(flight)
        if not body.get("wait"):
            return {"accepted": [f.name for f in flights]}
        return _follow(flights)

    def rollback(self, caller: Caller, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        name = self._one_name(body, "rollback")
        to_version = body.get("to_version")
        if to_version is not None and not isinstance(to_version, int):
            raise UsageError("to_version must be an integer")
        return self._start_alone(name, "rollback", caller, to_version=to_version,
                                 reason=check_reason(body.get("reason") or "", "reason") or "rollback by operator")

    def revoke(self, caller: Caller, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        name = self._one_name(body, "revoke")
        return self._start_alone(name, "revoke", caller, reason=parse_reason(str(body.get("reason") or "")))

    def _one_name(self, body: dict[str, Any], what: str) -> str:
        name = body.get("name")
        if not isinstance(name, str):
            raise UsageError(f"{what} needs a certificate name")
        self._select([name])
        return name

    def _start_alone(self, name: str, kind: str, caller: Caller, **kw: Any) -> Iterator[dict[str, Any]]:
        """Run a ``kind`` operation on ``name`` in the pool and stream its progress. Unlike a
        renewal it never joins a rotation in flight (it would change what that one commits):
        refused while one runs."""
        try:
            flight, started = self.flights.begin(name, kind)
        except ShuttingDown as e:
            raise UsageError(str(e)) from None
        if not started:
            raise UsageError(f"a {flight.kind} rotation of {name} is in progress; try again when it finishes")
        initiator = str(caller)
        event(log, _REQUESTED[kind], name=name, initiator=initiator, **kw)
        self.scheduler.submit(self.jobs.run_flight, flight, kind, job_id=f"run:{name}", initiator=initiator, **kw)
        return _follow([flight])

    def verify(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        outcomes = [self.manager.verify_now(c) for c in self._select(body.get("names"))]
        return {"outcomes": [o.to_json() for o in outcomes]}

    def drift(self, caller: Caller, query: dict[str, Any]) -> dict[str, Any]:
        names = [c.name for c in self._select(query.get("name"))] if query.get("name") else None
        return drift.to_json(self.monitor.check_now(names))

    def history(self, caller: Caller, query: dict[str, Any]) -> dict[str, Any]:
        """Read-only, so control_group members (who cannot read the 0700 state dir) see it too."""
        names = query.get("name") or [None]
        if len(names) != 1:
            raise UsageError("history takes at most one certificate name")
        config = self._config()
        chain = self.manager.store.audit
        if config.cluster is not None and hasattr(chain, "verify") and hasattr(chain, "records"):  # the fleet's
            return audit.history_of(chain.records, chain.verify().ok, names[0], set(config.names),
                                    config.names_summary())
        return audit.history(config.daemon.state_dir, names[0], set(config.names), config.names_summary())

    def keys(self, caller: Caller, query: dict[str, Any]) -> dict[str, Any]:
        """How keys are kept at rest (``certd status``'s last lines)."""
        keys = getattr(self.manager.store, "keys", None)
        lines = custody_lines(keys) if keys is not None else []
        return {"lines": lines + (self.store_health.lines() if self.store_health is not None else [])}

    def kek_rotate(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        """Re-wrap every stored key under the KEK ``new`` names (a file or a pkcs11: URI), here in
        the daemon: its files stay its user's, and its own ring learns the new KEK at once."""
        source = body.get("new")
        if not isinstance(source, str) or not source:
            raise UsageError("kek rotate needs new: the new KEK's file or pkcs11: URI")
        if not source.startswith("pkcs11:") and not source.startswith("/"):
            raise UsageError(f"{source!r}: give the new KEK file as an absolute path")
        return rotate_kek_with(self.manager, source, str(caller))

    def reload(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        ok, problems = self._reload_config(f"control socket ({caller})")
        return {"ok": ok, "problems": problems}


def _follow(flights: list[Flight]) -> Iterator[dict[str, Any]]:
    for flight in flights:
        for ev in flight.follow():
            yield {"event": "progress", **ev}
    yield {"event": "result", "outcomes": [_outcome_json(f.result) for f in flights if f.result is not None]}


def _outcome_json(o: Outcome) -> dict[str, Any]:
    return o.to_json()
