"""The field readers every section shares: paths, listen addresses, argv, programs, durations,
secrets and groups, each adding one ``<file>: <key>: <problem>`` line instead of raising. Base
class of :class:`certd.config.parse.Parser`."""

from __future__ import annotations

import grp
import os
import shutil
import stat
from pathlib import Path

from certd.config.schema import (DEFAULT_EXEC_PATH, Listen)
from certd.config.values import Table, parse_duration, parse_listen
from certd.core.errors import one_line



class FieldParser:
    """Collects problems; reads one field of a :class:`~certd.config.values.Table` at a time."""

    def __init__(self, path: Path, check_runtime: bool) -> None:
        self.path = path
        self.base = path.resolve().parent
        self.check_runtime = check_runtime
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        # Keys and values come from the file: a newline or escape in one must not break the
        # one-line-per-problem rule (or a terminal), so control characters are shown escaped.
        self.problems.append(one_line(f"{self.path}: {key}: {message}"))

    def inline_secret(self, t: Table, key: str, file_key: str) -> None:
        """A secret written into the config is only as private as the config file: refuse it
        if group or others may read the file (they would learn the CA's or the webhook's
        credential), and say both fixes."""
        try:
            mode = stat.S_IMODE(os.stat(self.path).st_mode)
        except OSError:
            return  # parsed from text with no file behind it
        if mode & 0o077:
            self.problem(t.key(key), f"a secret inline in a config file readable by group or others (mode "
                                     f"{mode:04o}); chmod 600 {self.path}, or move it to {file_key} (mode 0600)")

    def secret_file(self, t: Table, key: str, path: Path) -> str | None:
        """The secret held in ``path`` (stripped), which others must not be able to read."""
        try:
            st = os.stat(path)
            if st.st_mode & 0o007:
                self.problem(t.key(key), f"{path} is accessible to other users; it holds a secret (chmod o-rwx)")
                return None
            with open(path, encoding="utf-8") as f:
                text = f.read(64 * 1024).strip()
        except (OSError, UnicodeDecodeError) as e:
            if path.exists():
                self.problem(t.key(key), f"cannot read {path}: {getattr(e, 'strerror', None) or e}")
            return None  # else must_exist reported it
        if not text:
            self.problem(t.key(key), f"{path} is empty; put the key the CA handed out in it")
            return None
        return text

    def path_value(self, t: Table, name: str, must_exist: bool = False) -> Path | None:
        raw = t.get(name, str)
        if raw is None:
            return None
        if not raw:
            self.problem(t.key(name), "empty path")
            return None
        p = Path(raw).expanduser()
        if not p.is_absolute():
            p = self.base / p
        if must_exist:
            try:
                if not p.exists():
                    self.problem(t.key(name), f"{p} does not exist")
            except OSError as e:
                self.problem(t.key(name), f"cannot access {p}: {e.strerror}")
        return p

    def listen(self, t: Table, name: str) -> Listen | None:
        raw = t.get(name, str)
        if raw is None:
            return None
        listen = parse_listen(raw)
        if isinstance(listen, str):
            self.problem(t.key(name), listen)
            return None
        return listen

    def argv(self, t: Table, name: str) -> tuple[str, ...]:
        raw = t.get(name, list, [])
        if not raw:
            if t.data.get(name) == []:
                self.problem(t.key(name), "empty command; expected [\"/absolute/path\", \"arg\", ...]")
            return ()
        if not all(isinstance(a, str) for a in raw):
            self.problem(t.key(name), "every element of a command must be a string")
            return ()
        exe = Path(raw[0])
        if not exe.is_absolute():
            self.problem(t.key(name), f"{raw[0]!r} is not an absolute path; commands run without a shell or $PATH lookup")
            return ()
        return tuple(raw) if self.program(t.key(name), exe) else ()

    def program(self, key: str, exe: Path) -> bool:
        """Check a program certd will run: an executable file that nobody but its owners can
        change or replace (neither it nor a directory on its way, symlinks followed, is
        writable by everyone unless sticky, as /tmp is). Reports and returns False otherwise."""
        try:
            st = exe.stat()
        except FileNotFoundError:
            self.problem(key, f"{exe} does not exist")
            return False
        except OSError as e:
            self.problem(key, f"cannot access {exe}: {e.strerror}")
            return False
        if not stat.S_ISREG(st.st_mode) or not os.access(exe, os.X_OK):
            self.problem(key, f"{exe} is not an executable file")
            return False
        if st.st_mode & stat.S_IWOTH:
            self.problem(key, f"{exe} is world-writable; anyone could change what certd runs (chmod o-w)")
            return False
        for directory in dict.fromkeys([*exe.parents, *Path(os.path.realpath(exe)).parents]):
            try:
                mode = directory.stat().st_mode
            except OSError:
                continue
            if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
                self.problem(key, f"{exe} is in {directory}, which is world-writable: anyone could replace "
                                  f"what certd runs (chmod o-w {directory}, or move the program)")
                return False
        return True

    def nginx_binary(self, t: Table) -> str:
        """The nginx hook's ``binary``: an absolute path, or a bare name found on $PATH now
        (the hook runs it with certd's PATH), checked like every program certd runs."""
        raw = t.get("binary", str, "nginx")
        if not raw:
            self.problem(t.key("binary"), "empty; name the nginx executable, e.g. \"/usr/sbin/nginx\"")
            return raw
        if "/" not in raw:
            found = shutil.which(raw, path=os.environ.get("PATH") or DEFAULT_EXEC_PATH)
            if found is None:
                self.problem(t.key("binary"), f"{raw!r} is not found on $PATH; set binary to the absolute path of nginx")
            else:
                self.program(t.key("binary"), Path(found))
            return raw
        if not Path(raw).is_absolute():
            self.problem(t.key("binary"), f"{raw!r} is not an absolute path; name the program as \"/usr/sbin/nginx\"")
            return raw
        self.program(t.key("binary"), Path(raw))
        return raw

    def duration(self, t: Table, name: str, default: float) -> float:
        raw = t.get(name, (str, int), None)
        if raw is None:
            return default
        seconds = float(raw) if isinstance(raw, int) else parse_duration(raw)
        if seconds is None or seconds <= 0:
            self.problem(t.key(name), f"{raw!r}: expected a positive duration such as \"30s\", \"2m\"")
            return default
        return seconds

    def check_group(self, key: str, group: str) -> None:
        try:
            grp.getgrnam(group)
        except KeyError:
            self.problem(key, f"no such group {group!r}")
