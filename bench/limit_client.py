"""The protocol limit: a minimal ACME client on the ``acme`` library, polling fast.

It does only what RFC 8555 requires for one certificate, with nothing of certd around it: a
fresh ECDSA P-256 key and CSR, newOrder (the library also fetches each authorization), answer
the http-01 challenge, poll the order until ``ready``, finalize, poll until ``valid``, download
the chain. No checks, no storage, no journal. Requests go through the library's own
``ClientNetwork`` (``requests``), signed with one account shared by every thread; each thread
has its own network object (keep-alive connection, nonce pool). Polls start 1 ms apart and
double up to 50 ms.

In real-validation mode an http-01 responder (stdlib ``http.server`` with a large listen
backlog: Pebble opens several connections per challenge) serves the key authorizations on
Pebble's http port; in fast mode (PEBBLE_VA_ALWAYS_VALID=1) Pebble does not connect at all.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import josepy as jose
from acme import challenges, client, crypto_util, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

FIRST_POLL = 0.001
MAX_POLL = 0.05


class _Handler(BaseHTTPRequestHandler):
    server: _Responder

    def do_GET(self) -> None:
        value = self.server.tokens.get(self.path.rsplit("/", 1)[-1])
        data = value.encode() if value is not None else b"not found"
        self.send_response(200 if value is not None else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


class _Responder(ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True

    def __init__(self, port: int) -> None:
        self.tokens: dict[str, str] = {}
        super().__init__(("127.0.0.1", port), _Handler)


@dataclass
class Result:
    count: int
    seconds: float          # wall time for all of them
    per_cert: list[float]   # seconds per certificate

    @property
    def median_ms(self) -> float:
        return statistics.median(self.per_cert) * 1000

    @property
    def per_second(self) -> float:
        return self.count / self.seconds


class LimitClient:
    """``issue(domain)`` from any number of threads; ``close()`` when done."""

    def __init__(self, directory_url: str, ca_bundle: str, http_port: int | None = None) -> None:
        self.directory_url, self.ca_bundle = directory_url, ca_bundle
        self.key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        self._local = threading.local()
        net = self._net(None)
        self.directory = client.ClientV2.get_directory(directory_url, net)
        self.account = client.ClientV2(self.directory, net).new_account(
            messages.NewRegistration.from_data(email="limit@example.test", terms_of_service_agreed=True))
        self._http_port = http_port
        self._responder: _Responder | None = None

    @contextmanager
    def responding(self) -> Iterator[None]:
        """The http-01 responder on Pebble's http port for the block (real-validation mode);
        nothing in fast mode. Outside it the port is free for another client's responder."""
        if self._http_port is None or self._responder is not None:
            yield
            return
        self._responder = _Responder(self._http_port)
        thread = threading.Thread(target=self._responder.serve_forever, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._responder.shutdown()
            self._responder.server_close()
            self._responder = None
            thread.join()

    def _net(self, account: Any) -> client.ClientNetwork:
        # verify_ssl: requests takes a CA bundle's path too; acme annotates it bool
        return client.ClientNetwork(self.key, account=account, alg=jose.ES256,
                                    verify_ssl=self.ca_bundle,  # type: ignore[arg-type]
                                    user_agent="certd-bench-limit")

    def _client(self) -> client.ClientV2:
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = client.ClientV2(self.directory, self._net(self.account))
        return c

    def _poll(self, c: client.ClientV2, uri: str, until: str) -> messages.Order:
        delay = FIRST_POLL
        while True:
            order = messages.Order.from_json(c._post_as_get(uri).json())
            if order.status.name == until:
                return order
            if order.status.name == "invalid":
                raise RuntimeError(f"order {uri} became invalid: {order.error}")
            time.sleep(delay)
            delay = min(delay * 2, MAX_POLL)

    def issue(self, domain: str) -> bytes:
        c = self._client()
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        csr_pem = crypto_util.make_csr(key_pem, [domain])
        orderr = c.new_order(csr_pem)
        tokens = []
        for authzr in orderr.authorizations:
            challb = next(ch for ch in authzr.body.challenges if isinstance(ch.chall, challenges.HTTP01))
            response, validation = challb.response_and_validation(self.key)
            if self._http_port is not None:
                assert self._responder is not None, "issue() in real-validation mode needs responding()"
                token = challb.chall.encode("token")
                self._responder.tokens[token] = validation
                tokens.append(token)
            c.answer_challenge(challb, response)
        self._poll(c, orderr.uri, "ready")
        for token in tokens:
            self._responder.tokens.pop(token, None)  # type: ignore[union-attr]
        orderr = c.begin_finalization(orderr)
        order = self._poll(c, orderr.uri, "valid")
        return c._post_as_get(order.certificate).content

    def run(self, domains: list[str], threads: int) -> Result:
        """Issue one certificate per domain with ``threads`` workers."""
        per_cert: list[float] = []

        def one(domain: str) -> None:
            t = time.perf_counter()
            self.issue(domain)
            per_cert.append(time.perf_counter() - t)

        with self.responding():
            start = time.perf_counter()
            if threads == 1:
                for d in domains:
                    one(d)
            else:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(one, domains))
            return Result(len(domains), time.perf_counter() - start, per_cert)
