"""The configuration's scalar values - durations, listen addresses, domain names (IDN via
UTS #46), loopback hosts - and typed access to one TOML table that reports wrong types and
unknown keys as problems."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Protocol

import idna

from certd.config.schema import Listen

_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_DURATION_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


class Problems(Protocol):
    def problem(self, key: str, message: str) -> None: ...


class Table:
    """A TOML table that remembers which keys were read, to report the unknown ones."""

    def __init__(self, parser: Problems, where: str, data: Any) -> None:
        self.p, self.where = parser, where
        if not isinstance(data, dict):
            parser.problem(where, f"expected a table, got {type_name(data)}")
            data = {}
        self.data: dict[str, Any] = data
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None,
            required: bool = False) -> Any:
        self.seen.add(name)
        if name not in self.data:
            if required:
                self.p.problem(self.key(name), "required key is missing")
            return default
        value = self.data[name]
        # bool is an int in Python; a TOML boolean must not pass for a number.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            self.p.problem(self.key(name), f"expected {_kind_name(kind)}, got {type_name(value)}")
            return default
        return value

    def done(self) -> None:
        for k in self.data:
            if k not in self.seen:
                self.p.problem(self.key(k),
                               "unknown key (check the spelling; see the README's configuration reference)")


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_duration(raw: str) -> float | None:
    """``"1d12h"``, ``"90m"``, ``"45s"`` -> seconds; None when malformed."""
    m = _DURATION_RE.match(raw.strip())
    if not m or not any(m.groups()):
        return None
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return float(((d * 24 + h) * 60 + mi) * 60 + s)


def parse_listen(raw: str) -> Listen | str:
    """``"127.0.0.1:5002"`` / ``"[::1]:5002"`` -> Listen, or a problem description."""
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", raw) or re.match(r"^([^:\[\]\s]+):(\d+)$", raw)
    if not m:
        return f"{raw!r}: expected \"host:port\" (IPv6 as \"[::1]:port\")"
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        return f"{raw!r}: port {port} is out of range 1..65535"
    return Listen(m.group(1), port)


def normalize_domain(raw: str) -> tuple[str, str | None]:
    """Lower-case, IDNA-encode (UTS #46) and check a DNS name for an ACME order.

    Returns ``(name, None)`` or ``(raw, problem)``.
    """
    name = raw.strip().rstrip(".")
    wildcard = name.startswith("*.")
    body = name[2:] if wildcard else name
    if not body:
        return raw, f"{raw!r} is not a domain name"
    if "*" in body:
        return raw, f"{raw!r}: a wildcard must be the whole left-most label, as in \"*.example.com\""
    try:
        ipaddress.ip_address(body)
        return raw, f"{raw!r} is an IP address; certd requests DNS names only"
    except ValueError:
        pass
    lower = body.lower()
    if body.isascii() and len(lower) <= 253 and all(_LABEL_RE.match(lab) and lab[2:4] != "--"
                                                    for lab in lower.split(".")):
        ascii_name = lower  # what UTS #46 makes of a plain letters-digits-hyphens name, 30x faster
    else:
        try:
            ascii_name = idna.encode(body, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            return raw, f"{raw!r} is not a valid (internationalized) domain name: {e}"
    labels = ascii_name.split(".")
    if len(labels) < 2:
        return raw, f"{raw!r}: a single-label name cannot get a public certificate; use a fully qualified name"
    if len(ascii_name) > 253 or not all(_LABEL_RE.match(lab) for lab in labels):
        return raw, (f"{raw!r} is not a valid domain name "
                     "(labels of letters, digits and inner hyphens, 63 characters each)")
    return ("*." if wildcard else "") + ascii_name, None


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "an array", dict: "a table",
             float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def type_name(value: Any) -> str:
    return _kind_name(type(value))
