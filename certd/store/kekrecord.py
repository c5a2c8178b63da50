"""``kek-rotation.json``: every KEK rotation a state directory went through, newest last.

    {"targets": [{"kek": "<id>", "source": "/etc/certd/kek-2" | "pkcs11:...", "from": "<id>",
                  "started": "...", "finished": "..." | null, "rewrapped": n}, ...]}

The record is written before the first key is re-wrapped and never deleted: every process using
the store extends its configured ring with it (:func:`extend`) — it opens keys wrapped under any
KEK a rotation moved them to, and seals under the newest. So a daemon still running the old
configuration, a second rotation before the configuration was updated, or an in-process command
run meanwhile never leaves a key sealed under a KEK nobody will load, nor deletes what the
others need. A target whose KEK is gone (destroyed after a later rotation finished) is skipped,
except the newest, which must load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from certd.core.errors import StoreError
from certd.crypto.custody import CustodyError, Kek, KeyRing
from certd import fs as fsutil
from certd.store import fileio

log = logging.getLogger("certd.store")

ROTATION = "kek-rotation.json"


def load(root: Path) -> list[dict[str, Any]]:
    """The rotation targets, oldest first (empty: no rotation ever)."""
    rec = fileio.load_obj(f"{root}/{ROTATION}", "KEK rotation record")
    if rec is None:
        return []
    targets = rec.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, dict) and {"kek", "source"} <= t.keys()
                                                  for t in targets):
        raise StoreError(f"{root / ROTATION}: corrupt KEK rotation record; restore it from a backup (it names the "
                         f"KEKs stored keys may be wrapped under)")
    return targets


def _save(root: Path, targets: list[dict[str, Any]]) -> None:
    fsutil.atomic_write(root / ROTATION, fileio.json_bytes({"targets": targets}), mode=0o600)


def begin(root: Path, kek: Kek, source: str, from_id: str, started: str) -> None:
    targets = load(root)
    targets.append({"kek": kek.kek_id, "source": source, "from": from_id, "started": started, "finished": None})
    _save(root, targets)


def finish(root: Path, rewrapped: int, finished: str) -> dict[str, Any]:
    targets = load(root)
    if not targets:
        raise StoreError(f"{root / ROTATION}: the rotation record vanished during the rotation; run it again")
    targets[-1].update(finished=finished, rewrapped=rewrapped)
    _save(root, targets)
    return targets[-1]


def extend(base: KeyRing, targets: list[dict[str, Any]], loader: Callable[[str], Kek], where: Path) -> KeyRing:
    """``base`` also opening every rotation target's KEK and sealing under the newest."""
    if not targets:
        return base
    known = {base.current.kek_id: base.current}
    latest: Kek | None = None
    for i, target in enumerate(targets):
        newest = i == len(targets) - 1
        if target["kek"] in base.kek_ids:
            kek = base.kek(target["kek"])
        else:
            try:
                kek = loader(str(target["source"]))
            except CustodyError as e:
                if newest:
                    raise CustodyError(f"{where}: the last KEK rotation moved keys to {target['kek']} at "
                                       f"{target['source']}, which cannot be loaded: {e}") from None
                log.debug("rotation target %s no longer loads (%s); skipped", target["kek"], e)
                continue
            if kek.kek_id != target["kek"]:
                raise CustodyError(f"{where}: names KEK {target['kek']} at {target['source']}, but that now holds "
                                   f"{kek.kek_id}; put the rotation's KEK back")
        known[kek.kek_id] = kek
        if newest:
            latest = kek
    assert latest is not None
    others = [k for k in (base.kek(i) for i in base.kek_ids) if k.kek_id not in known] + list(known.values())
    return KeyRing(latest, [k for k in others if k.kek_id != latest.kek_id])
