"""http-01 answers shared by a fleet: whichever node the load balancer sends the CA's request to
can answer it (docs/FLEET.md, "How nodes agree").

A fleet's daemon hands its :class:`AnswerBoard` (:class:`certd.store.pgfleet.FleetBook`, rows of
``certd_challenges``) to :func:`share_answers` at start. From then on, every http-01 answer this
process presents (built-in responder or webroot) is published to the board *before* the
challenge is answered, withdrawn at cleanup, and the built-in responder answers a token it does
not know from the board. Without a board (one host) every function here does nothing.
"""

from __future__ import annotations

import logging
from typing import Protocol

from certd.core.errors import ChallengeFailed

log = logging.getLogger("certd.solvers")


class AnswerBoard(Protocol):
    """http-01 answers shared by a fleet (:class:`certd.store.pgfleet.FleetBook`): whichever node
    the load balancer sends the CA's request to can answer it."""

    def publish(self, token: str, key_authorization: str, name: str) -> None: ...
    def lookup(self, token: str) -> str | None: ...
    def withdraw(self, token: str) -> None: ...


_BOARD: AnswerBoard | None = None


def share_answers(board: AnswerBoard | None) -> None:
    """From now on (None: no longer) publish every http-01 answer this process presents to
    ``board`` before the challenge is answered, and answer a token this process does not know
    from ``board``: a fleet's daemon calls it at start."""
    global _BOARD
    _BOARD = board


def lookup(token: str) -> str | None:
    """Another node's answer for ``token``; None when not sharing, or (logged) when the
    database cannot say."""
    board = _BOARD
    if board is None:
        return None
    try:
        return board.lookup(token)
    except Exception as e:  # noqa: BLE001 - a database error must answer 404, not kill the handler
        log.warning("http-01 responder: cannot look up token in the fleet's database: %s", e)
        return None


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
