"""Reasons are one short printable line; text shown to an operator has its controls escaped."""

from __future__ import annotations

import pytest

from certd.core.errors import UsageError
from certd.core.textsafe import MAX_REASON, check_reason, escape


def test_escape_shows_newlines_and_escape_codes_and_keeps_printable_text() -> None:
    """A forged log line or a colour code becomes visible text on the same line."""
    assert escape("ok\naudit_record seq=9\x1b[2K") == "ok\\naudit_record seq=9\\x1b[2K"
    assert escape("tab\there\rcr\x00\x7f") == "tab\\there\\rcr\\x00\\x7f"
    assert escape("line\u2028sep") == "line\\u2028sep"
    assert escape("café naïve — ok") == "café naïve — ok"


def test_a_reason_of_printable_text_up_to_the_limit_is_kept() -> None:
    """Operators' ordinary reasons, including non-ASCII, pass unchanged."""
    assert check_reason("ticket OPS-42: key rotation (café)") == "ticket OPS-42: key rotation (café)"
    assert check_reason("x" * MAX_REASON) == "x" * MAX_REASON
    assert check_reason("") == ""


@pytest.mark.parametrize("reason, said", [
    ("x" * (MAX_REASON + 1), "501 characters; at most 500"),
    ("fine\n2026-12-03 INFO certd.audit: audit_record seq=1", "control character \\n at position 5"),
    ("\x1b[2Khidden", "control character \\x1b at position 1"),
])
def test_a_reason_with_control_characters_or_too_long_is_one_actionable_error(reason: str, said: str) -> None:
    """One line that names the problem and the fix (exit 2 through UsageError)."""
    with pytest.raises(UsageError) as e:
        check_reason(reason)
    assert said in str(e.value) and "\n" not in str(e.value)
    assert e.value.exit_code == 2


def test_a_reason_that_is_not_text_is_refused() -> None:
    """A client sending JSON numbers or lists as the reason gets a usage error, not a crash."""
    with pytest.raises(UsageError, match="expected text"):
        check_reason(["a"], "reason")  # type: ignore[arg-type]

