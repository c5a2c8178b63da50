"""Text from outside, made safe to show: escaped control characters, validated reasons.

Anybody in the control group can type a ``--reason``; a CA or a hook can put anything in an
error. Such text reaches the daemon's log (one line per record: the journal, and the
``audit_record`` line docs/COMMANDS.md calls the audit chain's external anchor) and the operator's
terminal (``status``, ``history``). A newline there forges a log line; an ESC sequence hides or
fakes table rows. So every place that *shows* text escapes it (:func:`escape`), and a reason is
refused at the door (:func:`check_reason`) if it is not a short line of printable text. The
audit log keeps what it was given: JSON escapes it already, and it is the record.
"""

from __future__ import annotations

import re

from certd.core.errors import UsageError

MAX_REASON = 500  # characters

# Every character str.isprintable() refuses: C0/C1 controls (newline, ESC, DEL, ...), line and
# paragraph separators, and the other non-printing categories (Zl, Zp, Cc, Cf, Cs, Co, Cn, Zs but space).
_UNSAFE = re.compile(r"[^\x20-\x7e]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _esc(m: re.Match[str]) -> str:
    c = m.group()
    if c.isprintable():
        return c
    if c in _NAMED:
        return _NAMED[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def escape(text: str) -> str:
    """``text`` on one line with every non-printable character shown as a backslash escape
    (``\\n``, ``\\x1b``, ``\\u2028``); printable text, including non-ASCII, is left alone."""
    if text.isascii() and text.isprintable():
        return text  # the common case, fast
    return _UNSAFE.sub(_esc, text)


def check_reason(reason: str, what: str = "--reason") -> str:
    """``reason`` if it is at most MAX_REASON printable characters, else one UsageError that
    says what to change. Used by the CLI (before it calls anyone) and by the daemon (whatever
    a client sends)."""
    if not isinstance(reason, str):
        raise UsageError(f"{what}: expected text, got {type(reason).__name__}")
    if len(reason) > MAX_REASON:
        raise UsageError(f"{what}: {len(reason)} characters; at most {MAX_REASON} allowed (shorten it; "
                         f"details belong in your ticket system)")
    if not reason.isprintable():
        bad = next(c for c in reason if not c.isprintable())
        raise UsageError(f"{what}: contains the control character {escape(bad)} at position "
                         f"{reason.index(bad) + 1}; use one line of printable text")
    return reason
