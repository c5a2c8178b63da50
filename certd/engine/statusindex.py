"""The status index: the planner's status rows kept on disk between ``certd status`` runs
without a daemon, so 10,000 rows cost one file read and a change token each instead of three
JSON files and a policy decision each (issue 20).

One file in the state directory (``status.index``, 0600), written by whoever refreshed rows
(temp file + rename, no fsync) and never by the store's writers: each entry carries the
store's change token it was gathered under (a readlink and four stats, no reads) and is used
only while that token is unchanged, the row's decision stands (before its renewal time and the
end of any hold) and the configuration file and certd's code are the ones it was built with.
So a write by another process the index has not seen costs that row a re-read, never a stale
row; a torn, foreign (another user's, group/other-accessible) or other-version index is a
miss. Only status reads it: nothing that decides or changes anything (renewal planning in the
daemon reads the store).
"""

from __future__ import annotations

import gc
import marshal
from collections.abc import Hashable
from datetime import datetime
from pathlib import Path
from typing import Any

from certd.config import Config
from certd.config.cache import code_identity, read_private, seal, unseal, write_private

INDEX_NAME = "status.index"
_FORMAT = "certd-status-index-1"

# An entry: (token, valid_until, row_json, shown), valid_until an ISO 8601 text and shown the
# tuple row_state() below takes (datetimes as ISO 8601 text).
Entry = tuple[Any, str, str, tuple[Any, ...]]


class StatusIndex:
    """The index of one state directory for one configuration file and one node."""

    def __init__(self, path: Path, key: tuple[Any, ...]) -> None:
        self.path, self.key = path, key
        self.entries: dict[str, Entry] = self._read()
        self.dirty = False

    @classmethod
    def open(cls, config: Config, node: str) -> StatusIndex | None:
        """The index for ``config`` (read now), or None when it cannot have one (parsed from
        text, not from a file)."""
        if config.source is None:
            return None
        return cls(config.daemon.state_dir / INDEX_NAME, (_FORMAT, code_identity(), config.source, node))

    def _read(self) -> dict[str, Entry]:
        payload = unseal(read_private(self.path))
        if payload is None:
            return {}
        paused = gc.isenabled()
        gc.disable()  # 10,000 entries' tuples would trigger collections that find nothing
        try:
            found = marshal.loads(payload)
        except (EOFError, ValueError, TypeError):
            return {}
        finally:
            if paused:
                gc.enable()
        if not (isinstance(found, tuple) and len(found) == 2 and found[0] == self.key and isinstance(found[1], dict)):
            return {}  # another configuration, certd or node
        return found[1]

    def get(self, name: str, token: Hashable, now: datetime) -> Entry | None:
        """``name``'s entry if it still holds for ``token`` at ``now``, else None."""
        entry = self.entries.get(name)
        if entry is None or not isinstance(entry, tuple) or len(entry) != 4 or entry[0] != token:
            return None
        try:
            if now >= datetime.fromisoformat(entry[1]):
                return None
        except (TypeError, ValueError):
            return None
        return entry

    def put(self, name: str, entry: Entry) -> None:
        if self.entries.get(name) != entry:
            self.entries[name] = entry
            self.dirty = True

    def save(self) -> bool:
        """Write the index if anything changed (no fsync: a lost index is only a miss). False
        when it could not be written; status goes on without it."""
        if not self.dirty:
            return True
        try:
            data = marshal.dumps((self.key, self.entries))
        except ValueError:  # a change token of a type marshal cannot hold: no index for this store
            return False
        self.dirty = False
        return write_private(self.path, seal(data))


def row_state(now: datetime, broken: bool, blocked_until: datetime | None, not_after: datetime | None,
              expiring_at: datetime | None, revoked: bool, failure_kind: str | None, failures: int) -> str:
    """A status row's ``state`` at ``now`` (not_after None: no certificate yet)."""
    if broken:
        return "broken"
    blocked = blocked_until is not None and now < blocked_until
    if not_after is None:
        return str(failure_kind) if blocked else "missing"
    if not_after <= now:
        return "expired"
    if revoked:
        return "revoked"  # still served until an operator acts
    if blocked:
        return str(failure_kind)  # held | rate_limited: waiting for retry_after
    if expiring_at is not None and now >= expiring_at:
        return "expiring"
    return "failing" if failures else "ok"
