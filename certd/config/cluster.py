"""``[cluster]``: the settings a node of a fleet needs to reach the shared PostgreSQL database.

What is checked here is what a node can check before connecting: the connection string carries
no password (it would sit in a config file readable by the people who can read configs, and in
``ps``), the password file is private, ``sslmode`` is one libpq knows, ``[keys]`` is set (keys
go into the database sealed only), and the node has a name the database can hold. Whether the
database answers is the store's business (certd/store/pgschema.py).

Mixed into :class:`certd.config.parse.Parser`.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from certd.config.fields import FieldParser
from certd.config.schema import ClusterConfig
from certd.config.values import Table

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_KV_PASSWORD = re.compile(r"(?:^|\s)password\s*=", re.IGNORECASE)


def default_node() -> str:
    """This host's name, cut to what a node name may hold (letters, digits, ``.``, ``_``, ``-``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-.")[:63]
    return name if _NODE_RE.fullmatch(name) else "node"


def has_password(dsn: str) -> bool:
    """Whether a libpq connection string (URI or key=value form) carries a password."""
    if dsn.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(dsn)
        return parts.password is not None or "password" in parse_qs(parts.query)
    return bool(_KV_PASSWORD.search(dsn))


class ClusterSection(FieldParser):
    """Parses ``[cluster]``."""

    def cluster(self, t: Table, *, has_keys: bool) -> ClusterConfig | None:
        database = t.get("database", str, required=True)
        password_file = self.path_value(t, "password_file", must_exist=True)
        sslmode = t.get("sslmode", str)
        sslrootcert = self.path_value(t, "sslrootcert", must_exist=True)
        node = t.get("node", str) or default_node()
        interval = self.duration(t, "reconcile_interval", 30.0)
        t.done()
        if database is not None:
            if not database.strip():
                self.problem(t.key("database"), "empty; expected a libpq URI such as "
                                                "\"postgresql://certd@db.example.test/certd\"")
            elif has_password(database):
                self.problem(t.key("database"), "holds a password; remove it and put the password in "
                                                "password_file (mode 0600) or libpq's ~/.pgpass")
        if password_file is not None:
            self._password_file(t, password_file)
        if sslmode is not None and sslmode not in SSLMODES:
            self.problem(t.key("sslmode"), f"{sslmode!r}: expected one of {', '.join(SSLMODES)}")
        if not _NODE_RE.fullmatch(node):
            self.problem(t.key("node"), f"{node!r}: expected 1-63 letters, digits, '.', '_' or '-', "
                                        "starting with a letter or digit")
        if not has_keys:
            self.problem(t.key("database"), "[cluster] needs [keys]: keys go into the shared database sealed "
                                            "only; add [keys] with the KEK every node holds (see `certd kek init`)")
        if database is None or not database.strip():
            return None
        return ClusterConfig(database, node, password_file, sslmode, sslrootcert, interval)

    def _password_file(self, t: Table, path: Path) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return  # must_exist said so
        if st.st_mode & 0o077:
            self.problem(t.key("password_file"), f"{path} has mode {st.st_mode & 0o777:04o}; it holds the database "
                                                 f"password: chmod 600 {path}")
        elif st.st_size == 0:
            self.problem(t.key("password_file"), f"{path} is empty; put the database password in it")
