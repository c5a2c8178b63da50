"""Logging: stable snake_case event names with key=value fields.

``event(log, "cert_published", name="www", version=3)`` logs
``cert_published name=www version=3``; values with spaces are quoted. Never pass key material.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(level: int = logging.INFO, *, stream: Any = None) -> None:
    """Configure the root logger once (stderr; systemd's journal picks it up)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
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


def event(log: logging.Logger, name: str, level: int = logging.INFO, /, **fields: Any) -> None:
    if log.isEnabledFor(level):
        log.log(level, "%s %s", name, " ".join(f"{k}={fmt(v)}" for k, v in fields.items() if v is not None))
