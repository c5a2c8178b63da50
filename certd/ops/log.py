"""Logging: stable snake_case event names with key=value fields.

``event(log, "cert_published", name="www", version=3)`` logs
``cert_published name=www version=3``; values with spaces are quoted. Never pass key material.

Every record is one line: :class:`SafeFormatter` escapes control characters (newline, ESC, ...)
in the message and all its fields, so text from outside (an operator's reason, a CA's error, a
hook's output) cannot forge a line such as the ``audit_record seq=... hash=...`` anchor.
Tracebacks keep their lines but each continuation line is indented, so none of them can pass
for a record of its own.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Iterable

from certd.core.textsafe import escape

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SafeFormatter(logging.Formatter):
    """A Formatter whose records stay one line each: the message (after %-formatting, so every
    field) has its control characters escaped; traceback lines are escaped and indented."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        saved = record.message
        record.message = escape(saved)
        try:
            return super().formatMessage(record)
        finally:
            record.message = saved

    def formatException(self, ei: Any) -> str:
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indent(super().formatStack(stack_info))


def _indent(text: str) -> str:
    return "\n".join("  " + escape(line) for line in text.splitlines())


def setup(level: int = logging.INFO, *, stream: Any = None) -> None:
    """Configure the root logger once (stderr; systemd's journal picks it up)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(SafeFormatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries are chatty at INFO (every HTTP request); keep them at WARNING unless debugging.
    for noisy in ("urllib3", "acme", "httpx", "httpcore", "apscheduler", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level > logging.DEBUG else logging.DEBUG)


def fmt(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in " \t\"="):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


_PEM_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----.*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)"
                      r"|(?:^[A-Za-z0-9+/=]{16,}\r?\n)*-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----", re.S | re.M)


def redact(text: str, known_keys: Iterable[bytes] = ()) -> str:
    """``text`` with PEM private keys (whole, or cut short by truncated output) and every base64
    line of ``known_keys`` replaced by ``[private key redacted]``. For text certd did not write
    itself, such as a hook's output, before it reaches a log, an error or the audit log."""
    text = _PEM_KEY.sub("[private key redacted]", text)
    for key in known_keys:
        for line in key.decode("ascii", "replace").splitlines():
            if len(line) >= 16 and not line.startswith("-----"):
                text = text.replace(line, "[private key redacted]")
    return text


def event(log: logging.Logger, name: str, level: int = logging.INFO, /, **fields: Any) -> None:
    if log.isEnabledFor(level):
        log.log(level, "%s %s", name, " ".join(f"{k}={fmt(v)}" for k, v in fields.items() if v is not None))
