"""The renewal's order across the certificate's CAs, in order: each failure judged by
:func:`certd.core.failover.after_failure` (try again, the next CA, or stop and wait), CAs still
waiting out a hold or rate limit from an earlier attempt skipped (:func:`certd.core.failover.waiting`),
and every skip said, logged and returned so the version's meta and the audit name them.

ARI's ``replaces`` (RFC 9773 §5) goes only to the CA that issued the current certificate: it
names that CA's certificate, and another CA would refuse it (or hold it against the account).
The waits live in the certificate's state (``ca_waits``), per CA: a hold at one CA does not
block trying the next, and the first CA is asked again at the next renewal once its wait ends.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Callable

from certd.acme import resume
from certd.config import AcmeConfig, CertificateConfig
from certd.core import failover, policy, retry
from certd.core.clock import isoformat
from certd.core.errors import AcmeError, CANotReachable, OperationFailed
from certd.engine.attempts import CertState, classify
from certd.engine.orders import Issued, Orders
from certd.engine.ports import Ports, Say
from certd.ops.log import event
from certd.store.files import StoredVersion

log = logging.getLogger("certd")
_NEXT_STEP = re.compile(r";\s*(will retry|not retrying)\b.*$")  # the error's own next step: the next CA is it


class NothingResumed(Exception):
    """A resume-only renewal found nothing to finish (not a failure: the caller reports not_due)."""


@dataclass
class Tried:
    """What one renewal's order did across the CAs: the ones skipped, and why."""

    skipped: list[dict[str, str]] = field(default_factory=list)
    stopped: bool = False   # the attempt ended at a CA that said to wait for it (not the last CA's failure)
    unreachable: list[str] = field(default_factory=list)  # CAs that did not answer (CANotReachable)

    def skip(self, cert: str, ca: str, why: str, say: Say) -> None:
        self.skipped.append({"ca": ca, "reason": why})
        say(f"CA {ca} skipped: {why}")
        event(log, "ca_skipped", logging.WARNING, name=cert, ca=ca, reason=why)


