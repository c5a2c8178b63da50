"""A certificate's :class:`~certd.engine.attempts.CertState` as the engine reads and writes it.

Every engine write is a **change** (a function that edits the fields it owns), applied to a
fresh read and written back by compare-and-set (:func:`certd.store.port.update_state`), again
from a fresh read when another writer got there first. So writers touching different fields
merge instead of overwriting each other: the planner's ARI cache write (which may run outside
the certificate's lock, in another thread, process or node) cannot erase a failure record or a
hold, and a failure record cannot erase the ARI cache (issue 11: a lost backoff hammers the CA).
A change must be safe to apply more than once (to successive fresh reads): it derives what it
writes from the state it is given (``failures += 1``), not from a copy read earlier.

The in-memory floor (issue 11): a state whose write failed (disk full) is kept here, and reads
return it instead of the older stored one until the store records something later, so a lost
write can only make certd wait longer, never retry sooner. A change made while a floor is kept
is applied on top of the floor.

On disk nothing changes: ``state.json`` holds :meth:`CertState.to_json` as before.
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Callable

from certd.core.errors import StoreError
from certd.engine.attempts import CertState
from certd.store.port import StateStore, update_state

Change = Callable[[CertState], None]

#: Compare-and-set attempts before giving up (Conflict): each lost race means another writer
#: succeeded, so this only runs out under a storm of writers to one certificate's state.
ATTEMPTS = 64

#: What a renewal notes in the state before it knows how it ends (when it tried, what the CA
#: issued this week, that a forced renewal is pending); written with its success or failure.
RENEWAL_NOTES = ("last_attempt", "issued", "forced_retry", "ca_waits")


class StateBook:
    """Reads and compare-and-set writes of the states in ``store``, with the in-memory floor."""

    def __init__(self, store: StateStore, attempts: int = ATTEMPTS) -> None:
        self.store, self.attempts = store, attempts
        self._unsaved: dict[str, CertState] = {}  # states whose write failed (see the module doc)
        self._mutex = threading.Lock()

    def load(self, name: str) -> CertState:
        """The stored state, unless this process holds a later one it could not write."""
        return self._floored(name, CertState.from_json(self.store.read_state(name)[0]))

    def update(self, name: str, change: Change) -> CertState:
        """Apply ``change`` to the current state and write it by compare-and-set (re-read and
        re-applied on a conflict); the state written. StoreError if it cannot be written (then
        the changed state is kept as the floor); :class:`~certd.store.port.Conflict` only after
        :attr:`attempts` lost races."""
        last: list[CertState] = []

        def apply(d: dict[str, Any]) -> None:
            state = self._floored(name, CertState.from_json(d))
            change(state)
            last[:] = [state]
            d.clear()
            d.update(state.to_json())
        try:
            written = update_state(self.store, name, apply, attempts=self.attempts)
        except StoreError:
            if last:
                with self._mutex:
                    self._unsaved[name] = _copy(last[0])
            raise
        with self._mutex:
            self._unsaved.pop(name, None)
        return CertState.from_json(written)

    def replace(self, name: str, state: CertState) -> CertState:
        """Every field of the state becomes ``state``'s (compare-and-set still): for tests and
        tools that set a whole state; the engine's own writes are :meth:`update`."""
        whole = _copy(state)
        return self.update(name, lambda s: s.__dict__.update(_copy(whole).__dict__))

    def _floored(self, name: str, stored: CertState) -> CertState:
        with self._mutex:
            kept = self._unsaved.get(name)
            if kept is None:
                return stored
            if _later(stored, kept):  # the store caught up, or another process wrote since
                self._unsaved.pop(name, None)
                return stored
            return _copy(kept)


def adopt(state: CertState, written: CertState) -> None:
    """Make the caller's ``state`` the merged one that was written (its later decisions and
    messages see what other writers added)."""
    state.__dict__.update(_copy(written).__dict__)


def carry_notes(state: CertState) -> Change:
    """A change writing the renewal's notes (:data:`RENEWAL_NOTES`) as ``state`` has them: the
    renewal holds the certificate's lock, so these fields are its own."""
    notes = {f: getattr(_copy(state), f) for f in RENEWAL_NOTES}
    return lambda s: s.__dict__.update(copy.deepcopy(notes))


def _later(stored: CertState, kept: CertState) -> bool:
    """Whether ``stored`` records something that happened after what ``kept`` knows."""
    return any((getattr(stored, f) or "") > (getattr(kept, f) or "")
               for f in ("last_attempt", "last_success", "last_failure"))


def _copy(state: CertState) -> CertState:
    """A deep copy: a kept or written state never shares a list or dict with a caller's."""
    return CertState.from_json(copy.deepcopy(state.to_json()))
