"""The built-in challenge responders, shared by every certificate and thread that needs one.

- http-01 standalone (:class:`StandaloneHttpSolver`): an HTTP responder per listen address.
- tls-alpn-01 (RFC 8737, :class:`TlsAlpnSolver`): a TLS responder answering ALPN
  ``acme-tls/1`` with a self-signed certificate carrying the critical acmeIdentifier extension.

Each responder is refcounted (:class:`_SharedListeners`: started on the first ``present``,
stopped after the last ``cleanup``). Its accept loop is woken through a pipe, so stopping
takes microseconds, not a poll interval: certd may start and stop it once per certificate.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os
import selectors
import socket
import socketserver
import ssl
import tempfile
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Protocol

import josepy as jose
from acme import challenges
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from certd.acme import answers
from certd.config import Listen
from certd.core.errors import ChallengeFailed

log = logging.getLogger("certd.solvers")  # a stable name: it is part of the log format

ACME_TLS_ALPN = "acme-tls/1"
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")  # RFC 8737 §3
CHALLENGE_PATH = "/.well-known/acme-challenge/"


# --- tls-alpn-01 challenge type (acme 5.9 has none) -------------------------------------------


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """ACME tls-alpn-01 challenge response (RFC 8737)."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """ACME tls-alpn-01 challenge (RFC 8737): the validation is SHA-256(key authorization)."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: jose.JWK, **unused: Any) -> bytes:
        return hashlib.sha256(self.key_authorization(account_key).encode("ascii")).digest()


# --- shared, refcounted listeners --------------------------------------------------------------


class _Listener(Protocol):
    def put(self, name: str, value: Any) -> None: ...
    def drop(self, name: str) -> None: ...
    def stop(self) -> None: ...


