"""A fleet node's lookups of other nodes' http-01 answers stay cheap under requests anyone can
send: junk never reaches the database, misses are remembered briefly, one lookup at a time."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from certd.acme import answers
from certd.core.clock import FakeClock
from certd.core.errors import StoreUnreachable
from certd.store import pgfleet
from certd.store.pgfleet import FleetBook
from tests.support.procs import wait_until


class CountingBoard:
    """An in-memory AnswerBoard that counts the lookups that reach it (the database's)."""

    def __init__(self) -> None:
        self.answers: dict[str, str] = {}
        self.asked: list[str] = []

    def publish(self, token: str, key_authorization: str, name: str) -> None:
        self.answers[token] = key_authorization

    def lookup(self, token: str) -> str | None:
        self.asked.append(token)
        return self.answers.get(token)

    def withdraw(self, token: str) -> None:
        self.answers.pop(token, None)


@pytest.fixture
def board_clock() -> Iterator[tuple[CountingBoard, FakeClock]]:
    board, clock = CountingBoard(), FakeClock()
    answers.share_answers(board, monotonic=clock.monotonic)
    yield board, clock
    answers.share_answers(None)


def test_junk_tokens_never_reach_the_database(board_clock: tuple[CountingBoard, FakeClock]) -> None:
    """Paths that are no ACME token (too short, not base64url, too long) are 404 without a lookup."""
    board, _ = board_clock
    for junk in ["", "x", "wp-login.php", "a" * 21, "a" * 21 + "/", "../../etc/passwd" + "a" * 22,
                 "%2e%2e" + "a" * 22, "a" * 257, "ä" * 30]:
        assert answers.lookup(junk) is None
    assert board.asked == []
    token = secrets.token_urlsafe(16)  # 128 bits: 22 characters, the least RFC 8555 allows
    board.answers[token] = f"{token}.thumb"
    assert answers.lookup(token) == f"{token}.thumb"


def test_a_miss_is_remembered_for_a_few_seconds(board_clock: tuple[CountingBoard, FakeClock]) -> None:
    """A token the database did not know is asked once per MISS_TTL; one published since is found after it."""
    board, clock = board_clock
    token = secrets.token_urlsafe(32)
    for _ in range(50):
        assert answers.lookup(token) is None
    assert board.asked == [token]
    board.answers[token] = "late"
    clock.advance(answers.MISS_TTL)
    assert answers.lookup(token) == "late"
    assert answers.lookup(token) == "late"  # hits are not cached: a withdrawn answer is gone at once
    assert len(board.asked) == 3


def test_the_negative_cache_is_bounded(board_clock: tuple[CountingBoard, FakeClock]) -> None:
    """Distinct unknown tokens never grow the negative cache past MISS_MAX (the oldest are forgotten)."""
    board, _ = board_clock
    tokens = [secrets.token_urlsafe(16) for _ in range(answers.MISS_MAX + 10)]
    for t in tokens:
        answers.lookup(t)
    lookups = answers._LOOKUPS
    assert lookups is not None and len(lookups._misses) == answers.MISS_MAX
    answers.lookup(tokens[0])  # forgotten: asked again
    assert board.asked.count(tokens[0]) == 2


class SlowDb:
    """FleetBook's database: every query blocks until released; counts queries running at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def now_param(self) -> Any:
        return None

    def _one(self, sql: str, args: Any = ()) -> tuple[Any, ...] | None:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.release.wait(30)
        with self._lock:
            self.running -= 1
        return None

    def _all(self, sql: str, args: Any = ()) -> list[tuple[Any, ...]]:
        return []


def test_the_store_runs_one_answer_lookup_at_a_time() -> None:
    """Concurrent lookups hold at most one database connection; one kept waiting past LOOKUP_WAIT fails fast."""
    db = SlowDb()
    book = FleetBook(db)
    results: list[Any] = []

    def ask() -> None:
        try:
            results.append(book.lookup(secrets.token_urlsafe(16)))
        except StoreUnreachable as e:
            results.append(e)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: db.running == 1, timeout=5, what="one lookup in the database")
    wait_until(lambda: len(results) == 7, timeout=pgfleet.LOOKUP_WAIT + 10, what="the others given up")
    assert all(isinstance(r, StoreUnreachable) and "one at a time" in str(r) for r in results)
    db.release.set()
    for t in threads:
        t.join(timeout=10)
    assert db.most == 1 and results[-1] is None