class Failover:
    """Orders over ``ports`` through ``orders``, trying the certificate's CAs in order."""

    def __init__(self, ports: Ports, orders: Orders) -> None:
        self.ports, self.orders = ports, orders

    def obtain(self, cert: CertificateConfig, stored: StoredVersion | None, state: CertState,
               new_key: Callable[[], bytes], replaces: str | None, say: Say, *,
               ignore_waits: bool = False, resume_only: bool = False) -> tuple[Issued, Tried]:
        """The certificate from the journaled order, else from the first CA that issues it.
        ``state.ca_waits`` is updated in memory (the caller saves the state). The last error
        (OperationFailed) when no CA issued; ``ignore_waits`` (a forced renewal) tries every CA."""
        tried = Tried()
        cas = self.ports.config.cas_for(cert)
        now = self.ports.clock.now()
        emergency = policy.expiring_at(stored.bundle.info.not_before, stored.bundle.info.not_after) \
            if stored is not None else None
        waits = dict(state.ca_waits or {})
        abandoned: str | None = None   # the CA that could not continue the journaled order
        resume_error: OperationFailed | None = None
        try:
            issued = self.orders.resumed(cert, say)
        except OperationFailed as e:  # its CA failed: with several CAs, as if it had failed a new order
            if resume_only:
                raise  # finishing another node's order: its failure is that renewal's, nothing else is tried
            abandoned, resume_error = self._resume_failed(cert, cas, e, emergency, waits, tried, say), e
        else:
            if issued is not None:
                return issued, tried
            if resume_only:  # stored already, or discarded: a fresh order is the scheduler's call, not ours
                raise NothingResumed(f"{cert.name}: the journaled order needs no finishing (its certificate is "
                                     f"stored, or the CA could not continue it); nothing ordered")
        issuer = self.ports.config.issuing_ca(stored.meta) if stored is not None else None
        issuing = issuer.name if issuer is not None else None  # replaces goes there only
        order: list[AcmeConfig] = []   # the CAs asked this time: those not waiting (one CA: always)
        for ca in cas:
            why = None if ignore_waits or len(cas) == 1 else failover.waiting(waits, ca.name, now)
            if ca.name == abandoned:
                continue  # it just failed to continue its own order: said already
            if why is None:
                order.append(ca)
            else:
                tried.skip(cert.name, ca.name, why, say)
        try:
            if not order:
                raise resume_error or _all_waiting(cert, cas, waits, now)
            for i, ca in enumerate(order):
                prior = waits.get(ca.name)
                try:
                    got = self._at(cert, ca, new_key, replaces if ca.name == issuing else None, say, emergency,
                                   waits, several=len(cas) > 1, last=i == len(order) - 1, tried=tried)
                except OperationFailed as e:
                    if waits.get(ca.name) is prior:  # no new wait of its own: the certificate's failure as it is
                        raise
                    # a CA that said to wait for it: the CAs after it do not count
                    relevant = cas[:[c.name for c in cas].index(ca.name) + 1] if tried.stopped else cas
                    raise _lasting(cert, relevant, ca.name, waits, e, self.ports.clock.now(), tried.unreachable) from e
                if got is not None:
                    waits.pop(ca.name, None)  # it answered: its next refusal starts a fresh schedule
                    # an abandoned order's journal is still stored: cleared with this one's
                    return (replace(got, journaled=True) if abandoned else got), tried
            raise AssertionError("the last CA asked either issues or raises")
        finally:
            state.ca_waits = waits or None

    def _resume_failed(self, cert: CertificateConfig, cas: tuple[AcmeConfig, ...], error: OperationFailed,
                       emergency: datetime | None, waits: dict[str, dict[str, Any]], tried: Tried,
                       say: Say) -> str:
        """The name of the CA that could not continue the journaled order when another CA may
        help (it is skipped this attempt; a refusal or long rate limit is noted in ``waits``);
        else ``error`` is raised: one CA alone, or a failure no other CA would help with."""
        name = self.orders.journal_ca(cert) or cas[0].name
        self.orders.failed(cert.name, error)  # the journal stays while the order may still complete
        # one try (the resume), and no second one: the CA's order may still complete, and the next
        # CA helps sooner than asking a CA that is down again (a budget of 1 says so truthfully)
        step = failover.after_failure(error, 1, self.ports.clock.now(), emergency, budget=1)
        if len(cas) == 1 or step.action == failover.STOP:
            raise error
        if step.wait_until is not None:
            waits[name] = {"until": isoformat(step.wait_until), "kind": step.kind or "",
                           "problem": retry.short(getattr(error, "problem_type", None)) or "", "count": 1}
        if isinstance(error, CANotReachable):
            tried.unreachable.append(name)
        tried.skip(cert.name, name, f"could not continue its order: {step.reason}: {_NEXT_STEP.sub('', str(error))}",
                   say)
        return name

    def _at(self, cert: CertificateConfig, ca: AcmeConfig, new_key: Callable[[], bytes], replaces: str | None,
            say: Say, emergency: datetime | None, waits: dict[str, dict[str, Any]], *, several: bool, last: bool,
            tried: Tried) -> Issued | None:
        """The certificate from ``ca``, or None to go on with the next CA; raises when the
        attempt stops here (``last``, or a failure no other CA would help with). With
        ``several`` CAs a wait is noted in ``waits`` and the error names the CA (one CA alone:
        the certificate's own hold says it, and messages are as they always were)."""
        tries = 0
        while True:
            tries += 1
            try:
                return self.orders.order(cert, ca, new_key, replaces, say)
            except OperationFailed as e:
                self.orders.failed(cert.name, e)
                before = waits.get(ca.name) or {}
                count = retry.count_after(classify(e), before.get("kind"), int(before.get("count", 0)))
                step = failover.after_failure(e, tries, self.ports.clock.now(), emergency, held_failures=count)
                if step.action == failover.RETRY and not last:
                    say(f"CA {ca.name} {step.reason}; asking it again")
                    self.ports.clock.sleep(failover.TRANSIENT_PAUSE)
                    continue
                if step.wait_until is not None and several:
                    waits[ca.name] = {"until": isoformat(step.wait_until), "kind": step.kind or "",
                                      "problem": retry.short(getattr(e, "problem_type", None)) or "",
                                      "count": count}
                if last or step.action == failover.STOP:
                    tried.stopped = step.action == failover.STOP
                    if several and e.args and isinstance(e.args[0], str):
                        e.args = (f"CA {ca.name}: {e.args[0]}", *e.args[1:])  # several CAs: say whose answer
                    raise
                if isinstance(e, CANotReachable):
                    tried.unreachable.append(ca.name)
                tried.skip(cert.name, ca.name, f"{step.reason}: {_NEXT_STEP.sub('', str(e))}", say)
                return None


