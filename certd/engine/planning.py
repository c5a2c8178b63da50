"""When each certificate is due, and how it stands: the facts the policy needs (the stored
certificate, the CA's renewal window, past failures) gathered from the store and the CA, and
the ``status --json`` row built from the same facts (so status and the scheduler never disagree).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Hashable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Iterator, Mapping

from certd.engine import attempts, keyage
from certd.engine.attempts import CertState as CertState  # its home is attempts; importable here too
from certd.core import policy
from certd.core import retry
from certd.deploy import strictmodes
from certd.core.clock import Clock, isoformat
from certd.config import CertificateConfig
from certd.engine.effects import unfinished_step
from certd.engine.lifecycle import VersionStatus
from certd.engine.ports import IssuerPort
from certd.engine.statebook import Change, StateBook, adopt
from certd.engine.statusindex import Entry, StatusIndex, row_state
from certd.core.errors import OperationFailed, StoreError, StoreUnreachable
from certd.ops.log import event
from certd.core.model import CertInfo
from certd.core.policy import ari_poll_interval
from certd.store.files import Store, StoredVersion, VersionInfo

log = logging.getLogger("certd")

ARI_POLL = "poll ACME Renewal Information"  # plan()'s reason when the next look is only an ARI poll
BROKEN_RECHECK = timedelta(minutes=10)  # how soon a broken certificate is looked at again
UNREACHABLE_RECHECK = timedelta(seconds=30)  # ... and one whose fleet database is out of reach


@dataclass(frozen=True)
class _Facts:
    """What plan() and status() know of one certificate, cached while it holds: the store's
    change token is the same, the certificate's configuration is equal, and the planned
    renewal time has not come (until then the decision stands)."""

    token: Hashable
    cert: CertificateConfig         # the configuration it was gathered for
    decision: policy.Decision
    #: ``json.dumps(row)`` of the status row (but for its time-dependent "state") without its
    #: closing brace (see Planner.status_json). Kept as text, not as the dict: ~1 KB less a
    #: certificate in the daemon (100 MB at 100,000, issue 20); status() parses it again.
    row_json: str
    failure_kind: str | None        # of the row: what its state is worked out from
    failures: int
    info: CertInfo | None = None
    revoked: bool = False
    held: bool = False              # revoked for cessationOfOperation: not renewed
    ari_cached: bool = False        # state.json holds an ARI answer for this serial
    ari_poll: datetime | None = None
    blocked_until: datetime | None = None  # a hold or rate limit (row["failure_kind"]) lasts until
    broken: str | None = None       # why this certificate cannot be planned or deployed (state "broken")
    key_created: datetime | None = None  # for the row's time-dependent key_age_days
    stale: bool = False             # the last known facts, the fleet's database out of reach
    #: the store's own_writes() when these facts were last found current by their change token
    #: (None: the store has none): see Planner.listing_json
    written: int | None = None
    #: from info, made at construction and kept by replace() (the facts are re-stamped whenever the
    #: daemon wrote the certificate): as a cached_property, lost at each, it was 1 s of a listing of
    #: 100,000 (Python 3.11's cached_property takes a lock)
    expiring_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.expiring_at is None and self.info is not None:
            object.__setattr__(self, "expiring_at", policy.expiring_at(self.info.not_before, self.info.not_after))

    def state(self, now: datetime) -> str:
        """The row's ``state`` at ``now``."""
        return row_state(now, self.broken is not None, self.blocked_until, self.info.not_after if self.info else None,
                         self.expiring_at, self.revoked, self.failure_kind, self.failures)

    def index_entry(self) -> Entry:
        """What the status index keeps of these facts (see certd.engine.statusindex): the row,
        what its state is worked out from, and until when they hold."""
        until = self.decision.renew_at if self.blocked_until is None else min(self.decision.renew_at,
                                                                               self.blocked_until)
        shown = (_iso(self.blocked_until), _iso(self.info.not_after if self.info else None), _iso(self.expiring_at),
                 self.revoked, self.failure_kind, self.failures, _iso(self.key_created))
        return self.token, until.isoformat(), self.row_json, shown


