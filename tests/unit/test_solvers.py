"""Challenge solvers on loopback, without a CA: what each one serves, writes or runs."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import josepy as jose
import pytest
from acme import challenges
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from certd.acme.answers import share_answers
from certd.acme.responders import keep_listening, stop_listening
from certd.config import Listen
from certd.core.errors import ChallengeFailed
from certd.acme.solvers import (ACME_IDENTIFIER_OID, TLSALPN01, DnsHookSolver, StandaloneHttpSolver, TlsAlpnSolver,
                           WebrootSolver, _LISTENERS)


@pytest.fixture(scope="module")
def account_key() -> jose.JWK:
    return jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _http01() -> challenges.HTTP01:
    return challenges.HTTP01(token=os.urandom(32))


def test_standalone_is_shared_and_refcounted(account_key: jose.JWK) -> None:
    """Two challenges share one responder; it serves only their tokens and stops after the last cleanup."""
    listen = Listen("127.0.0.1", _free_port())
    one, two = _http01(), _http01()
    a, b = StandaloneHttpSolver(listen), StandaloneHttpSolver(listen)
    a.present("a.example.test", one, account_key)
    b.present("b.example.test", two, account_key)
    try:
        assert _get(listen.port, one.path) == (200, one.validation(account_key).encode())
        assert _get(listen.port, two.path) == (200, two.validation(account_key).encode())
        assert _get(listen.port, "/.well-known/acme-challenge/unknown")[0] == 404
        assert _get(listen.port, "/")[0] == 404
        a.cleanup("a.example.test", one, account_key)
        assert _get(listen.port, one.path)[0] == 404
        assert _get(listen.port, two.path)[0] == 200
    finally:
        b.cleanup("b.example.test", two, account_key)
    assert ("http-01", listen) not in _LISTENERS.active()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", listen.port), timeout=1).close()


def test_standalone_port_taken_by_someone_else(account_key: jose.JWK) -> None:
    """A port held by another program is a transient ChallengeFailed that says so."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        listen = Listen("127.0.0.1", squatter.getsockname()[1])
        with pytest.raises(ChallengeFailed, match=r"http-01 responder cannot listen on 127\.0\.0\.1:\d+: "
                                                  r"address already in use .*; will retry") as info:
            StandaloneHttpSolver(listen).present("x.example.test", _http01(), account_key)
        assert info.value.transient
    assert ("http-01", listen) not in _LISTENERS.active()


