"""Where a CLI command runs: :class:`Remote` asks the running daemon over its control socket
(one process owns the schedule, and the daemon records the caller's uid from SO_PEERCRED);
:class:`Local` works in-process, taking the same per-certificate locks the daemon takes.
Both answer with the same plain dicts, so :mod:`certd.cli` prints them alike."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from certd import config as config_mod
from certd.config import Config
from certd.core.errors import OperationFailed


class Local:
    """Work in-process, taking the same per-certificate locks the daemon takes."""

    def __init__(self, cfg: Config) -> None:
        from certd.daemon.wiring import build_manager
        self.mgr = build_manager(cfg)

    def close(self) -> None:
        self.mgr.close()

    def renew(self, names: list[str], all_: bool, force: bool, reason: str, wait: bool,
              progress: Any, ignore_duplicate_limit: bool = False) -> list[dict[str, Any]]:
        from certd.engine.manager import whoami
        from certd.store import housekeeping
        certs = self.mgr.select([] if all_ else names)
        outcomes = [outcome_dict(o) for o in self.mgr.renew(certs, force=force, reason=reason, initiator=whoami(),
                                                        progress=progress,
                                                        ignore_duplicate_limit=ignore_duplicate_limit)]
        housekeeping.sweep(self.mgr.config, [c.name for c in certs])  # what killed runs left
        self.mgr.destroy_retired(certs)  # keys retired for longer than destroy_after
        return outcomes

    def status(self, names: list[str]) -> list[dict[str, Any]]:
        certs = self.mgr.select(names)
        with self._status_index():
            return [self.mgr.status(c) for c in certs]

    def status_json(self, names: list[str]) -> str:
        from certd.daemon.control_client import rows_document
        certs = self.mgr.select(names)
        with self._status_index():
            return rows_document("certificates", [self.mgr.status_json(c) for c in certs])

    @contextmanager
    def _status_index(self) -> Iterator[None]:
        """Rows from the state directory's status index while it holds (see
        certd.engine.statusindex), and the index refreshed after: a FileStore's, and only as
        the state directory's owner (root would leave a file the daemon's user finds foreign)."""
        from certd.daemon.wiring import owns_state_dir
        from certd.engine.statusindex import StatusIndex
        from certd.store.files import FileStore
        store, planner = self.mgr.store, self.mgr.planner
        index = StatusIndex.open(self.mgr.config, store.node) \
            if isinstance(store, FileStore) and owns_state_dir(store) else None
        planner.index = index
        try:
            yield
        finally:
            planner.index = None
        if index is not None:
            index.save()

    def verify(self, names: list[str]) -> list[dict[str, Any]]:
        return [outcome_dict(self.mgr.verify_now(c)) for c in self.mgr.select(names)]

    def drift(self, names: list[str]) -> dict[str, Any]:
        from certd.verify import drift
        self.mgr.select(names)  # unknown names are a usage error
        return drift.to_json(drift.check_all(self.mgr.config, self.mgr.store, names or None))

    def rollback(self, name: str, to_version: int | None, reason: str, progress: Any) -> dict[str, Any]:
        from certd.engine.manager import whoami
        cert = self.mgr.select([name])[0]
        return outcome_dict(self.mgr.rollback(cert, to_version=to_version, reason=reason, initiator=whoami(),
                                          progress=progress))


    def custody(self) -> list[str]:
        from certd.engine.keycustody import custody_lines
        keys = getattr(self.mgr.store, "keys", None)
        return custody_lines(keys) if keys is not None else []

    def revoke(self, name: str, reason: str, progress: Any) -> dict[str, Any]:
        from certd.engine.manager import whoami
        cert = self.mgr.select([name])[0]
        return outcome_dict(self.mgr.revoke(cert, reason, initiator=whoami(), progress=progress))


class Remote:
    """Ask the running daemon over its control socket (it records our uid from SO_PEERCRED)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def close(self) -> None:
        pass

    def _stream(self, path: str, body: dict[str, Any], progress: Any) -> list[dict[str, Any]]:
        outcomes: list[dict[str, Any]] = []
        for ev in self.client.stream(path, body):
            if ev.get("event") == "progress" and progress is not None:
                progress(ev["name"], ev["message"])
            elif ev.get("event") == "result":
                outcomes = ev["outcomes"]
        return outcomes

    def renew(self, names: list[str], all_: bool, force: bool, reason: str, wait: bool,
              progress: Any, ignore_duplicate_limit: bool = False) -> list[dict[str, Any]]:
        body = {"names": names, "all": all_, "force": force, "reason": reason, "wait": wait}
        if ignore_duplicate_limit:
            body["ignore_duplicate_limit"] = True
        if not wait:
            accepted = self.client.call("/v1/renew", body)["accepted"]
            return [{"name": n, "ok": True, "result": "accepted",
                     "message": "accepted by the daemon (follow with --wait, or certd status)"} for n in accepted]
        return self._stream("/v1/renew", body, progress)

    def status(self, names: list[str]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.status_json(names))["certificates"]  # the daemon's text: less
        return rows  # work for it than encoding the rows afresh for this request

    def status_json(self, names: list[str]) -> str:
        """The daemon's own document, printed as it is (decoding and encoding 10,000 rows again
        here cost a quarter of a second)."""
        return self.client.get_text("/v1/status", params={"format": "lines", **({"name": names} if names else {})})

    def verify(self, names: list[str]) -> list[dict[str, Any]]:
        return self.client.call("/v1/verify", {"names": names})["outcomes"]

    def custody(self) -> list[str]:
        lines: list[str] = self.client.get("/v1/keys")["lines"]
        return lines

    def drift(self, names: list[str]) -> dict[str, Any]:
        return self.client.get("/v1/drift", params={"name": names} if names else None)

    def rollback(self, name: str, to_version: int | None, reason: str, progress: Any) -> dict[str, Any]:
        outcomes = self._stream("/v1/rollback", {"name": name, "to_version": to_version, "reason": reason}, progress)
        if not outcomes:
            raise OperationFailed("the daemon ended the rollback without a result; see certd status")
        return outcomes[0]

    def revoke(self, name: str, reason: str, progress: Any) -> dict[str, Any]:
        outcomes = self._stream("/v1/revoke", {"name": name, "reason": reason}, progress)
        if not outcomes:
            raise OperationFailed("the daemon ended the revocation without a result; see certd history")
        return outcomes[0]


def daemon_client(config_arg: str | None) -> Any:
    """A client of the running daemon, or None when none runs."""
    from certd.daemon.control_client import ControlClient, DaemonNotRunning
    path: Path = config_mod.resolve_path(config_arg)
    if path.is_file():  # else load_config says what is wrong with the path
        # The daemon validates names and runs on the config it loaded; the file is not parsed
        # here (at 10,000 certificates that alone takes a second), so a broken edit does not
        # keep status or a renewal from working while the daemon runs its last good config.
        client = ControlClient(config_mod.peek_control_socket(path))
        try:
            client.probe()
            return client
        except DaemonNotRunning:
            pass
    return None


def outcome_dict(o: Any) -> dict[str, Any]:
    return {"name": o.name, "result": o.result, "message": o.message, "ok": o.ok, "version": o.version,
            "serial": o.serial}
