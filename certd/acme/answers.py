"""http-01 answers shared by a fleet: whichever node the load balancer sends the CA's request to
can answer it (docs/FLEET.md, "How nodes agree").

A fleet's daemon hands its :class:`AnswerBoard` (:class:`certd.store.pgfleet.FleetBook`, rows of
``certd_challenges``) to :func:`share_answers` at start. From then on, every http-01 answer this
process presents (built-in responder or webroot) is published to the board *before* the
challenge is answered, withdrawn at cleanup, and the built-in responder answers a token it does
not know from the board. Without a board (one host) every function here does nothing.

Anyone can send the responder requests for tokens nobody issued (port 80 is public), so a
lookup is kept cheap and bounded: a path that is no ACME token (RFC 8555 §8.3: base64url, at
least 128 bits of entropy, so at least 22 characters of ``[A-Za-z0-9_-]``) is answered 404
without asking the database; a token the database did not know is remembered for
:data:`MISS_TTL` seconds (at most :data:`MISS_MAX` of them); and the board itself runs one
lookup at a time (:class:`certd.store.pgfleet.FleetBook`), so a flood holds at most one of the
store's pooled connections and renewals keep the rest. A failing lookup is logged at most once
a minute (a flood during an outage would otherwise flood the log).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from certd.core.errors import ChallengeFailed

log = logging.getLogger("certd.solvers")


class AnswerBoard(Protocol):
    """http-01 answers shared by a fleet (:class:`certd.store.pgfleet.FleetBook`): whichever node
    the load balancer sends the CA's request to can answer it."""

    def publish(self, token: str, key_authorization: str, name: str) -> None: ...
    def lookup(self, token: str) -> str | None: ...
    def withdraw(self, token: str) -> None: ...


#: what an ACME token looks like (RFC 8555 §8.3); the upper bound only keeps junk out of the query
TOKEN = re.compile(r"[A-Za-z0-9_-]{22,256}")
MISS_TTL = 5.0  # seconds a token the database did not know is answered 404 without asking again
MISS_MAX = 4096  # remembered misses at most (the oldest are forgotten first)
WARN_EVERY = 60.0  # seconds between two warnings about failing lookups


class _Lookups:
    """Lookups of other nodes' answers on a board: shape check, negative cache, quiet failures."""

    def __init__(self, board: AnswerBoard, monotonic: Callable[[], float]) -> None:
        self.board, self._monotonic = board, monotonic
        self._misses: OrderedDict[str, float] = OrderedDict()  # token -> forget after (monotonic)
        self._lock = threading.Lock()
        self._warned_at: float | None = None
        self._failed = 0

    def lookup(self, token: str) -> str | None:
        if not TOKEN.fullmatch(token) or self._missed(token):
            return None
        try:
            found = self.board.lookup(token)
        except Exception as e:  # noqa: BLE001 - a database error must answer 404, not kill the handler
            self._warn(e)
            return None
        if found is None:
            with self._lock:
                self._misses[token] = self._monotonic() + MISS_TTL
                self._misses.move_to_end(token)
                while len(self._misses) > MISS_MAX:
                    self._misses.popitem(last=False)
        return found

    def _missed(self, token: str) -> bool:
        with self._lock:
            until = self._misses.get(token)
            if until is None:
                return False
            if self._monotonic() < until:
                return True
            del self._misses[token]
            return False

    def _warn(self, e: Exception) -> None:
        with self._lock:
            self._failed += 1
            now = self._monotonic()
            if self._warned_at is not None and now - self._warned_at < WARN_EVERY:
                return
            self._warned_at, failed, self._failed = now, self._failed, 0
        log.warning("http-01 responder: cannot look up token in the fleet's database: %s "
                    "(%d lookup(s) failed since the last warning)", e, failed)


_LOOKUPS: _Lookups | None = None
_BOARD: AnswerBoard | None = None


def share_answers(board: AnswerBoard | None, *, monotonic: Callable[[], float] = time.monotonic) -> None:
    """From now on (None: no longer) publish every http-01 answer this process presents to
    ``board`` before the challenge is answered, and answer a token this process does not know
    from ``board``: a fleet's daemon calls it at start. ``monotonic``: the negative cache's clock."""
    global _BOARD, _LOOKUPS
    _BOARD = board
    _LOOKUPS = None if board is None else _Lookups(board, monotonic)


def lookup(token: str) -> str | None:
    """Another node's answer for ``token``; None (a 404) when not sharing, when ``token`` is no
    ACME token, when the database did not know it a moment ago, or (logged) when it cannot say."""
    lookups = _LOOKUPS
    return None if lookups is None else lookups.lookup(token)


def publish(domain: str, token: str, key_authorization: str) -> None:
    """Publish an http-01 answer to the fleet's board (when sharing): before the challenge is
    answered, so any node can serve it. ChallengeFailed when the database cannot take it."""
    board = _BOARD
    if board is None:
        return
    try:
        board.publish(token, key_authorization, domain)
    except Exception as e:  # noqa: BLE001 - any database failure: this challenge cannot be answered
        raise ChallengeFailed(f"http-01 for {domain}: cannot share the answer with the fleet's other nodes: {e}; "
                              "will retry", transient=True) from None


def withdraw(token: str) -> None:
    """Delete a published answer (and any expired one); never raises (they expire anyway)."""
    board = _BOARD
    if board is None:
        return
    try:
        board.withdraw(token)
    except Exception as e:  # noqa: BLE001 - cleanup must not mask the order's outcome
        log.warning("http-01: cannot delete a shared answer from the fleet's database: %s", e)
