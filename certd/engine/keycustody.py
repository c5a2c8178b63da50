"""Use cases of key custody: rotating the KEK, and saying how keys are kept (status, check-config).

The store does the work (:class:`certd.store.filekeys.KeyFiles`); this module decides the
order of the steps, what the audit log records and what the operator is told to do next.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from certd.core.clock import Clock, isoformat
from certd.crypto.custody import Kek, KeyRing


class KeyCustody(Protocol):
    """What a store offers for key custody (FileStore.keys)."""

    @property
    def sealing(self) -> bool: ...
    @property
    def configured(self) -> KeyRing | None: ...
    @property
    def ring(self) -> KeyRing | None: ...
    def rotation(self) -> dict[str, Any] | None: ...
    def begin_rotation(self, kek: Kek, source: str, started: str) -> KeyRing: ...
    def rewrap_all(self) -> int: ...
    def finish_rotation(self, rewrapped: int, finished: str) -> dict[str, Any]: ...
    def census(self) -> dict[str, int]: ...


Emit = Callable[..., None]


def rotate_kek(keys: KeyCustody, new: Kek, source: str, clock: Clock, emit: Emit, initiator: str) -> dict[str, Any]:
    """Re-wrap every stored key's data key under ``new`` (named ``source``: a file or a URI).

    The rotation is recorded before the first key is touched, so every process using the
    store seals under ``new`` and opens keys wrapped under it from then on; each key file is
    replaced atomically with its ciphertext unchanged (no key is ever written in plain text);
    running it again after a crash finishes the job. Returns what was done and what the
    operator does next (point ``kek_file`` at the new KEK)."""
    configured = keys.configured
    old = configured.current.kek_id if configured else None
    emit("kek_rotation_started", "", initiator=initiator, reason=f"re-wrap every stored key under {new.kek_id}",
         detail={"from": old, "to": new.kek_id, "source": source})
    keys.begin_rotation(new, source, isoformat(clock.now()))
    rewrapped = keys.rewrap_all()
    keys.finish_rotation(rewrapped, isoformat(clock.now()))
    left = {k: n for k, n in keys.census().items() if k != new.kek_id}
    emit("kek_rotated", "", initiator=initiator, outcome="success",
         reason=f"{rewrapped} keys re-wrapped under {new.kek_id}", detail={"from": old, "to": new.kek_id,
                                                                           "rewrapped": rewrapped, "left": left})
    return {"from": old, "to": new.kek_id, "source": source, "rewrapped": rewrapped, "left": left,
            "next": "" if old == new.kek_id else _next_step(source)}


def _next_step(source: str) -> str:
    key = "kek" if source.startswith("pkcs11:") else "kek_file"
    return f'set [keys] {key} = "{source}" and keep the old KEK in old_kek_files until no backup needs it'


def custody_lines(keys: KeyCustody) -> list[str]:
    """One line each on how keys are kept at rest, for ``status`` and ``check-config``."""
    ring = keys.ring
    if ring is None:
        return ["keys: stored unencrypted in the state directory (no [keys] section; see docs/KEYS.md)"]
    lines = [f"keys: sealed under KEK {ring.current.kek_id}"]
    record = keys.rotation()
    if record is not None and not record.get("finished"):
        lines.append(f"keys: KEK rotation to {record['kek']} started {record.get('started')} has not finished; run "
                     f"`certd kek rotate --new {record['source']}` again")
    elif record is not None and keys.configured is not None and keys.configured.current.kek_id != record["kek"]:
        lines.append(f"keys: KEK rotation to {record['kek']} finished {record.get('finished')}; point [keys] at "
                     f"{record['source']} and keep the old KEK in old_kek_files until no backup needs it")
    return lines