class _SharedListeners:
    """One responder per (kind, address) for the whole process, refcounted per challenge."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[tuple[str, Listen], tuple[_Listener, int]] = {}

    def acquire(self, kind: str, listen: Listen, start: Callable[[Listen], _Listener],
                name: str, value: Any) -> None:
        """Serve ``value`` under ``name`` on ``listen``, starting the responder if needed."""
        with self._lock:
            server, refs = self._live.get((kind, listen), (None, 0))
            if server is None:
                server = start(listen)
                log.debug("%s responder started on %s", kind, listen)
            server.put(name, value)
            self._live[(kind, listen)] = (server, refs + 1)

    def release(self, kind: str, listen: Listen, name: str) -> None:
        """Stop serving ``name``; the last release stops the responder."""
        with self._lock:
            server, refs = self._live.get((kind, listen), (None, 0))
            if server is None:
                return
            server.drop(name)
            if refs > 1:
                self._live[(kind, listen)] = (server, refs - 1)
                return
            del self._live[(kind, listen)]
            server.stop()
            log.debug("%s responder on %s stopped", kind, listen)

    def active(self) -> list[tuple[str, Listen]]:
        """The responders running now (for tests and status)."""
        with self._lock:
            return list(self._live)


_LISTENERS = _SharedListeners()


def keep_listening(listen: Listen) -> None:
    """Start the http-01 responder on ``listen`` and keep it up (a fleet node answers other
    nodes' challenges at any time). ChallengeFailed when it cannot listen there."""
    _LISTENERS.acquire("http-01", listen, _HttpResponder.start, "", None)


def stop_listening(listen: Listen) -> None:
    """Undo :func:`keep_listening`."""
    _LISTENERS.release("http-01", listen, "")


def _bind_problem(what: str, listen: Listen, e: OSError) -> ChallengeFailed:
    if e.errno == errno.EADDRINUSE:
        why = "address already in use by another program; stop it or use http01_webroot" \
            if what == "http-01" else "address already in use by another program"
    elif e.errno == errno.EACCES:
        why = "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    elif e.errno == errno.EADDRNOTAVAIL:
        why = "no such local address"
    else:
        why = e.strerror or str(e)
    return ChallengeFailed(f"{what} responder cannot listen on {listen}: {why}; will retry", transient=True)


class _ResponderMixin:
    """A built-in challenge responder: what it serves by name (``put``/``drop``), started on
    its own thread by ``start(listen)``, serving until ``stop()``, which wakes the accept loop
    at once through a pipe."""

    kind: str                       # the challenge type, for errors and the thread's name
    entries: dict[str, Any]
    socket: socket.socket
    _handle_request_noblock: Any
    server_close: Any

    @classmethod
    def start(cls, listen: Listen) -> _ResponderMixin:
        try:
            server = cls(listen)  # type: ignore[call-arg]
        except OSError as e:
            raise _bind_problem(cls.kind, listen, e) from None
        server.run_in_thread(f"certd-{cls.kind.replace('-', '')}-{listen}")
        return server

    def put(self, name: str, value: Any) -> None:
        self.entries[name] = value

    def drop(self, name: str) -> None:
        self.entries.pop(name, None)

    def run_in_thread(self, name: str) -> None:
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.socket, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        return
                    self._handle_request_noblock()

    def stop(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join()
        self.server_close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class _ResponderSolver:
    """present/cleanup for a challenge answered by a built-in responder on ``listen``, shared
    by every order in the process that uses that address (see _SharedListeners)."""

    challenge_type: str
    responder: type[_ResponderMixin]

    def __init__(self, listen: Listen) -> None:
        self.listen = listen

    def _entry(self, domain: str, challenge: challenges.KeyAuthorizationChallenge,
               account_key: jose.JWK) -> tuple[str, Any]:
        raise NotImplementedError

    def _name(self, domain: str, challenge: challenges.KeyAuthorizationChallenge) -> str:
        raise NotImplementedError

    def present(self, domain: str, challenge: challenges.KeyAuthorizationChallenge,
                account_key: jose.JWK) -> None:
        name, value = self._entry(domain, challenge, account_key)
        _LISTENERS.acquire(self.challenge_type, self.listen, self.responder.start, name, value)

    def cleanup(self, domain: str, challenge: challenges.KeyAuthorizationChallenge,
                account_key: jose.JWK) -> None:
        try:
            _LISTENERS.release(self.challenge_type, self.listen, self._name(domain, challenge))
        except Exception as e:  # noqa: BLE001 - cleanup must not mask the order's outcome
            log.warning("%s responder on %s: cleanup failed: %s", self.challenge_type, self.listen, e)


# --- http-01 ---------------------------------------------------------------------------------


class _ChallengeHandler(BaseHTTPRequestHandler):
    server: _HttpResponder
    server_version = "certd"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        token = self.path[len(CHALLENGE_PATH):] if self.path.startswith(CHALLENGE_PATH) else None
        value = self.server.entries.get(token) if token else None
        if value is None and token:
            value = answers.lookup(token)
        data = value.encode("ascii") if value is not None else b"not found\n"
        self.send_response(200 if value is not None else 404)
        self.send_header("Content-Type", "text/plain" if value is not None else "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http-01 responder: %s %s", self.address_string(), format % args)


class _HttpResponder(_ResponderMixin, ThreadingHTTPServer):
    # Pebble opens several validation connections per challenge at once; the default backlog
    # of 5 drops some, and TCP retries them only after 1 s.
    kind = "http-01"
    request_queue_size = 1024
    daemon_threads = True

    def __init__(self, listen: Listen) -> None:
        self.address_family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        self.entries: dict[str, str] = {}   # token -> key authorization
        super().__init__((listen.host, listen.port), _ChallengeHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would do a reverse DNS lookup (getfqdn) for nothing.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class StandaloneHttpSolver(_ResponderSolver):
    """http-01 through the built-in responder on ``listen``."""

    challenge_type = "http-01"
    responder = _HttpResponder

    def _entry(self, domain: str, challenge: challenges.KeyAuthorizationChallenge,
               account_key: jose.JWK) -> tuple[str, Any]:
        return challenge.encode("token"), challenge.validation(account_key)

    def _name(self, domain: str, challenge: challenges.KeyAuthorizationChallenge) -> str:
        return challenge.encode("token")

    def present(self, domain: str, challenge: challenges.KeyAuthorizationChallenge,
                account_key: jose.JWK) -> None:
        answers.publish(domain, *self._entry(domain, challenge, account_key))
        super().present(domain, challenge, account_key)

    def cleanup(self, domain: str, challenge: challenges.KeyAuthorizationChallenge,
                account_key: jose.JWK) -> None:
        super().cleanup(domain, challenge, account_key)
        answers.withdraw(self._name(domain, challenge))


# --- tls-alpn-01 -----------------------------------------------------------------------------


def _san(name: str) -> x509.GeneralName:
    """An iPAddress SAN for an IP identifier (RFC 8738 §6), else a DNS SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _sni_of(name: str) -> str:
    """The SNI a CA sends to validate ``name``: an IP identifier's reverse-DNS name (RFC 8738 §6,
    e.g. ``1.0.0.127.in-addr.arpa``), else the name itself."""
    try:
        return ipaddress.ip_address(name).reverse_pointer
    except ValueError:
        return name.lower()


def _alpn_context(domain: str, digest: bytes) -> ssl.SSLContext:
    """A server context presenting the RFC 8737 §3 validation certificate for ``domain``."""
    key = ec.generate_private_key(ec.SECP256R1())
    # The system clock, not an injected one: the CA checks this validity against its real
    # time, and it only needs to cover the next minutes.
    now = datetime.now(timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certd tls-alpn-01")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([_san(domain)]), critical=False)
            # extnValue is the DER OCTET STRING holding the SHA-256 digest
            .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest), critical=True)
            .sign(key, hashes.SHA256()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ACME_TLS_ALPN])
    # SSLContext loads certificates from files only: a private directory, gone right after.
    with tempfile.TemporaryDirectory(prefix="certd-alpn-") as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


class _AlpnHandler(socketserver.BaseRequestHandler):
    server: _AlpnResponder

    def handle(self) -> None:
        self.request.settimeout(10)
        try:
            with self.server.base_context.wrap_socket(self.request, server_side=True) as tls:
                log.debug("tls-alpn-01 responder: handshake with %s for %s (alpn %s)",
                          self.client_address[0], getattr(tls, "server_hostname", None),
                          tls.selected_alpn_protocol())
        except (OSError, ssl.SSLError) as e:
            log.debug("tls-alpn-01 responder: handshake with %s failed: %s", self.client_address[0], e)


class _AlpnResponder(_ResponderMixin, socketserver.ThreadingTCPServer):
    kind = "tls-alpn-01"
    request_queue_size = 1024
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, listen: Listen) -> None:
        self.address_family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        self.entries: dict[str, ssl.SSLContext] = {}   # lower-case name -> validation context
        self.base_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.base_context.set_alpn_protocols([ACME_TLS_ALPN])
        self.base_context.sni_callback = self._pick
        super().__init__((listen.host, listen.port), _AlpnHandler)

    def _pick(self, sock: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        ctx = self.entries.get((server_name or "").lower())
        if ctx is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sock.context = ctx
        return None


class TlsAlpnSolver(_ResponderSolver):
    """tls-alpn-01 through the built-in TLS responder on ``listen``.

    One validation certificate per name at a time: two orders validating the same name at once
    on one address would overwrite each other, as they would on any tls-alpn-01 server.
    """

    challenge_type = "tls-alpn-01"
    responder = _AlpnResponder

    def _entry(self, domain: str, challenge: challenges.KeyAuthorizationChallenge,
               account_key: jose.JWK) -> tuple[str, Any]:
        return _sni_of(domain), _alpn_context(domain, challenge.validation(account_key))

    def _name(self, domain: str, challenge: challenges.KeyAuthorizationChallenge) -> str:
        return _sni_of(domain)