def _row(row: dict[str, Any]) -> tuple[str, str | None, int]:
    """What _Facts keeps of a status row: its text, failure kind and failures."""
    return json.dumps(row)[:-1], row.get("failure_kind"), row["failures"]


def _shown_of(facts: _Facts, now: datetime) -> tuple[str, str, datetime | None]:
    """What a status row is built from: the row's text, its state at ``now``, the key's creation."""
    return facts.row_json, facts.state(now), facts.key_created


def _row_text(row_json: str, state: str, key_created: datetime | None, now: datetime, next_run: str | None) -> str:
    """A status row's text (see Planner.status_json) from what _shown_of gives. Written out
    by hand, as json.dumps would (two of its calls were a third of a listing's time): the age
    is a float or None, ``next_run`` the scheduler's ISO 8601 text (no quote nor backslash)."""
    tail = f', "next_run": "{next_run}"' if next_run is not None else ""
    age = keyage.key_age_days(key_created, now)
    return f'{row_json}, "state": "{state}", "key_age_days": {"null" if age is None else repr(age)}{tail}}}'


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


class Planner:
    """The policy's facts for each certificate, read from ``store`` (and the CA's ARI through
    ``issuer()``, built on first use); per-certificate bookkeeping kept as CertState."""

    def __init__(self, store: Store, clock: Clock, issuer: Callable[[], IssuerPort],
                 issuer_at: Callable[[Mapping[str, Any]], IssuerPort | None] | None = None) -> None:
        self.store, self.clock, self._issuer = store, clock, issuer
        #: the store's count of this process's writes (FileStore), None when it has none: see listing_json
        self._own_writes: Callable[[str], int] | None = getattr(store, "own_writes", None)
        # ARI is asked of the CA that issued the certificate (from the version's meta; None: that
        # CA is no longer configured, and no other CA knows the certificate)
        self._issuer_at = issuer_at
        self._cache: dict[str, _Facts] = {}   # see _facts()
        self.states = StateBook(store)  # compare-and-set writes, the in-memory floor
        self.on_broken: Callable[[str, str], None] | None = None  # the manager emits cert_broken
        # Read-only commands' status rows only (never plan(), never the daemon): see statusindex
        self.index: StatusIndex | None = None

    def plan(self, cert: CertificateConfig) -> tuple[datetime, str]:
        """When the daemon should next look at ``cert``: its renewal time, or earlier to poll ARI."""
        now = self.clock.now()
        facts = self._facts(cert, now)
        when, why = facts.decision.renew_at, facts.decision.reason
        if facts.info is not None and not facts.held and not facts.stale:
            # No ARI answer cached: ask now, unless attempts are failing. Then the retry at the
            # end of the backoff asks ARI itself; a poll sooner would only be another attempt
            # (a state disk too full for the lease failed every one of them at once, for ever).
            poll_at = facts.ari_poll if facts.ari_cached else (None if facts.failures else now)
            if poll_at is not None and poll_at < when:
                when, why = poll_at, ARI_POLL
        return when, why

    def status(self, cert: CertificateConfig) -> dict[str, Any]:
        """One ``status --json`` row (see docs/CONTRACT.md); no network I/O.

        Rows come from the facts cache (see _Facts: four syscalls per certificate instead of
        three JSON files and a policy decision, so status over 10,000 certificates takes a
        fraction of a second), or the status index when a command set one (:attr:`index`);
        the time-dependent ``state`` is worked out afresh each time."""
        now = self.clock.now()
        row_json, state, key_created = self._shown(cert, now)
        return {**json.loads(row_json + "}"), "state": state, "key_age_days": keyage.key_age_days(key_created, now)}

    def status_json(self, cert: CertificateConfig, next_run: str | None = None) -> str:
        """:meth:`status` as one line of JSON, plus the daemon's ``next_run`` (ISO 8601 text):
        the row's text is cached with its facts (json.dumps of 10,000 rows cost ~0.1 s a request)."""
        now = self.clock.now()
        return _row_text(*self._shown(cert, now), now, next_run)

    def listing_json(self, certs: Iterable[CertificateConfig], next_runs: Mapping[str, str]) -> Iterator[str]:
        """:meth:`status_json` of each of ``certs`` (with its ``next_runs`` entry), for the
        daemon's whole listing. Facts found current since this process last wrote the
        certificate are shown as they are, without asking the store's change token again (five
        syscalls a certificate: 1.7 s of a listing of 100,000, issue 20). So a listing shows
        the daemon's own writes at once, and a change made by anything else (a hand edit)
        once :meth:`recheck` or the next look at the certificate (plan) has seen it; a store
        without ``own_writes`` (PostgreSQL: the fleet's other nodes write it) is asked each time.
        A certificate that is due is shown from its facts too (its state worked out at now), not
        gathered afresh as plan() does: at 100,000 certificates all due (a CA down for a day)
        that made each listing read 300,000 files; the scheduler looks at due ones anyway."""
        own_writes = self._own_writes
        if own_writes is None or self.index is not None:
            yield from (self.status_json(c, next_runs.get(c.name)) for c in certs)
            return
        now, cached, run_of = self.clock.now(), self._cache.get, next_runs.get
        for cert in certs:  # ~4 us a row: 100,000 in 0.4 s (the loop is written for that)
            name = cert.name
            hit = cached(name)
            if hit is None or hit.cert is not cert or hit.written != own_writes(name):
                hit = self._facts(cert, now)
            yield _row_text(hit.row_json, hit.state(now), hit.key_created, now, run_of(name))

    def recheck(self, certs: Iterable[CertificateConfig]) -> None:
        """Ask the store's change token of each of ``certs`` now, gathering afresh what changed:
        the daemon runs it every few minutes, so that :meth:`listing_json` sees changes made by
        anything but itself in that time at most."""
        if self._own_writes is None:
            return  # every listing asks the store
        now = self.clock.now()
        for cert in certs:
            try:
                self._facts(cert, now)
            except Exception:  # one certificate's trouble must not keep the rest from being looked at
                self._cache.pop(cert.name, None)  # so the listing asks the store for it afresh
                log.exception("status recheck of %s failed", cert.name)

    def _shown(self, cert: CertificateConfig, now: datetime) -> tuple[str, str, datetime | None]:
        """``cert``'s row text (without its closing brace), state at ``now`` and key creation
        time: from its facts, or from the status index (:attr:`index`) while its entry holds;
        the index learns fresh facts."""
        index = self.index
        if index is None or cert.name in self._cache:
            return _shown_of(self._facts(cert, now), now)
        token = self._token(cert.name)
        entry = index.get(cert.name, token, now)
        if entry is not None and not self._unsafe(cert):  # what is on disk beside the store: checked each time
            blocked, not_after, expiring, revoked, kind, failures, key_created = entry[3]
            state = row_state(now, False, _dt(blocked), _dt(not_after), _dt(expiring), revoked, kind, failures)
            return entry[2], state, _dt(key_created)
        facts = self._facts(cert, now, token)
        if facts.broken is None:
            index.put(cert.name, facts.index_entry())
        return _shown_of(facts, now)

    def _token(self, name: str) -> Hashable:
        try:
            return self.store.change_token(name)
        except StoreError:
            return None

    def _facts(self, cert: CertificateConfig, now: datetime, token: Hashable = ...) -> _Facts:
        own_writes = self._own_writes
        written = own_writes(cert.name) if own_writes is not None else None  # before the token: see listing_json
        if token is ...:
            token = self._token(cert.name)
        hit = self._cache.get(cert.name)
        if hit is not None and hit.token == token and (hit.cert is cert or hit.cert == cert) \
                and now < hit.decision.renew_at:
            if hit.written != written or hit.cert is not cert:  # current still: so stamped
                hit = self._cache[cert.name] = replace(hit, cert=cert, written=written)
        else:
            try:
                hit = replace(self._gather(cert, token), written=written)
            except StoreUnreachable as e:  # the fleet's database, not this certificate (store_down says so once):
                # the last known facts while it is away, never "broken" (no cert_broken record for every
                # name), looked at again UNREACHABLE_RECHECK later, not at once in a loop
                if hit is None:
                    return self._broken(cert, token, str(e), now)
                later = max(hit.decision.renew_at, now + UNREACHABLE_RECHECK)
                return replace(hit, decision=replace(hit.decision, renew_at=later), stale=True)
            except StoreError as e:  # one broken certificate never stops the rest (issue 12, F8)
                hit = replace(self._broken(cert, token, str(e), now), written=written)
            except (ValueError, TypeError, KeyError, AttributeError) as e:  # nor one a hand edit left unreadable
                # (state.json's "last_failure": "yesterday"): broken, and the listing says so
                reason = f"stored data certd cannot read ({type(e).__name__}: {e}); fix or remove the file"
                hit = replace(self._broken(cert, token, reason, now), written=written)
            if hit.broken is not None and (prev := self._cache.get(cert.name)) is not None \
                    and prev.broken == hit.broken:
                pass  # already reported
            elif hit.broken is not None:
                event(log, "cert_broken", logging.ERROR, name=cert.name, error=hit.broken)
                if self.on_broken is not None:
                    self.on_broken(cert.name, hit.broken)
            self._cache[cert.name] = hit
        return hit

    def _broken(self, cert: CertificateConfig, token: Hashable, reason: str, now: datetime) -> _Facts:
        """Facts for a certificate certd cannot plan or deploy: state ``broken``, the reason in
        ``broken_reason``, looked at again after BROKEN_RECHECK (the operator may fix it)."""
        decision = policy.Decision(now + BROKEN_RECHECK, f"broken: {reason}")
        row: dict[str, Any] = {"name": cert.name, "domains": list(cert.domains),
                               "ip_addresses": list(cert.ip_addresses), "version": None,
                               "serial": None, "not_before": None, "not_after": None,
                               "fingerprint_sha256": None, "key_type": cert.key_type,
                               "next_renewal": isoformat(decision.renew_at), "last_result": None,
                               "last_error": None, "failures": 0, "rotation": None, "profile": None,
                               "renewal_reason": decision.reason, "broken_reason": reason,
                               "key_class": cert.key_class, "ca": None, "ca_unreachable": False}
        try:
            state = self.load_state(cert.name)
            row.update(last_result=state.last_result, last_error=state.last_error, failures=state.failures)
        except StoreError:
            pass
        return _Facts(token, cert, decision, *_row(row), broken=reason)

    @staticmethod
    def _unsafe(cert: CertificateConfig) -> list[str]:
        """What makes ``cert``'s hooks or deploy targets unsafe to use (see strictmodes)."""
        unsafe = strictmodes.hook_problems(cert)
        if not cert.insecure_shared_deploy_dir:
            unsafe += strictmodes.certificate_problems(cert)
        return unsafe

    def _gather(self, cert: CertificateConfig, token: Hashable) -> _Facts:
        unsafe = self._unsafe(cert)
        if unsafe:
            raise StoreError(f"refusing to deploy: {unsafe[0]}")
        current = self.store.current(cert.name)
        state = self.load_state(cert.name)
        unfinished = unfinished_step(self.store.load_journal(cert.name))
        row: dict[str, Any] = {"name": cert.name, "domains": list(cert.domains),
                               "ip_addresses": list(cert.ip_addresses), "version": current,
                               "serial": None, "not_before": None, "not_after": None,
                               "fingerprint_sha256": None, "key_type": cert.key_type,
                               "next_renewal": None, "last_result": state.last_result,
                               "last_error": state.last_error, "failures": state.failures,
                               "rotation": unfinished, "profile": None,
                               "key_class": cert.key_class, "ca": None}
        until = attempts.blocked_until(state, self.clock.now())
        row.update(failure_kind=state.failure_kind if state.failures else None, problem=state.problem,
                   retry_after=isoformat(until) if until else None,
                   ca_unreachable=bool(state.failures and state.ca_unreachable))
        stored = self.store.load_info(cert.name, current) if current is not None else None
        decision = self.decide(cert, stored, state, refresh_ari=False)
        row["next_renewal"] = isoformat(decision.renew_at)
        row["renewal_reason"] = decision.reason
        if stored is None:
            return _Facts(token, cert, decision, *_row(row), blocked_until=until)
        info = stored.info
        row["profile"] = stored.meta.get("profile")
        row["ca"] = stored.meta.get("ca")  # the CA that issued the current version
        row.update(serial=info.serial, not_before=isoformat(info.not_before), not_after=isoformat(info.not_after),
                   fingerprint_sha256=info.fingerprint_sha256, key_type=info.key_type)
        status = VersionStatus.from_meta(stored.meta)
        held = status.held is not None
        if held:
            row["next_renewal"] = None  # the operator ended it; nothing is planned
        ari = state.ari if state.ari and state.ari.get("serial") == info.serial else None
        return _Facts(token, cert, decision, *_row(row), info, status.revoked is not None, held,
                      ari is not None, parse_time(ari.get("next_poll")) if ari else None, until,
                      key_created=keyage.key_created(stored.meta, info))

    def decide(self, cert: CertificateConfig, stored: StoredVersion | VersionInfo | None, state: CertState,
               refresh_ari: bool, ignore_failures: bool = False) -> policy.Decision:
        """The policy's decision, held back while the CA's refusal or rate limit lasts (see
        certd.retry: not even the emergency point comes sooner; ``renew --force`` does)."""
        decision = self._decide(cert, stored, state, refresh_ari, ignore_failures)
        decision = self._forced_retry(stored, state, decision)
        until = None if ignore_failures else attempts.blocked_until(state, self.clock.now())
        if until is not None and until > decision.renew_at:
            decision = policy.Decision(until, blocked_reason(cert.name, state, until), decision.emergency)
        return decision

    def _forced_retry(self, stored: StoredVersion | VersionInfo | None, state: CertState,
                      decision: policy.Decision) -> policy.Decision:
        """A forced renewal that failed is retried on the failure backoff, not left until the
        next scheduled renewal (the operator asked for a new certificate)."""
        retry_at = self.failure_retry_at(stored, state) if state.forced_retry else None
        if retry_at is None or retry_at >= decision.renew_at:
            return decision
        return policy.Decision(retry_at, f"retry {state.failures} of a forced renewal ({state.forced_retry}) after "
                                         f"failure, backoff until {isoformat(retry_at)}", decision.emergency)

    def failure_retry_at(self, stored: StoredVersion | VersionInfo | None, state: CertState) -> datetime | None:
        """When the failure backoff after ``state``'s failed attempts ends (None: no failure)."""
        last_failure = parse_time(state.last_failure)
        if not state.failures or last_failure is None:
            return None
        if stored is None:
            return last_failure + policy.first_issue_backoff(state.failures, random.Random(state.failures))
        info = stored.info
        return last_failure + policy.backoff(state.failures, info.not_before, info.not_after, last_failure,
                                             random.Random(info.serial))

    def _decide(self, cert: CertificateConfig, stored: StoredVersion | VersionInfo | None, state: CertState,
                refresh_ari: bool, ignore_failures: bool = False) -> policy.Decision:
        now = self.clock.now()
        failures = 0 if ignore_failures else state.failures
        if stored is None:
            return policy.decide(policy.Facts(failures=failures, last_failure=parse_time(state.last_failure)), now)
        info = stored.info
        held = VersionStatus.from_meta(stored.meta).held
        if held:  # revoked for cessationOfOperation: ARI asks for renewal, the operator said no
            return policy.Decision(info.not_after + (info.not_after - info.not_before) * 100, held)
        changed = None
        if set(info.identifiers) != set(cert.identifiers):
            changed = (f"configured names {sorted(cert.identifiers)} differ from the certificate's "
                       f"{sorted(info.identifiers)}")
        elif info.key_type != cert.key_type:
            changed = (f"configured key_type {cert.key_type}{keyage.class_note(cert, 'key_type')} differs from the "
                       f"certificate's {info.key_type}")
        if changed:
            last_failure = parse_time(state.last_failure)
            if failures and last_failure is not None:  # due now, but a failing CA is not hammered
                retry = last_failure + policy.backoff(failures, info.not_before, info.not_after, last_failure,
                                                      random.Random(info.serial))
                if retry > now:
                    return policy.Decision(retry, f"{changed}; retry {failures} after failure, "
                                                  f"backoff until {isoformat(retry)}")
            return policy.Decision(now, changed)
        ari = self._ari(stored, state, refresh_ari)
        facts = policy.Facts(info.not_before, info.not_after, cert.renew_before, ari,
                             failures, parse_time(state.last_failure), keyage.key_created(stored.meta, info),
                             timedelta(seconds=cert.max_key_age) if cert.max_key_age else None,
                             keyage.rule(cert, "max_key_age"), keyage.class_rule(cert, "renew_before"))
        # Seed by serial so the random point in a window is stable between calls (status vs run).
        return policy.decide(facts, now, random.Random(info.serial))

    def _ari(self, stored: StoredVersion | VersionInfo, state: CertState, refresh: bool) -> policy.AriWindow | None:
        info = stored.info
        cached = state.ari if state.ari and state.ari.get("serial") == info.serial else None
        now = self.clock.now()
        stale = cached is None or (parse_time(cached.get("next_poll")) or now) <= now
        if refresh and stale:
            lifetime = info.not_after - info.not_before
            try:
                at = self._issuer_at(stored.meta) if self._issuer_at else self._issuer()
                ri = at.renewal_info(cert_pem(self.store, stored)) if at is not None else None
            except OperationFailed as e:
                event(log, "ari_unavailable", logging.WARNING, name=stored.name, error=str(e))
                # Keep the last window we had; ask again after a short while.
                cached = dict(cached or {"serial": info.serial},
                              next_poll=isoformat(now + ari_poll_interval(None, now, lifetime) / 6))
            else:
                if ri is None:  # the CA has no ARI: look again in a day
                    cached = {"serial": info.serial,
                              "next_poll": isoformat(now + ari_poll_interval(None, now, lifetime) * 4)}
                else:
                    cached = {"serial": info.serial, "start": isoformat(ri.window_start),
                              "end": isoformat(ri.window_end),
                              "next_poll": isoformat(now + ari_poll_interval(ri.retry_after, now, lifetime))}
                    event(log, "ari_fetched", logging.DEBUG, name=stored.name, start=cached["start"], end=cached["end"])
            state.ari = cached
            ari = dict(cached)
            try:  # the ARI fields only: a failure or hold written meanwhile stays
                adopt(state, self.update_state(stored.name, lambda s: setattr(s, "ari", dict(ari))))
            except StoreError as e:  # kept in memory (load_state): the decision goes on
                event(log, "state_not_saved", logging.WARNING, name=stored.name, error=str(e))
        if not cached:
            return None
        start, end = parse_time(cached.get("start")), parse_time(cached.get("end"))
        return policy.AriWindow(start, end) if start and end else None

    def load_state(self, name: str) -> CertState:
        """The stored state, unless this process holds a later one it could not write (disk
        full): a lost write can only make certd wait longer, never retry sooner (statebook)."""
        return self.states.load(name)

    def update_state(self, name: str, change: Change) -> CertState:
        """Apply ``change`` to ``name``'s state by compare-and-set (see certd.engine.statebook):
        the state written. StoreError (the changed state is kept in memory)."""
        self._cache.pop(name, None)
        try:
            return self.states.update(name, change)
        finally:
            self._cache.pop(name, None)

    def save_state(self, name: str, state: CertState) -> None:
        """Replace the whole state (tests, tools): the engine writes changes (update_state)."""
        self._cache.pop(name, None)
        try:
            self.states.replace(name, state)
        finally:
            self._cache.pop(name, None)


def blocked_reason(name: str, state: CertState, until: datetime) -> str:
    """Why ``name`` waits until ``until`` after a refusal or rate limit, and how to try now."""
    problem = f" ({state.problem})" if state.problem else ""
    if state.failure_kind == retry.RATE_LIMITED:
        why = f"rate limited by the CA{problem}"
    else:
        why = f"held after the CA refused{problem}" + (f": {state.fix}" if state.fix else "")
    return f"{why}; next try at {isoformat(until)}, or now with: certd renew --force {name}"


def cert_pem(store: Store, stored: StoredVersion | VersionInfo) -> bytes:
    if isinstance(stored, StoredVersion):
        return stored.bundle.cert_pem
    return store.load(stored.name, stored.version).bundle.cert_pem


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