def test_webroot_writes_readable_file_and_removes_it(tmp_path: Path, account_key: jose.JWK) -> None:
    """Webroot: the key authorization lands in .well-known/acme-challenge/<token>, mode 0644, then goes."""
    chall = _http01()
    solver = WebrootSolver(tmp_path / "www")
    solver.present("w.example.test", chall, account_key)
    path = tmp_path / "www" / ".well-known" / "acme-challenge" / chall.encode("token")
    assert path.read_text() == chall.validation(account_key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    solver.cleanup("w.example.test", chall, account_key)
    assert not path.exists()


def test_webroot_unwritable_is_reported(tmp_path: Path, account_key: jose.JWK) -> None:
    """A webroot certd cannot write to gives a ChallengeFailed naming the path."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ChallengeFailed, match="http-01 webroot: cannot write .*file/.well-known"):
        WebrootSolver(blocker).present("w.example.test", _http01(), account_key)


def _hook(tmp_path: Path, body: str) -> Path:
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\n" + body)
    hook.chmod(0o755)
    return hook


def test_dns_hook_gets_set_and_clear_with_the_txt_value(tmp_path: Path, account_key: jose.JWK) -> None:
    """The hook runs as argv (no shell) with set/clear, the bare domain and the TXT value."""
    record = tmp_path / "calls"
    hook = _hook(tmp_path, f'printf "%s|" "$@" >> {record}; echo >> {record}\n')
    chall = challenges.DNS01(token=os.urandom(32))
    solver = DnsHookSolver((str(hook), "arg with space"))
    solver.present("example.test", chall, account_key)
    solver.cleanup("example.test", chall, account_key)
    value = chall.validation(account_key)
    assert record.read_text().splitlines() == [f"arg with space|set|example.test|{value}|",
                                               f"arg with space|clear|example.test|{value}|"]


@pytest.mark.parametrize("body, words", [
    ("echo 'zone not found' >&2; exit 4\n", "set example.test exited 4: zone not found; will retry"),
    ("sleep 5\n", "set example.test did not finish within 0.3 s; will retry"),
])
def test_dns_hook_failures(tmp_path: Path, account_key: jose.JWK, body: str, words: str) -> None:
    """A hook that fails or hangs stops the order with one line saying which and why."""
    solver = DnsHookSolver((str(_hook(tmp_path, body)),), timeout=0.3)
    with pytest.raises(ChallengeFailed) as info:
        solver.present("example.test", challenges.DNS01(token=os.urandom(32)), account_key)
    assert str(info.value).endswith(words) and info.value.transient


def test_dns_hook_missing_executable(tmp_path: Path, account_key: jose.JWK) -> None:
    """A hook that cannot be started is reported, not raised as OSError."""
    with pytest.raises(ChallengeFailed, match="could not be started"):
        DnsHookSolver((str(tmp_path / "absent"),)).present("example.test", challenges.DNS01(token=os.urandom(32)),
                                                           account_key)


def test_tls_alpn_serves_validation_certificate(account_key: jose.JWK) -> None:
    """tls-alpn-01: ALPN acme-tls/1 and SNI get a cert for that name with the critical acmeIdentifier."""
    listen = Listen("127.0.0.1", _free_port())
    chall = TLSALPN01(token=os.urandom(32))
    solver = TlsAlpnSolver(listen)
    solver.present("alpn.example.test", chall, account_key)
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["acme-tls/1"])
        with socket.create_connection(("127.0.0.1", listen.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="alpn.example.test") as tls:
            assert tls.selected_alpn_protocol() == "acme-tls/1"
            der = tls.getpeercert(binary_form=True)
    finally:
        solver.cleanup("alpn.example.test", chall, account_key)
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["alpn.example.test"]
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    digest = hashlib.sha256(chall.key_authorization(account_key).encode()).digest()
    assert ext.critical and ext.value.value == b"\x04\x20" + digest
    assert ("tls-alpn-01", listen) not in _LISTENERS.active()


class _Board:
    """An in-memory AnswerBoard (what PgStore.fleet is in a fleet); ``down``: every call fails."""

    def __init__(self) -> None:
        self.answers: dict[str, str] = {}
        self.down = False

    def publish(self, token: str, key_authorization: str, name: str) -> None:
        if self.down:
            raise ConnectionError("database unreachable")
        self.answers[token] = key_authorization

    def lookup(self, token: str) -> str | None:
        if self.down:
            raise ConnectionError("database unreachable")
        return self.answers.get(token)

    def withdraw(self, token: str) -> None:
        self.answers.pop(token, None)


@pytest.fixture
def board() -> Iterator[_Board]:
    b = _Board()
    share_answers(b)
    yield b
    share_answers(None)


def test_a_fleet_responder_answers_another_nodes_token_from_the_board(board: _Board, account_key: jose.JWK) -> None:
    """A node's always-on responder answers a token another node published, and 404s once it is withdrawn."""
    mine, theirs = Listen("127.0.0.1", _free_port()), Listen("127.0.0.1", _free_port())
    keep_listening(theirs)
    chall = _http01()
    solver = StandaloneHttpSolver(mine)
    solver.present("www.example.test", chall, account_key)  # published before it is answered
    try:
        assert board.answers == {chall.encode("token"): chall.validation(account_key)}
        assert _get(theirs.port, chall.path) == (200, chall.validation(account_key).encode())
        board.down = True
        assert _get(theirs.port, chall.path)[0] == 404  # the database cannot say: not found, no crash
        board.down = False
    finally:
        solver.cleanup("www.example.test", chall, account_key)
        assert _get(theirs.port, chall.path)[0] == 404 and board.answers == {}
        stop_listening(theirs)


def test_an_answer_the_fleet_cannot_share_fails_the_challenge(board: _Board, account_key: jose.JWK) -> None:
    """With the database unreachable an http-01 challenge is not answered at all: one transient error."""
    board.down = True
    listen = Listen("127.0.0.1", _free_port())
    with pytest.raises(ChallengeFailed, match="cannot share the answer with the fleet's other nodes"):
        StandaloneHttpSolver(listen).present("www.example.test", _http01(), account_key)
    assert ("http-01", listen) not in _LISTENERS.active()
