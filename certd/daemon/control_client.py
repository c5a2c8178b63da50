"""The CLI's side of the daemon's control API (:mod:`certd.daemon.control`): a client over the
Unix socket, and the one-row-per-line JSON document both sides print.

Kept apart from the server so that a CLI command that only asks whether a daemon answers
(``certd status`` without one) imports neither ``http.server`` nor ``httpx``: the latter is
imported when a request is actually sent (~0.15 s of every such command otherwise).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from certd.core.errors import OperationFailed, UsageError

if TYPE_CHECKING:
    import httpx


def rows_document(key: str, rows: Iterable[dict[str, Any] | str]) -> str:
    """``{key: [rows]}`` with one row per line: readable, greppable, and fast at 10,000 rows
    (json's indent= switches to its pure-Python encoder: 0.4 s for 10,000 status rows). A row
    given as a string is JSON text already. The text :func:`rows_document_chunks` sends in pieces."""
    return b"".join(rows_document_chunks(key, rows)).decode()


def rows_document_chunks(key: str, rows: Iterable[dict[str, Any] | str], size: int = 1000) -> Iterator[bytes]:
    """``rows_document(key, rows)`` encoded, in pieces of ``size`` rows made as ``rows`` yields
    them: the daemon sends each as it is made (100,000 status rows are 70 MB: made, joined and
    encoded at once they took 280 MB for a moment, and the first listing's page faults 0.6 s)."""
    yield f'{{"{key}": [\n'.encode()
    batch: list[str] = []
    sep = ""
    for row in rows:
        batch.append(row if isinstance(row, str) else json.dumps(row))
        if len(batch) == size:
            yield (sep + ",\n".join(batch)).encode()
            batch, sep = [], ",\n"
    if batch:
        yield (sep + ",\n".join(batch)).encode()
    yield DOCUMENT_END


#: How rows_document ends: a streamed answer without it was cut short.
DOCUMENT_END = b"\n]}\n"


class DaemonNotRunning(Exception):
    """No daemon listens on the socket: the CLI works in-process instead."""


class ControlClient:
    def __init__(self, path: Path, timeout: float = 600.0) -> None:
        self.path = path
        self.timeout = timeout

    def probe(self) -> None:
        """Raise DaemonNotRunning if nobody listens, UsageError if we may not connect."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2.0)
        try:
            s.connect(str(self.path))
        except PermissionError:
            raise self._refused() from None
        except OSError as e:  # nobody listens (FileNotFoundError, ConnectionRefusedError, ...)
            raise DaemonNotRunning() from e
        finally:
            s.close()

    def _refused(self) -> UsageError:
        return UsageError(f"permission denied on the control socket {self.path}: run as root or as a member of "
                          f"the daemon's control_group")

    def _client(self) -> httpx.Client:
        # verify=False: plain HTTP over a Unix socket; the default would load the system's CA
        # store into an SSL context that is never used (~70 ms of every CLI command).
        import httpx  # here: see the module's docstring
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.path), verify=False), base_url="http://certd",
                            timeout=httpx.Timeout(self.timeout, connect=5.0))

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        with self._client() as c:
            r = c.get(path, params=params)
            return _result(r.status_code, r.json())

    def get_text(self, path: str, params: dict[str, Any] | None = None) -> str:
        """A route's answer as the text it sent (a Preformatted document, printed as it is).
        Over the standard library's http.client, not httpx: the status listing of 100,000
        certificates is 70 MB, which httpx took 0.1 s longer to read, besides its import."""
        import http.client
        from urllib.parse import urlencode
        from certd.daemon.unixhttp import UnixConnection  # here: see the module's docstring
        conn = UnixConnection(self.path, self.timeout)
        try:
            try:
                conn.connect()
            except PermissionError:
                raise self._refused() from None
            except OSError as e:  # it answered probe() a moment ago
                raise OperationFailed(f"the daemon on {self.path} stopped answering ({e}); run the command again "
                                      f"(without a daemon it works in-process)") from None
            conn.request("GET", f"{path}?{urlencode(params, doseq=True)}" if params else path)
            r = conn.getresponse()
            body = r.read()
        except (OSError, http.client.HTTPException) as e:
            raise OperationFailed(f"the daemon on {self.path} did not answer in full ({type(e).__name__}: {e}); "
                                  f"see its log") from None
        finally:
            conn.close()
        if r.status != 200:
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            _result(r.status, payload)
        if r.getheader("Content-Length") is None and not body.endswith(DOCUMENT_END):  # streamed, then cut
            raise OperationFailed(f"the daemon on {self.path} did not answer in full (its answer stops after "
                                  f"{len(body)} bytes); see its log")
        return body.decode()

    def call(self, path: str, body: dict[str, Any]) -> Any:
        with self._client() as c:
            r = c.post(path, json=body)
            return _result(r.status_code, r.json())

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._client() as c, c.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                r.read()
                _result(r.status_code, r.json())
            for line in r.iter_lines():
                if line.strip():
                    yield json.loads(line)


def _result(status: int, payload: Any) -> Any:
    if status == 200:
        return payload
    message = payload.get("error", f"HTTP {status}") if isinstance(payload, dict) else f"HTTP {status}"
    if status in (400, 403):
        raise UsageError(message)
    raise OperationFailed(message)
