"""Reading a configuration: which file, the control socket of a file that may be invalid, and
load/parse into :mod:`certd.config.schema`'s types (built by :mod:`certd.config.parse`)."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from certd.config.parse import Parser
from certd.config.schema import DEFAULT_PATH, Config, DaemonConfig
from certd.core.errors import ConfigError


def resolve_path(config_arg: str | None) -> Path:
    """``--config`` beats ``$CERTD_CONFIG`` beats the default."""
    return Path(config_arg or os.environ.get("CERTD_CONFIG") or DEFAULT_PATH)


_DAEMON_TABLE = re.compile(r"^[ \t]*\[[ \t]*daemon[ \t]*\][ \t]*(?:#[^\n]*)?$(.*?)(?=^[ \t]*\[|\Z)", re.M | re.S)


def peek_control_socket(path: Path) -> Path:
    """The control socket named in a config file that may be invalid (so ``certd reload`` can
    still reach the daemon and let it report the problems, and the CLI can ask the daemon
    without validating 10,000 certificates first); the default when it cannot tell.

    Only the ``[daemon]`` table is parsed when it can be cut out of the text (a whole file of
    10,000 certificates takes ~0.6 s to parse); anything unusual falls back to the whole file."""
    try:
        raw = _daemon_table(path.read_text("utf-8")).get("control_socket")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        raw = None
    if not isinstance(raw, str) or not raw:
        return DaemonConfig.control_socket
    p = Path(raw).expanduser()
    return p if p.is_absolute() else path.resolve().parent / p


def _daemon_table(text: str) -> dict[str, Any]:
    m = _DAEMON_TABLE.search(text)
    if m is not None:
        try:
            return tomllib.loads(m.group(1))
        except tomllib.TOMLDecodeError:
            pass  # not cut out cleanly (a value spanning a line that starts with "["): whole file
    table = tomllib.loads(text).get("daemon", {})
    return table if isinstance(table, dict) else {}


def load(path: Path, *, check_runtime: bool = False) -> Config:
    """Read and validate ``path``. ``check_runtime`` also checks what only the daemon needs
    (the control socket's directory). Raises :class:`ConfigError` with every problem."""
    try:
        with open(path, "rb") as f:
            source = file_identity(path, os.fstat(f.fileno()))  # of the bytes read, not of a later edit
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; pass --config PATH or set CERTD_CONFIG") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    config = parse(data, path, check_runtime=check_runtime)
    return dataclasses.replace(config, source=source)


def file_identity(path: Path, st: os.stat_result) -> tuple[Any, ...]:
    """What tells one version of a config file from another without reading it: its path (as
    given, which Config.path keeps, and absolute) and (device, inode, size, mtime, ctime); an
    editor's save (rename or rewrite) changes it."""
    return (str(path), str(path.absolute()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def parse(data: dict[str, Any], path: Path, *, check_runtime: bool = False) -> Config:
    p = Parser(path, check_runtime)
    config = p.config(data)
    if p.problems:
        raise ConfigError(p.problems)
    assert config is not None
    return config
