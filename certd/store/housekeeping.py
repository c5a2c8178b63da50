"""Keep the state directory tidy and private: sweep what killed processes left behind
(temporary files in the state directory, staging directories beside each live_dir), and
tighten a state directory someone left group- or world-accessible.

A process SIGKILLed between creating a temporary file and renaming it leaves
``.journal.json.tmp-*`` / ``.state.json.tmp-*`` / ``.lease.json.tmp-*`` / ``.order.key.tmp-*``
(``certs/NAME/``, and the journal in ``certs/NAME/nodes/NODE/``), ``.audit.head.tmp-*`` (the
state dir) or a staging directory ``.NAME.versions/.NNNN.tmp-*`` that may hold a private key.
Nothing else ever removes the state dir's leftovers, and a staging directory lingered until
that certificate's next stage. :func:`sweep` runs when the daemon is ready and after each
rotation.

Every step works on directory descriptors (``O_NOFOLLOW``, ``dir_fd=``), so a symlink swapped
in for a directory is never followed and a name is never looked up twice. A temporary file or
directory is ``flock()``ed by its writer while it is filled (certd.fs), so one that is
locked is skipped: another process is writing it right now. Regular files are zeroed before
they are unlinked (a staging directory's ``privkey.pem``) unless another hard link shares them.
The removal itself is :func:`certd.fs.remove_stale_temps`, the same one deploy uses (it also
leaves alone a look-alike another user owns).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Collection
from pathlib import Path

from certd.config import CertificateConfig, Config
from certd import fs as fsutil
from certd.core.errors import StoreError, UsageError
from certd.ops.log import event

log = logging.getLogger("certd.housekeeping")

STATE_DIR_TEMPS = (".audit.head.tmp-", ".store.json.tmp-", ".migration.json.tmp-", ".keys.sealed.tmp-",
                   ".kek-rotation.json.tmp-")
CERT_DIR_TEMPS = (".journal.json.tmp-", ".state.json.tmp-", ".lease.json.tmp-", ".order.json.tmp-",
                  ".order.key.tmp-", ".order.sealed.tmp-")
NODE_DIR_TEMPS = (".journal.json.tmp-", ".applied.tmp-")  # certs/NAME/nodes/NODE/ (store format 2)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def sweep(config: Config, names: Collection[str] | None = None, *, stop: threading.Event | None = None) -> list[str]:
    """Remove stale temporaries of every kind (of the certificates ``names`` only, after their
    rotation); return their paths (also logged, one event each). Ends early once ``stop`` is
    set: the daemon's start-up sweep of 100,000 certificates takes minutes on a busy machine,
    and a SIGTERM waited for it (what it left is swept at the next start)."""
    removed: list[str] = []
    state_dir = config.daemon.state_dir
    removed += sweep_dir(state_dir, STATE_DIR_TEMPS)
    for cert in _configured(config, names):  # first: staging directories beside a live_dir may hold keys
        if stop is not None and stop.is_set():
            break
        live = cert.deploy.live_dir
        if live is not None:
            removed += sweep_dir(live.parent / f".{live.name}.versions", (".",))
    for name in (_subdirs(state_dir / "certs") if names is None else names):
        if stop is not None and stop.is_set():
            break
        removed += sweep_dir(state_dir / "certs" / name, CERT_DIR_TEMPS)
        for node in _subdirs(state_dir / "certs" / name / "nodes"):
            removed += sweep_dir(state_dir / "certs" / name / "nodes" / node, NODE_DIR_TEMPS)
    for path in removed:
        event(log, "stale_temp_removed", path=path)
    return removed


def _configured(config: Config, names: Collection[str] | None) -> list[CertificateConfig]:
    """The configured certificates among ``names`` (all when None), looked up by name: the sweep
    after each rotation or ARI poll must not walk every table (0.7 ms a poll at 10,000
    certificates, 7 ms at 100,000: the one per-poll cost found to grow with their number)."""
    if names is None:
        return list(config.certificates)
    found = []
    for name in names:
        try:
            found.append(config.certificate(name))
        except KeyError:  # removed from the configuration meanwhile: its state dir is still swept
            continue
    return found


def sweep_dir(directory: Path, prefixes: tuple[str, ...]) -> list[str]:
    """Remove unlocked entries of ``directory`` named ``<prefix>...tmp-...``; return their paths.
    A missing directory (or a symlink where it should be) has nothing to sweep; a directory or
    leftover that cannot be removed is logged and the sweep goes on."""
    try:
        dfd = os.open(directory, _DIR_FLAGS)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            event(log, "sweep_failed", logging.WARNING, path=directory, error=e.strerror)
        return []
    try:
        return [str(directory / n) for n in fsutil.remove_stale_temps(directory, prefixes, dirfd=dfd)]
    except StoreError as e:
        event(log, "sweep_failed", logging.WARNING, path=directory, error=str(e))
        return []
    finally:
        os.close(dfd)


def _subdirs(directory: Path) -> list[str]:
    try:
        dfd = os.open(directory, _DIR_FLAGS)
    except OSError:
        return []
    found = []
    try:
        for n in os.listdir(dfd):
            try:
                if stat.S_ISDIR(os.stat(n, dir_fd=dfd, follow_symlinks=False).st_mode):
                    found.append(n)
            except OSError:
                continue  # gone meanwhile
    except OSError:
        pass
    finally:
        os.close(dfd)
    return found


STATE_DIR_MODE = 0o700


def secure_state_dir(state_dir: Path) -> int | None:
    """Make an existing ``state_dir`` with a looser mode than 0700 (0755 from a packaging
    default, 1777 on a fresh tmpfs) 0700, by descriptor. Returns the mode it had when it was
    tightened, None when nothing was needed (absent: it is created 0700; a symlink is not
    followed). UsageError (exit 2) when certd may not change it: running on a directory others
    can read keys from is not an option."""
    try:
        fd = os.open(state_dir, _DIR_FLAGS)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP):
            return None
        raise UsageError(f"state_dir {state_dir}: cannot open it: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        old = stat.S_IMODE(st.st_mode)
        if old & ~STATE_DIR_MODE == 0:
            return None
        try:
            os.fchmod(fd, STATE_DIR_MODE)
        except OSError as e:
            raise UsageError(f"state_dir {state_dir} has mode {old:04o} (others may read private keys) and certd "
                             f"cannot make it 0700 ({e.strerror}, owner uid {st.st_uid}); run "
                             f"chmod 700 {state_dir} as its owner or root") from None
    finally:
        os.close(fd)
    event(log, "state_dir_tightened", logging.WARNING, path=state_dir, old_mode=f"{old:04o}",
          mode=f"{STATE_DIR_MODE:04o}")
    return old
