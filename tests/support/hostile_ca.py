"""A CA that answers badly: a TLS-terminating proxy in front of a real Pebble that rewrites the
certificate download.

    ca = HostileCA(pebble, workdir).start()     # https://127.0.0.1:<ca.port>/dir
    ca.mode = "expired"                         # the next certificate download is replaced
    ...
    ca.stop()

Everything else (directory, accounts, orders, real challenge validation, finalize) is Pebble's
own answer: the proxy passes the client's ``Host`` header on, and Pebble builds every URL it
hands out, and checks every JWS ``url``, from that header, so the client keeps talking to the
proxy. Its TLS certificate is Pebble's listener certificate, so clients trust it with the
same ``ca_bundle``.

The proxy remembers the public key and names of the last CSR it saw (the finalize request's
JWS payload), so it can forge certificates that are right in every way but one. Modes:

``None``            pass through
``other_key``       a leaf for another key (right names, a chain that links)
``other_names``     our key, other names
``expired``         our key, right names, expired yesterday
``not_yet_valid``   our key, right names, valid from next week
``garbage_pem``     a PEM block whose base64 is not a certificate
``not_pem``         an HTML error page with status 200
``empty``           an empty body
``truncated``       Pebble's chain cut off in the middle of the intermediate
``unlinked_chain``  our key, right names, signed by a throwaway CA, with Pebble's real
                    intermediate as the chain (it did not sign the leaf)
``untrusted``       our key, right names, a chain that links to a throwaway root: passes every
                    check before storing; only the handshake check against the real trust
                    anchors can catch it
``oversized``       50 MB of PEM-looking text, streamed without Content-Length
``oversized_declared``  the same, announced with Content-Length

CA rules (each may be set at any time; they apply to the next request):

``hide_ari = True``          the directory has no ``renewalInfo`` (a CA without ARI: Pebble 2.10's
                             ARI window spans a test certificate's whole lifetime, which would
                             move a renewal the test wants "due now" to a random point)
``rate_limited = 30``        newOrder is answered 429 ``rateLimited`` with ``Retry-After: 30``
                             (``rate_limited_name``: only orders naming it; ``rate_limited_count``:
                             only that many times)
``refuse_replaces = True``   a newOrder carrying ``replaces`` is answered 403 ``unauthorized``
``new_orders``               (monotonic time, JWS payload) of each newOrder request (answered or not)
``orders_created``           monotonic times of the newOrders Pebble accepted (201): one per
                             attempt even when a refused ``replaces`` made the client ask twice
``finalized``                monotonic times of the finalize requests Pebble accepted (200): one
                             per certificate the CA issued
``hold(prefix)``             from now on a request whose path starts with ``prefix`` waits here
                             (``held`` counts them) until ``release()``: a test acts while the
                             client is at that step (``hold_finalize()``: between its lease proof
                             and the CA's answer to finalize)
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.server_fixtures import TestCA

MODES = ("other_key", "other_names", "expired", "not_yet_valid", "garbage_pem", "not_pem", "empty",
         "truncated", "unlinked_chain", "untrusted", "oversized", "oversized_declared")
OVERSIZED_BYTES = 50 * 1024 * 1024
CERT_PATH = "/certZ/"          # where Pebble (2.6, 2.10) serves issued certificates
FINALIZE_PATH = "/finalize-order/"
NEW_ORDER_PATH = "/order-plz"


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _payload(body: bytes) -> bytes:
    """The decoded payload of a flattened JWS request body (b"" if it is not one)."""
    try:
        return _b64url_decode(json.loads(body)["payload"])
    except (ValueError, KeyError, TypeError):
        return b""


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class HostileCA:
    """The proxy; ``mode`` may be changed at any time and applies to the next download."""

    def __init__(self, pebble: Any, workdir: Path) -> None:
        self.pebble = pebble
        self.mode: str | None = None
        self.forged = 0                       # certificate downloads replaced so far
        self.oversized_sent = 0               # bytes of the last oversized body written
        self.last_csr: x509.CertificateSigningRequest | None = None
        self.hide_ari = False
        self.rate_limited: int | None = None   # seconds of Retry-After on every newOrder
        self.refuse_replaces = False
        self.rate_limited_name: str | None = None
        self.rate_limited_count: int | None = None
        self.new_orders: list[tuple[float, bytes]] = []
        self.orders_created: list[float] = []
        self.finalized: list[float] = []
        self.held = 0                         # requests that reached the hold so far
        self._held_prefix = ""
        self._gate = threading.Event()
        self._gate.set()
        self.fake_ca = TestCA(Path(workdir) / "hostile-ca", "hostile")
        self._upstream_ctx = ssl.create_default_context(cafile=str(pebble.ca_bundle))
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(pebble.certs_dir / "cert.pem", pebble.certs_dir / "key.pem")
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.socket = server_ctx.wrap_socket(self._server.socket, server_side=True)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"hostile-ca-{self.port}", daemon=True)

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> HostileCA:
        self._thread.start()
        return self

    def hold(self, prefix: str) -> None:
        """Keep every request whose path starts with ``prefix`` from Pebble until :meth:`release`."""
        self._held_prefix = prefix
        self._gate.clear()

    def hold_finalize(self) -> None:
        self.hold(FINALIZE_PATH)

    def release(self) -> None:
        self._gate.set()

    def stop(self) -> None:
        self._gate.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- forging --------------------------------------------------------------------------

    def forge(self, upstream_body: bytes) -> bytes:
        """The body to send instead of Pebble's ``upstream_body`` (a real full chain)."""
        mode = self.mode
        if mode == "garbage_pem":
            return b"-----BEGIN CERTIFICATE-----\nTm90IGEgY2VydGlmaWNhdGUsIGp1c3QgdGV4dA==\n-----END CERTIFICATE-----\n"
        if mode == "not_pem":
            return b"<html><body><h1>502 Bad Gateway</h1></body></html>\n"
        if mode == "empty":
            return b""
        if mode == "truncated":
            return upstream_body[: len(upstream_body) * 3 // 4]
        csr = self.last_csr
        assert csr is not None, "no CSR seen before the certificate download"
        names = [n for n in csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                 .value.get_values_for_type(x509.DNSName)]
        now = dt.datetime.now(dt.timezone.utc)
        key = csr.public_key()
        start, end = now - dt.timedelta(minutes=1), now + dt.timedelta(days=1)
        if mode == "other_key":
            key = ec.generate_private_key(ec.SECP256R1()).public_key()
        elif mode == "other_names":
            names = ["evil.example.test"]
        elif mode == "expired":
            start, end = now - dt.timedelta(days=2), now - dt.timedelta(days=1)
        elif mode == "not_yet_valid":
            start, end = now + dt.timedelta(days=7), now + dt.timedelta(days=8)
        elif mode not in ("unlinked_chain", "untrusted"):
            raise ValueError(f"unknown mode {mode!r}")
        leaf = self._leaf(key, names, start, end)
        if mode == "unlinked_chain":
            pebble_chain = upstream_body.split(b"-----END CERTIFICATE-----", 1)[1].lstrip()
            return _pem(leaf) + pebble_chain
        return _pem(leaf) + _pem(self.fake_ca.intermediate)

    def _leaf(self, public_key: Any, names: list[str], start: dt.datetime, end: dt.datetime) -> x509.Certificate:
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.fake_ca.intermediate.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(self.fake_ca.int_key, hashes.SHA256()))

    def _rate_limits(self, payload: bytes) -> bool:
        if self.rate_limited is None or (self.rate_limited_name and self.rate_limited_name.encode() not in payload):
            return False
        if self.rate_limited_count is not None:
            if self.rate_limited_count <= 0:
                return False
            self.rate_limited_count -= 1
        return True

    def _remember_csr(self, body: bytes) -> None:
        try:
            payload = json.loads(_b64url_decode(json.loads(body)["payload"]))
            self.last_csr = x509.load_der_x509_csr(_b64url_decode(payload["csr"]))
        except (ValueError, KeyError, TypeError):
            pass

    # -- HTTP -----------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        ca = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:
                self._forward()

            def do_HEAD(self) -> None:
                self._forward()

            def do_POST(self) -> None:
                self._forward()

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if body and self.path.startswith(FINALIZE_PATH):
                    ca._remember_csr(body)
                if not ca._gate.is_set() and self.path.startswith(ca._held_prefix):
                    ca.held += 1
                    ca._gate.wait(120)
                if self.command == "POST" and self.path.startswith(NEW_ORDER_PATH):
                    payload = _payload(body or b"")
                    ca.new_orders.append((time.monotonic(), payload))
                    if ca._rate_limits(payload):
                        return self._problem(429, "rateLimited", "too many new orders (hostile_ca)",
                                             {"Retry-After": str(ca.rate_limited)})
                    if ca.refuse_replaces and b"\"replaces\"" in payload:
                        return self._problem(403, "unauthorized", "account did not request the certificate "
                                             "being replaced (hostile_ca)")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                upstream = http.client.HTTPSConnection("127.0.0.1", ca.pebble.ports.acme,
                                                       context=ca._upstream_ctx, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    resp = upstream.getresponse()
                    data = resp.read()
                    status, reason, resp_headers = resp.status, resp.reason, resp.getheaders()
                finally:
                    upstream.close()
                if self.command == "POST" and self.path.startswith(NEW_ORDER_PATH) and status == 201:
                    ca.orders_created.append(time.monotonic())
                if self.command == "POST" and self.path.startswith(FINALIZE_PATH) and status == 200:
                    ca.finalized.append(time.monotonic())
                mode = ca.mode
                if self.path.startswith(CERT_PATH) and status == 200 and mode is not None:
                    ca.forged += 1
                    if mode.startswith("oversized"):
                        self._send_oversized(resp_headers, declared=mode == "oversized_declared")
                        return
                    data = ca.forge(data)
                if ca.hide_ari and self.path == "/dir" and status == 200:
                    directory = json.loads(data)
                    directory.pop("renewalInfo", None)
                    data = json.dumps(directory).encode()
                self.send_response(status, reason)
                for name, value in resp_headers:
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _problem(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
                data = json.dumps({"type": f"urn:ietf:params:acme:error:{code}", "detail": detail,
                                   "status": status}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/problem+json")
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _send_oversized(self, resp_headers: list[tuple[str, str]], declared: bool) -> None:
                self.close_connection = True
                self.send_response(200)
                for name, value in resp_headers:
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                if declared:
                    self.send_header("Content-Length", str(OVERSIZED_BYTES))
                self.send_header("Connection", "close")
                self.end_headers()
                line = b"MIIBszCCAVmgAwIBAgIUJ0b3NvbWV0aGluZ2xvbmdlbm91Z2h0b2ZpbGw9PT09PQ==\n"
                chunk = b"-----BEGIN CERTIFICATE-----\n" + line * 1000
                sent = 0
                ca.oversized_sent = 0
                try:
                    while sent < OVERSIZED_BYTES:
                        piece = chunk[: OVERSIZED_BYTES - sent]
                        self.wfile.write(piece)
                        sent += len(piece)
                        ca.oversized_sent = sent
                except (OSError, ssl.SSLError):
                    pass  # the client hung up: what we want

        return Handler



__all__ = ["HostileCA", "MODES", "OVERSIZED_BYTES"]
