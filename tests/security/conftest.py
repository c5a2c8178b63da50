"""Fixtures for the attack tests: a real unprivileged user (see tests/support/unpriv.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.unpriv import UnprivUser


@pytest.fixture(scope="session")
def attacker() -> Iterator[UnprivUser]:
    """A user who is neither root nor certd's user: the deploy directory's owner in the attacks."""
    user = UnprivUser()
    try:
        yield user
    finally:
        user.remove()
