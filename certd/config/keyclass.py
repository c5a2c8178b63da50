"""Key classes: ``[[key_class]]`` tables that certificates name with ``key_class = "NAME"``.

A class carries key policy a group of certificates shares (``key_type``, ``reuse_key``,
``max_key_age``, ``renew_before``, ``keep_versions``, ``destroy_after``). Precedence is
decided here, once, at parse time: a setting written on the certificate wins over its class,
a class setting wins over the default. The :class:`~certd.config.schema.CertificateConfig`
that comes out holds the effective values, so nothing downstream needs to know classes exist
but for ``origins``, which records which rule set each setting (``"certificate"``,
``"key_class NAME"`` or ``"default"``) so the policy can say which rule decided. ``origins``
stays empty for a certificate that names no class (no parsed config changes without classes).

Mixed into :class:`certd.config.parse.Parser`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from certd.config.fields import FieldParser
from certd.config.schema import KEY_TYPES, CertificateConfig, KeyClassConfig, RenewBefore
from certd.config.values import Table, parse_duration

# The certificate settings a class may supply, in the order origins lists them.
CLASS_SETTINGS = ("key_type", "reuse_key", "max_key_age", "renew_before", "keep_versions", "destroy_after")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class ClassRef:
    """What a ``[[certificate]]`` table says about key classes: the class it names, its own
    ``max_key_age`` / ``destroy_after``, and which class-able settings it writes itself."""

    name: str | None
    max_key_age: float | None
    destroy_after: float | None
    own: frozenset[str]


class KeyClassSections(FieldParser):
    """Parses ``[[key_class]]`` tables and applies them to certificates."""

    def __init__(self, path: Path, check_runtime: bool) -> None:
        super().__init__(path, check_runtime)
        self.classes: dict[str, KeyClassConfig] = {}

    def renew_before(self, t: Table) -> RenewBefore | None:  # Parser's, shared with [[certificate]]
        raise NotImplementedError

    def key_classes(self, raw: list[Any]) -> tuple[KeyClassConfig, ...]:
        """Parse every ``[[key_class]]``; remember them by name for :meth:`apply_key_class`."""
        for i, item in enumerate(raw):
            kc = self.key_class_table(Table(self, f"key_class[{i}]", item))
            if kc is None:
                continue
            if kc.name in self.classes:
                self.problem(f"key_class[{i}].name", f"duplicate key class {kc.name!r}; class names must be unique")
                continue
            self.classes[kc.name] = kc
        return tuple(self.classes.values())

    def key_class_table(self, t: Table) -> KeyClassConfig | None:
        name = t.get("name", str, required=True)
        if name is not None and not _NAME_RE.fullmatch(name):
            self.problem(t.key("name"), f"{name!r}: expected 1-64 characters of letters, digits, '.', '_', '-'")
            name = None
        if name is not None:
            t.where = f"{t.where} ({name})"
        key_type = t.get("key_type", str)
        if key_type is not None and key_type not in KEY_TYPES:
            self.problem(t.key("key_type"), f"unknown key type {key_type!r}; expected one of {', '.join(KEY_TYPES)}")
        reuse_key = t.get("reuse_key", bool)
        max_key_age = self.positive_duration(t, "max_key_age")
        renew_before = self.renew_before(t)
        keep = t.get("keep_versions", int)
        if keep is not None and not 2 <= keep <= 100:
            self.problem(t.key("keep_versions"), f"{keep} is out of range; expected 2..100 (the previous version is "
                                                 "the rollback backup)")
        destroy_after = self.positive_duration(t, "destroy_after")
        t.done()
        if name is None:
            return None
        return KeyClassConfig(name, key_type, reuse_key, max_key_age, renew_before, keep, destroy_after)

    def positive_duration(self, t: Table, name: str) -> float | None:
        """A duration such as "30d" or "12h" (or whole seconds), > 0; None when absent or wrong."""
        raw = t.get(name, (str, int))
        if raw is None:
            return None
        seconds = float(raw) if isinstance(raw, int) else parse_duration(raw)
        if seconds is None or seconds <= 0:
            self.problem(t.key(name), f"{raw!r}: expected a positive duration such as \"30d\", \"12h\", \"90m\"")
            return None
        return seconds

    def class_ref(self, t: Table) -> ClassRef:
        """Read a certificate's ``key_class``, ``max_key_age`` and ``destroy_after`` (before its
        ``t.done()``); an unknown class is a problem naming the classes that exist."""
        name = t.get("key_class", str)
        if name is not None and name not in self.classes:
            defined = ", ".join(sorted(self.classes))
            hint = f"defined key classes: {defined}" if defined else \
                f"no [[key_class]] tables are defined; add one with name = {name!r}"
            self.problem(t.key("key_class"), f"unknown key class {name!r}; {hint}")
            name = None
        return ClassRef(name, self.positive_duration(t, "max_key_age"), self.positive_duration(t, "destroy_after"),
                        frozenset(k for k in CLASS_SETTINGS if k in t.data))

    def apply_key_class(self, cert: CertificateConfig, ref: ClassRef) -> CertificateConfig:
        """``cert`` with its class's settings where the certificate left them to the default."""
        cert = replace(cert, max_key_age=ref.max_key_age, destroy_after=ref.destroy_after)
        kc = self.classes.get(ref.name) if ref.name is not None else None
        if kc is None:
            return cert
        values: dict[str, Any] = {}
        origins: list[tuple[str, str]] = []
        for setting in CLASS_SETTINGS:
            value = getattr(kc, setting)
            if setting in ref.own:
                origins.append((setting, "certificate"))
            elif value is not None:
                values[setting] = value
                origins.append((setting, f"key_class {kc.name}"))
            else:
                origins.append((setting, "default"))
        return replace(cert, key_class=kc.name, origins=tuple(origins), **values)