def _all_waiting(cert: CertificateConfig, cas: tuple[AcmeConfig, ...], waits: dict[str, dict[str, Any]],
                 now: datetime, cause: str | None = None) -> AcmeError:
    """Every CA of ``cert`` is waiting out an earlier refusal or rate limit: a failure that lasts
    until the first of them may be asked again (a wait kept for a CA no longer in ``cas`` is
    neither said nor waited for)."""
    names = [ca.name for ca in cas]
    ends = sorted((str(waits[name].get("until")), name) for name in names if failover.waiting(waits, name, now))
    said = "; ".join(f"{name}: {failover.waiting(waits, name, now)}" for _, name in ends)
    first_until = datetime.fromisoformat(ends[0][0].replace("Z", "+00:00")) if ends else now
    seconds = max(1.0, (first_until - now).total_seconds())
    head = f"{cause}; " if cause else f"issuing {cert.name}: "
    return AcmeError(f"{head}every CA is waiting ({said}); next try when the first one may be asked",
                     problem_type=retry.PREFIX + "rateLimited", retry_after=seconds)


def _lasting(cert: CertificateConfig, cas: tuple[AcmeConfig, ...], failed: str, waits: dict[str, dict[str, Any]],
             error: OperationFailed, now: datetime, unreachable: list[str] | None = None) -> OperationFailed:
    """What the certificate itself records when CA ``failed`` ended the attempt with ``error``
    (``cas``: the CAs a next attempt would consider, ``failed`` among them).

    When that failure left ``failed`` waiting anew (a refusal, a rate limit), the wait is that
    CA's (kept in ``waits``): the certificate may try again as soon as any of ``cas`` may be
    asked — at the next try on the short backoff when one is not waiting (it was only down),
    else when the first wait ends. ``error`` as it is when that is ``failed``'s own wait.

    When a CA the next try asks did not answer in this attempt (``unreachable``), the failure is
    :class:`CANotReachable`: the certificate waits for that CA, so the state says "CA
    unreachable" and the daemon's CA probe retries it as soon as that CA answers again."""
    if len(cas) <= 1 or failover.waiting(waits, failed, now) is None:
        return error
    said = _NEXT_STEP.sub("", str(error))
    free = [ca.name for ca in cas if failover.waiting(waits, ca.name, now) is None]
    down = [name for name in free if name in (unreachable or ())]
    if free:
        text = f"{said}; CA {failed} skipped until {waits[failed]['until']}, {', '.join(free)} asked at the next try"
        lasting = CANotReachable(f"{text} (CA {', '.join(down)} not answering)") if down else \
            AcmeError(text, transient=True)
    elif min(str(waits[ca.name].get("until")) for ca in cas) >= str(waits[failed].get("until")):
        return error  # its own wait ends first: the certificate waits for it, as the error says
    else:
        lasting = _all_waiting(cert, cas, waits, now, said)
    lasting.transient = resume.order_may_live(error)  # the journal of this CA's order: judged as before
    return lasting
