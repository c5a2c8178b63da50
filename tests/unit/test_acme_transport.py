"""AcmeTransport on loopback: the directory probe the daemon uses while the CA was unreachable,
and the Issuer handing it through (no CA: a tiny local HTTP server)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from certd.acme.issuer import connect
from certd.acme.transport import AcmeTransport
from certd.config import AcmeConfig
from certd.core.clock import FakeClock


class _Directory(BaseHTTPRequestHandler):
    """200 for /dir, 503 for anything else; remembers the User-Agent it was sent."""

    agents: list[str] = []

    def do_GET(self) -> None:
        self.agents.append(self.headers.get("User-Agent", ""))
        body = b'{"newNonce": "x"}' if self.path == "/dir" else b"busy"
        self.send_response(200 if self.path == "/dir" else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.fixture
def ca() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Directory)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_probe_is_true_only_for_a_directory_answering_200(ca: str) -> None:
    """A 200 from the directory means the CA is back; a 503 or a refused connection does not."""
    clock = FakeClock()
    assert AcmeTransport(f"{ca}/dir", clock).probe()
    assert _Directory.agents[-1].startswith("certd/")
    assert not AcmeTransport(f"{ca}/busy", clock).probe()
    assert not AcmeTransport(f"http://127.0.0.1:{_closed_port()}/dir", clock).probe()


def test_the_issuer_probes_through_its_transport(ca: str) -> None:
    """Issuer.reachable() is the transport's probe of [acme] directory (what the daemon asks)."""
    issuer = connect(AcmeConfig(directory=f"{ca}/dir"), accounts=None, clock=FakeClock())  # type: ignore[arg-type]
    assert issuer.reachable()
    down = connect(AcmeConfig(directory=f"http://127.0.0.1:{_closed_port()}/dir"), accounts=None,  # type: ignore[arg-type]
                   clock=FakeClock())
    assert not down.reachable()
