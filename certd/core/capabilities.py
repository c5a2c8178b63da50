"""Each hook gets only the Linux capabilities it needs.

certd itself may hold capabilities (the shipped unit grants CAP_KILL, CAP_DAC_READ_SEARCH,
CAP_CHOWN and CAP_FOWNER as ambient capabilities; as root it holds them all). A hook is a
program someone else wrote; it should not inherit them. So every hook command runs through
``setpriv`` (util-linux), which drops what it must not keep before it executes the hook:

- nginx (``nginx -t``, ``nginx -s reload``): CAP_DAC_READ_SEARCH (read every certificate and
  key its config names) and CAP_KILL (signal the root-owned master) — :data:`NGINX`;
- the HAProxy hook runs no program (it speaks to HAProxy's runtime API itself);
- a command hook, and a dns-01 hook: none, unless its ``[[certificate.reload]]`` entry says
  ``capabilities = ["CAP_..."]``.

As a service user (the unit), capabilities reach an executed program only as *ambient*
capabilities, so clearing those is what counts (``--ambient-caps``, a prctl the unit's system
call filter allows). As root, a program gets the whole bounding set on exec, so the bounding
and inheritable sets are cut down too (``--bounding-set``, ``--inh-caps``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

NGINX = ("CAP_DAC_READ_SEARCH", "CAP_KILL")

# The capability names setpriv knows, by number (linux/capability.h); used to validate config.
NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
    "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)

SETPRIV_PATHS = ("/usr/bin/setpriv", "/bin/setpriv", "/usr/sbin/setpriv")


def unknown(names: Sequence[str]) -> list[str]:
    """The names in ``names`` that are not capabilities (for a config problem line)."""
    return [n for n in names if n.upper() not in NAMES]


def setpriv() -> str | None:
    for p in SETPRIV_PATHS:
        if os.access(p, os.X_OK):
            return p
    return shutil.which("setpriv")


def limited(argv: Sequence[str], keep: Sequence[str] = (), *, euid: int | None = None) -> list[str]:
    """``argv`` run through setpriv so that it holds at most the capabilities in ``keep``.
    Raises FileNotFoundError if setpriv is not installed (the hook then fails, saying so)."""
    tool = setpriv()
    if tool is None:
        raise FileNotFoundError("setpriv (util-linux) is needed to run hooks with limited capabilities")
    caps = "-all" + "".join(f",+{c.lower()[4:]}" for c in keep)
    uid = os.geteuid() if euid is None else euid
    args = [tool, f"--ambient-caps={caps}"]
    if uid == 0:
        args += [f"--inh-caps={caps}", f"--bounding-set={caps}"]
    return [*args, "--", *argv]
