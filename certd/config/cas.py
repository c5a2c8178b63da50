"""Several CAs: ``[[ca]]`` tables, and the ``ca = [...]`` list a certificate names them with.

``[acme]`` stays valid: it is shorthand for one CA named ``default``. A file has ``[acme]`` or
``[[ca]]`` tables, never both (which one would ``renew --dry-run`` or an import mean?). Each
``[[ca]]`` table takes the keys of ``[acme]`` plus ``name``; a certificate's ``ca`` names
them in the order they are tried, and without one it is ordered from every CA in file order
(the failover itself: :mod:`certd.core.failover`).

Mixed into :class:`certd.config.parse.Parser`.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from certd.config.fields import FieldParser
from certd.config.schema import AcmeConfig
from certd.config.values import Table, type_name

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class CASections(FieldParser):
    """Parses ``[acme]`` / ``[[ca]]`` into the CAs, and checks the certificates' ``ca`` lists."""

    def __init__(self, path: Path, check_runtime: bool) -> None:
        super().__init__(path, check_runtime)
        self.ca_names: list[str] = []
        self.acme_was_there = False   # the file has an "acme" key (of whatever type)
        self.ca_unreadable = False    # a "ca" key that is not [[ca]] tables, or a nameless one (reported)
        self.ca_bad_names: set[str] = set()  # names reported invalid: a certificate naming one is not told again

    def acme(self, t: Table) -> AcmeConfig | None:  # Parser's: the keys one CA takes
        raise NotImplementedError

    def cas(self, acme_raw: Any, ca_raw: list[Any]) -> tuple[AcmeConfig, ...]:
        """Every CA in file order (empty when none could be read; the problem is reported)."""
        if acme_raw is not None and ca_raw:
            self.problem("ca", "[acme] and [[ca]] tables together; keep one: [acme] is one CA named \"default\", "
                               "so move its keys into a [[ca]] table with name = \"default\"")
            return ()
        if acme_raw is not None:
            one = self.acme(Table(self, "acme", acme_raw))
            return (one,) if one is not None else ()
        if not ca_raw:
            if (acme_raw is None and self.acme_was_there) or self.ca_unreadable:
                return ()  # present but not a table: reported already
            self.problem("acme", "required key is missing (an [acme] table, or [[ca]] tables for several CAs)")
            return ()
        out: list[AcmeConfig] = []
        for i, raw in enumerate(ca_raw):
            t = Table(self, f"ca[{i}]", raw)
            name = t.get("name", str, required=True)
            if name is None:
                self.ca_unreadable = True  # which name it meant is unknown: certificates' names are not judged
            elif not _NAME_RE.fullmatch(name):
                self.problem(t.key("name"), f"{name!r}: expected 1-64 characters of letters, digits, '.', '_', '-'")
                self.ca_bad_names.add(name)
                name = None
            elif name is not None and name in self.ca_names:
                self.problem(t.key("name"), f"duplicate CA name {name!r}; names must be unique")
                name = None
            if name is not None:
                t.where = f"ca[{i}] ({name})"
                self.ca_names.append(name)
            ca = self.acme(t)
            if ca is not None and name is not None:
                out.append(replace(ca, name=name, table=f'[[ca]] "{name}"'))
        return tuple(out) if len(out) == len(ca_raw) else ()

    def ca_refs(self, t: Table) -> tuple[str, ...]:
        """A certificate's ``ca`` list: known names, each once, in order (() = every CA)."""
        raw = t.get("ca", list, None)
        if raw is None:
            return ()
        if not raw:
            self.problem(t.key("ca"), "empty; name the [[ca]] tables to order from, or remove the key (every CA)")
        out: list[str] = []
        known = self.ca_names or ["default"]
        for j, name in enumerate(raw):
            key = t.key(f"ca[{j}]")
            if not isinstance(name, str):
                self.problem(key, f"expected a CA name, got {type_name(name)}")
            elif name not in known and not self.ca_unreadable and name not in self.ca_bad_names:
                self.problem(key, f"unknown CA {name!r}; configured: {', '.join(known)} (the names of the [[ca]] "
                                  "tables; [acme] is \"default\")")
            elif name in out:
                self.problem(key, f"{name!r} is listed twice")
            else:
                out.append(name)
        return tuple(out)
