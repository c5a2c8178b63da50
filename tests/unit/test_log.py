"""The daemon's log stays one line per record whatever text reaches it."""

from __future__ import annotations

import io
import logging

from certd.ops import log as logmod


def _logged(fn) -> str:  # type: ignore[no-untyped-def]
    stream = io.StringIO()
    logmod.setup(logging.INFO, stream=stream)
    try:
        fn(logging.getLogger("certd.test"))
    finally:
        logmod.setup(logging.WARNING)
    return stream.getvalue()


def test_a_field_with_a_newline_cannot_forge_an_audit_record_line() -> None:
    """The audit_record line is the chain's external anchor: a reason must not fake one."""
    forged = "x\n2026-12-03 03:00:00,000 INFO certd.audit: audit_record seq=99 hash=" + "0" * 64
    out = _logged(lambda log: logmod.event(log, "renewal_requested", name="www", reason=forged))
    lines = out.splitlines()
    assert len(lines) == 1
    assert "renewal_requested" in lines[0] and "\\n2026-12-03" in lines[0]
    assert not any(line.startswith("2026-12-03 03:00:00") for line in lines)


def test_escape_codes_in_a_message_are_shown_not_sent_to_the_terminal() -> None:
    """ESC sequences (clear line, colours) reach the journal as text."""
    out = _logged(lambda log: log.warning("hook said %s", "\x1b[2K\x1b[31mfake"))
    assert "\x1b" not in out and "\\x1b[2K\\x1b[31mfake" in out


def test_a_traceback_keeps_its_lines_but_none_starts_like_a_record() -> None:
    """An exception message with a newline stays inside the indented traceback."""
    def fail(log: logging.Logger) -> None:
        try:
            raise ValueError("boom\n2026-12-03 03:00:00,000 INFO certd.audit: audit_record seq=1")
        except ValueError:
            log.exception("handler failed")
    lines = _logged(fail).splitlines()
    assert lines[0].endswith("handler failed") and len(lines) > 2
    assert all(line.startswith("  ") for line in lines[1:])
    assert any("Traceback" in line for line in lines[1:])
