"""Issuance against a real Pebble 2.10 with real validation (no PEBBLE_VA_ALWAYS_VALID).

Every issued chain is checked twice: by certd's own ``check_issued`` and by ``openssl verify``
against the Pebble instance's current root.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from certd.crypto.certcheck import check_issued
from certd.core.clock import SystemClock
from certd.config import KEY_TYPES, AcmeConfig, CertificateConfig, Listen
from certd.core.errors import AcmeError, CANotReachable, ChallengeFailed, ConfigError
from certd.acme.issuer import Issuer, RenewalInfo, ari_cert_id, connect
from certd.acme.resume import Twins
from certd.crypto.keys import generate_private_key
from certd.core.model import Bundle, CertInfo
from certd.acme import solvers
from tests.support.pebble_fixtures import PebbleEnv, ari_finds
from tests.support.procs import ManagedProcess

REPO = Path(__file__).resolve().parents[2]
DNS_HOOK = REPO / "hooks" / "dns-challtestsrv"


class MemoryAccounts:
    """AccountStore in memory, counting registrations."""

    def __init__(self) -> None:
        self.accounts: dict[str, tuple[bytes, str]] = {}
        self.saves = 0

    def load_account(self, directory_url: str) -> tuple[bytes, str] | None:
        return self.accounts.get(directory_url)

    def save_account(self, directory_url: str, key_pem: bytes, registration_json: str) -> None:
        self.accounts[directory_url] = (key_pem, registration_json)
        self.saves += 1


def acme_for(pebble: PebbleEnv, **kw: object) -> AcmeConfig:
    return AcmeConfig(directory=pebble.directory_url, email="ops@example.test", agree_tos=True,
                      ca_bundle=pebble.ca_bundle, **kw)  # type: ignore[arg-type]


def http_cert(pebble: PebbleEnv, *domains: str, name: str = "www", key_type: str = "ecdsa-p256") -> CertificateConfig:
    return CertificateConfig(name=name, domains=domains, key_type=key_type,
                             http01_listen=Listen("127.0.0.1", pebble.http_port))


def dns_cert(pebble: PebbleEnv, *domains: str, name: str = "dns") -> CertificateConfig:
    return CertificateConfig(name=name, domains=domains, challenge="dns-01",
                             dns01_hook=(str(DNS_HOOK), pebble.challtestsrv_url))


@pytest.fixture
def accounts() -> MemoryAccounts:
    return MemoryAccounts()


@pytest.fixture
def make_issuer(accounts: MemoryAccounts) -> Iterator[Callable[..., Issuer]]:
    made: list[Issuer] = []

    def make(pebble: PebbleEnv, store: MemoryAccounts | None = None, **kw: object) -> Issuer:
        issuer = connect(acme_for(pebble), store or accounts, SystemClock(), **kw)  # type: ignore[arg-type]
        made.append(issuer)
        return issuer

    yield make
    for issuer in made:
        issuer.close()
    assert solvers._LISTENERS.active() == [], "a challenge responder was left running"


def issue_checked(issuer: Issuer, pebble: PebbleEnv, cert: CertificateConfig, tmp_path: Path,
                  **kw: object) -> Bundle:
    """Issue, then check with certd and with openssl against the instance's root.

    Once more on a timed-out request: Pebble wedges an order now and then (its order handler
    takes the order's read lock twice; an issuance finishing in between deadlocks that order,
    docs/PERFORMANCE.md), and then never answers a poll of it — seen once in a loaded CI run.
    A new order works; a CA that is really unreachable fails the second time too."""
    key = generate_private_key(cert.key_type)
    try:
        fullchain = issuer.issue(cert, key, **kw)  # type: ignore[arg-type]
    except CANotReachable as e:
        if "timed out" not in str(e):
            raise
        fullchain = issuer.issue(cert, key, **kw)  # type: ignore[arg-type]
    bundle = check_issued(fullchain, key, cert.domains, datetime.now(timezone.utc))
    assert_verifies(pebble, bundle, tmp_path)
    return bundle


def assert_verifies(pebble: PebbleEnv, bundle: Bundle, tmp_path: Path) -> None:
    root, chain, leaf = tmp_path / "root.pem", tmp_path / "chain.pem", tmp_path / "leaf.pem"
    pebble.write_root(root)
    chain.write_bytes(bundle.chain_pem)
    leaf.write_bytes(bundle.cert_pem)
    done = subprocess.run(["openssl", "verify", "-CAfile", str(root), "-untrusted", str(chain), str(leaf)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


# --- challenges --------------------------------------------------------------------------------


def test_http01_standalone(pebble: PebbleEnv, make_issuer: Callable[..., Issuer], tmp_path: Path) -> None:
    """http-01 through the built-in responder yields a chain for our key that verifies to Pebble's root."""
    steps: list[str] = []
    bundle = issue_checked(make_issuer(pebble), pebble, http_cert(pebble, "standalone.example.test"), tmp_path,
                           progress=steps.append)
    assert bundle.info.domains == ("standalone.example.test",)
    assert steps[-1] == "certificate downloaded" and any("answered 1 http-01" in s for s in steps)


def test_http01_multi_san(pebble: PebbleEnv, make_issuer: Callable[..., Issuer], tmp_path: Path) -> None:
    """One order validates several names at once; the leaf carries exactly those names."""
    names = ("a.multi.example.test", "b.multi.example.test", "multi.example.test", "c.multi.example.test")
    bundle = issue_checked(make_issuer(pebble), pebble, http_cert(pebble, *names), tmp_path)
    assert set(bundle.info.domains) == set(names)


def test_http01_webroot(pebble: PebbleEnv, make_issuer: Callable[..., Issuer], tmp_path: Path) -> None:
    """http-01 webroot: a separate web server serves the file certd writes, which is gone afterwards."""
    webroot = tmp_path / "www"
    webroot.mkdir()
    server = ManagedProcess(
        [sys.executable, "-m", "http.server", str(pebble.http_port), "--bind", "127.0.0.1",
         "--directory", str(webroot)],
        log_path=tmp_path / "http.server.log", name="http.server").start()
    try:
        server.wait_ready(lambda: socket.create_connection(("127.0.0.1", pebble.http_port), timeout=1).close() or True,
                          10, what=f"listening on 127.0.0.1:{pebble.http_port}")
        cert = CertificateConfig(name="webroot", domains=("webroot.example.test",), http01_webroot=webroot)
        issue_checked(make_issuer(pebble), pebble, cert, tmp_path)
        challenge_dir = webroot / ".well-known" / "acme-challenge"
        assert challenge_dir.is_dir() and list(challenge_dir.iterdir()) == []
        assert "GET /.well-known/acme-challenge/" in server.log_text()
    finally:
        server.stop()


def test_dns01_wildcard_and_apex(pebble: PebbleEnv, make_issuer: Callable[..., Issuer], tmp_path: Path) -> None:
    """dns-01 through the challtestsrv hook covers a wildcard and its apex (two TXT values, one name)."""
    bundle = issue_checked(make_issuer(pebble), pebble,
                           dns_cert(pebble, "*.wild.example.test", "wild.example.test"), tmp_path)
    assert set(bundle.info.domains) == {"*.wild.example.test", "wild.example.test"}
    assert pebble.resolve_txt("_acme-challenge.wild.example.test.") == [], "TXT records were left behind"


def test_tls_alpn01(pebble: PebbleEnv, make_issuer: Callable[..., Issuer], tmp_path: Path) -> None:
    """tls-alpn-01 (RFC 8737) through the built-in TLS responder on Pebble's tlsPort."""
    cert = CertificateConfig(name="alpn", domains=("alpn.example.test", "alpn2.example.test"),
                             challenge="tls-alpn-01", tlsalpn01_listen=Listen("127.0.0.1", pebble.tls_port))
    issue_checked(make_issuer(pebble), pebble, cert, tmp_path)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_every_key_type(pebble: PebbleEnv, make_issuer: Callable[..., Issuer], tmp_path: Path, key_type: str) -> None:
    """Each supported key type gets a certificate for that very key."""
    bundle = issue_checked(make_issuer(pebble), pebble,
                           http_cert(pebble, f"{key_type}.example.test", key_type=key_type), tmp_path)
    assert bundle.info.key_type == key_type


def test_parallel_issues_share_one_responder(pebble: PebbleEnv, make_issuer: Callable[..., Issuer],
                                             tmp_path: Path) -> None:
    """Eight threads issuing at once through one Issuer and one http-01 port all succeed."""
    issuer = make_issuer(pebble)
    results: dict[int, bytes | BaseException] = {}

    def work(i: int) -> None:
        cert = http_cert(pebble, f"p{i}.example.test", f"q{i}.example.test", name=f"p{i}")
        key = generate_private_key("ecdsa-p256")
        try:
            for _ in range(3):
                check_issued(issuer.issue(cert, key), key, cert.domains, datetime.now(timezone.utc))
            results[i] = b"ok"
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {i: b"ok" for i in range(8)}


# --- accounts ----------------------------------------------------------------------------------


def test_account_reused_across_issuers(pebble: PebbleEnv, make_issuer: Callable[..., Issuer],
                                       accounts: MemoryAccounts, tmp_path: Path) -> None:
    """A second Issuer (a later run) uses the stored account instead of registering a new one."""
    issue_checked(make_issuer(pebble), pebble, http_cert(pebble, "acct1.example.test"), tmp_path)
    assert accounts.saves == 1
    key_pem, regr_json = accounts.accounts[pebble.directory_url]
    assert b"PRIVATE KEY" in key_pem and "/my-account/" in json.loads(regr_json)["uri"]
    issue_checked(make_issuer(pebble), pebble, http_cert(pebble, "acct2.example.test"), tmp_path)
    assert accounts.saves == 1
    assert accounts.accounts[pebble.directory_url] == (key_pem, regr_json)


def test_forgotten_account_is_registered_again(pebble_factory: Callable[..., PebbleEnv],
                                               make_issuer: Callable[..., Issuer], accounts: MemoryAccounts,
                                               tmp_path: Path) -> None:
    """After the CA lost its state (Pebble restarted), certd registers again and the order succeeds."""
    ca = pebble_factory()
    issuer = make_issuer(ca)
    issue_checked(issuer, ca, http_cert(ca, "before.example.test"), tmp_path)
    old_uri = json.loads(accounts.accounts[ca.directory_url][1])["uri"]
    ca.restart()
    issue_checked(issuer, ca, http_cert(ca, "after.example.test"), tmp_path)
    assert accounts.saves == 2
    assert json.loads(accounts.accounts[ca.directory_url][1])["uri"] != old_uri


def test_terms_of_service_must_be_agreed(pebble: PebbleEnv, accounts: MemoryAccounts) -> None:
    """Without agree_tos the operator is told to read the CA's terms and set it."""
    issuer = connect(AcmeConfig(directory=pebble.directory_url, agree_tos=False, ca_bundle=pebble.ca_bundle),
                    accounts, SystemClock())
    with pytest.raises(ConfigError, match="agree_tos = true") as info:
        issuer.issue(http_cert(pebble, "tos.example.test"), generate_private_key("ecdsa-p256"))
    assert "terms of service" in str(info.value) and accounts.saves == 0
    issuer.close()


def test_external_account_binding(pebble_factory: Callable[..., PebbleEnv], accounts: MemoryAccounts,
                                  tmp_path: Path) -> None:
    """A CA requiring EAB: missing credentials is a config error; with eab_kid/eab_hmac_key it works."""
    hmac_key = base64.urlsafe_b64encode(b"certd-test-hmac-key-0123456789ab").decode().rstrip("=")
    ca = pebble_factory(config={"externalAccountBindingRequired": True,
                                "externalAccountMACKeys": {"kid-1": hmac_key}})
    cert = http_cert(ca, "eab.example.test")
    without = connect(acme_for(ca), accounts, SystemClock())
    with pytest.raises(ConfigError, match="eab_kid"):
        without.issue(cert, generate_private_key("ecdsa-p256"))
    with_eab = connect(acme_for(ca, eab_kid="kid-1", eab_hmac_key=hmac_key), accounts, SystemClock())
    try:
        issue_checked(with_eab, ca, cert, tmp_path)
    finally:
        with_eab.close()
        without.close()


# --- failures ----------------------------------------------------------------------------------


def test_bad_nonce_storm(pebble_factory: Callable[..., PebbleEnv], make_issuer: Callable[..., Issuer],
                         tmp_path: Path) -> None:
    """With half of all nonces rejected (PEBBLE_WFE_NONCEREJECT=50) issuance still succeeds."""
    ca = pebble_factory(env={"PEBBLE_WFE_NONCEREJECT": "50"})
    issuer = make_issuer(ca)
    for i in range(5):
        issue_checked(issuer, ca, http_cert(ca, f"nonce{i}.example.test", f"nonce{i}b.example.test"), tmp_path)


def test_stopped_ca_is_not_reachable(pebble_factory: Callable[..., PebbleEnv],
                                     make_issuer: Callable[..., Issuer]) -> None:
    """With Pebble stopped, issue() raises a transient CANotReachable with a one-line message."""
    ca = pebble_factory()
    url = ca.directory_url
    ca.stop()
    with pytest.raises(CANotReachable) as info:
        make_issuer(ca).issue(http_cert(ca, "down.example.test"), generate_private_key("ecdsa-p256"))
    assert str(info.value) == f"ACME server {url} is not reachable (connection refused); will retry"
    assert info.value.transient


def test_untrusted_ca_certificate(pebble: PebbleEnv, accounts: MemoryAccounts, tmp_path: Path) -> None:
    """An ACME server whose TLS certificate the ca_bundle does not vouch for is reported as a TLS problem."""
    other = tmp_path / "other-ca.pem"
    other.write_bytes(_cert_with_aki())
    issuer = connect(AcmeConfig(directory=pebble.directory_url, agree_tos=True, ca_bundle=other), accounts,
                    SystemClock())
    with pytest.raises(CANotReachable) as info:
        issuer.issue(http_cert(pebble, "tls.example.test"), generate_private_key("ecdsa-p256"))
    assert str(info.value) == (f"ACME server {pebble.directory_url} is not reachable (TLS error: its certificate "
                               "is not trusted; set [acme] ca_bundle); will retry")
    issuer.close()


def test_ca_stopped_after_account_setup(pebble_factory: Callable[..., PebbleEnv],
                                        make_issuer: Callable[..., Issuer], tmp_path: Path) -> None:
    """A CA that goes away between two orders gives CANotReachable too (not a raw requests error)."""
    ca = pebble_factory()
    issuer = make_issuer(ca)
    issue_checked(issuer, ca, http_cert(ca, "up.example.test"), tmp_path)
    ca.stop()
    with pytest.raises(CANotReachable, match="is not reachable"):
        issuer.issue(http_cert(ca, "down.example.test"), generate_private_key("ecdsa-p256"))
    with pytest.raises(CANotReachable, match="is not reachable"):
        issuer.revoke(_cert_with_aki(), 4)
    with pytest.raises(CANotReachable, match="is not reachable"):
        issuer.renewal_info(_cert_with_aki())


def _cert_with_aki(serial: int = 0x80AB, not_after: datetime | None = None) -> bytes:
    """A self-signed certificate with an authority key identifier and the given serial."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aki.example.test")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(now - timedelta(hours=2))
            .not_valid_after(not_after or now + timedelta(days=1))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_failed_validation_names_domain_and_challenge(pebble: PebbleEnv, make_issuer: Callable[..., Issuer],
                                                      tmp_path: Path) -> None:
    """A dns-01 hook that sets nothing: ChallengeFailed names the domain, the challenge and the CA's reason."""
    hook = tmp_path / "noop-hook"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    cert = CertificateConfig(name="nope", domains=("*.nope.example.test",), challenge="dns-01",
                             dns01_hook=(str(hook),))
    with pytest.raises(ChallengeFailed) as info:
        make_issuer(pebble).issue(cert, generate_private_key("ecdsa-p256"))
    msg = str(info.value)
    assert "issuing nope: the CA could not validate dns-01 for *.nope.example.test" in msg
    assert info.value.detail and info.value.detail.split()[0] in msg
    assert info.value.problem_type and info.value.problem_type.startswith("urn:ietf:params:acme:error:")
    assert "\n" not in msg and msg.endswith("; will retry") and info.value.transient


def test_failing_hook_is_reported(pebble: PebbleEnv, make_issuer: Callable[..., Issuer], tmp_path: Path) -> None:
    """A dns-01 hook exiting non-zero stops the order with its exit code and stderr."""
    hook = tmp_path / "bad-hook"
    hook.write_text("#!/bin/sh\necho 'API token rejected' >&2\nexit 3\n")
    hook.chmod(0o755)
    cert = CertificateConfig(name="hookfail", domains=("hook.example.test",), challenge="dns-01",
                             dns01_hook=(str(hook),))
    with pytest.raises(ChallengeFailed, match=r"set hook\.example\.test exited 3: API token rejected; will retry"):
        make_issuer(pebble).issue(cert, generate_private_key("ecdsa-p256"))


def test_http01_port_in_use(pebble: PebbleEnv, make_issuer: Callable[..., Issuer]) -> None:
    """If another program holds the http-01 port, the error says so."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        cert = CertificateConfig(name="busy", domains=("busy.example.test",), http01_listen=Listen("127.0.0.1", port))
        with pytest.raises(ChallengeFailed, match=f"cannot listen on 127.0.0.1:{port}: address already in use"):
            make_issuer(pebble).issue(cert, generate_private_key("ecdsa-p256"))


def test_rejected_identifier_is_final(pebble_factory: Callable[..., PebbleEnv],
                                      make_issuer: Callable[..., Issuer]) -> None:
    """A name the CA will never issue for gives a non-transient AcmeError with the problem type."""
    ca = pebble_factory(config={"domainBlocklist": ["blocked.example.test"]})
    cert = http_cert(ca, "fine.example.test", "blocked.example.test")
    with pytest.raises(AcmeError) as info:
        make_issuer(ca).issue(cert, generate_private_key("ecdsa-p256"))
    assert info.value.problem_type == "urn:ietf:params:acme:error:rejectedIdentifier"
    assert not info.value.transient and "change the domains" in str(info.value)
    assert "not retrying" not in str(info.value)  # how long certd waits is certd.core.retry's to say


def test_retry_after_is_honoured(pebble_factory: Callable[..., PebbleEnv], make_issuer: Callable[..., Issuer],
                                 tmp_path: Path) -> None:
    """A CA sending Retry-After on pending orders still gets its certificate, within a few seconds."""
    ca = pebble_factory(retry_after=1)
    issue_checked(make_issuer(ca, order_timeout=20), ca, http_cert(ca, "later.example.test"), tmp_path)


# --- ARI, replaces, revocation -----------------------------------------------------------------


def test_renewal_info_for_fresh_cert(pebble: PebbleEnv, make_issuer: Callable[..., Issuer], tmp_path: Path) -> None:
    """ARI gives an aware-UTC window inside the certificate's lifetime and a retry time from Retry-After."""
    issuer = make_issuer(pebble)
    bundle = issue_checked(issuer, pebble, http_cert(pebble, "ari.example.test"), tmp_path)
    before = datetime.now(timezone.utc)
    info = issuer.renewal_info(bundle.cert_pem)
    assert isinstance(info, RenewalInfo)
    cert = CertInfo.from_pem(bundle.cert_pem)
    assert info.window_start.tzinfo == timezone.utc and info.retry_after.tzinfo == timezone.utc
    assert cert.not_before < info.window_start < info.window_end < cert.not_after
    # Pebble sends Retry-After: 21600 (6 h)
    assert before + timedelta(hours=6) - timedelta(seconds=5) <= info.retry_after <= \
        datetime.now(timezone.utc) + timedelta(hours=6, seconds=5)


def test_renewal_info_none_without_aki_or_after_expiry(pebble: PebbleEnv, make_issuer: Callable[..., Issuer],
                                                       tmp_path: Path) -> None:
    """No ARI request for a certificate without AKI, nor for an expired one (RFC 9773 §4.3)."""
    from tests.support.server_fixtures import TestCA
    issuer = make_issuer(pebble)
    no_aki = TestCA(tmp_path).issue("x.example.test").cert_pem
    assert issuer.renewal_info(no_aki) is None
    assert issuer.renewal_info(_cert_with_aki(not_after=datetime.now(timezone.utc) - timedelta(minutes=1))) is None


@pytest.mark.parametrize("serial, encoded", [(0x80AB, "AICr"), (0x7F, "fw"), (0x1234, "EjQ")])
def test_ari_cert_id(serial: int, encoded: str) -> None:
    """The ARI identifier is base64url(AKI) "." base64url(DER serial, with a 0x00 before a set top bit)."""
    pem = _cert_with_aki(serial)
    cert = x509.load_pem_x509_certificate(pem)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki is not None
    assert ari_cert_id(pem) == base64.urlsafe_b64encode(aki).decode().rstrip("=") + "." + encoded


def test_replaces_is_accepted_and_falls_back(pebble: PebbleEnv, make_issuer: Callable[..., Issuer],
                                             tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A renewal order naming the old certificate is accepted; naming it again (alreadyReplaced) retries without it."""
    issuer = make_issuer(pebble)
    cert = http_cert(pebble, "renew.example.test")
    first = issue_checked(issuer, pebble, cert, tmp_path)
    for _ in range(5):  # Pebble cannot find some of its own serials by ARI identifier (ari_finds)
        if ari_finds(first.cert_pem):
            break
        first = issue_checked(issuer, pebble, cert, tmp_path)
    caplog.set_level(logging.WARNING, logger="certd.issuer")
    steps: list[str] = []
    issue_checked(issuer, pebble, cert, tmp_path, replaces=ari_cert_id(first.cert_pem), progress=steps.append)
    assert not any("refused replaces" in s for s in steps)
    assert "replaces_refused" not in caplog.text
    issue_checked(issuer, pebble, cert, tmp_path, replaces=ari_cert_id(first.cert_pem), progress=steps.append)
    assert any("refused replaces" in s for s in steps)
    assert "replaces_refused" in caplog.text


def test_replaces_naming_a_certificate_the_ca_cannot_find_falls_back(
        pebble: PebbleEnv, make_issuer: Callable[..., Issuer], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """replaces naming a serial the CA has no order for (Pebble: serverInternal; it also says so for its
    own serials whose DER form needs a leading zero byte) orders without it instead of failing for ever."""
    issuer = make_issuer(pebble)
    cert = http_cert(pebble, "unknown-predecessor.example.test")
    first = issue_checked(issuer, pebble, cert, tmp_path)
    aki = ari_cert_id(first.cert_pem).split(".")[0]
    unknown = aki + "." + base64.urlsafe_b64encode(b"\x00\xf6\x7f\x74\x4d\x2c\x4f\xb4").decode().rstrip("=")
    caplog.set_level(logging.WARNING, logger="certd.issuer")
    steps: list[str] = []
    issue_checked(issuer, pebble, cert, tmp_path, replaces=unknown, progress=steps.append)
    assert any("refused replaces (serverInternal)" in s for s in steps), steps


def test_revoke(pebble: PebbleEnv, make_issuer: Callable[..., Issuer], tmp_path: Path) -> None:
    """revoke() with the account key: Pebble's management API reports the certificate Revoked with our reason."""
    issuer = make_issuer(pebble)
    bundle = issue_checked(issuer, pebble, http_cert(pebble, "revoke.example.test"), tmp_path)
    serial = bundle.info.serial
    assert pebble.cert_status(serial)["Status"] == "Valid"
    issuer.revoke(bundle.fullchain_pem, 4)  # superseded
    status = pebble.cert_status(serial)
    assert status["Status"] == "Revoked" and status["Reason"] == 4
    issuer.revoke(bundle.cert_pem, 4)  # again: already revoked is fine


class _Stop(Exception):
    """Raised from ``on_order``: the order stays pending at the CA, as a process killed there leaves it."""


def _pending_order(issuer: Issuer, cert: CertificateConfig) -> str:
    """Place an order for ``cert`` and leave it pending (its URL never journaled)."""
    placed: list[str] = []

    def stop(url: str, _profile: str | None = None) -> None:
        placed.append(url)
        raise _Stop(url)
    with pytest.raises(AcmeError):
        issuer.issue(cert, generate_private_key("ecdsa-p256"), on_order=stop)
    return placed[0]


def test_the_orders_list_finds_only_an_intents_own_order(pebble_factory: Callable[..., PebbleEnv],
                                                         make_issuer: Callable[..., Issuer], tmp_path: Path) -> None:
    """Pebble listing 2 orders a page: an intent finds the one pending order for exactly its names, across pages, and none when two fit or another certificate holds it; a valid one only with its own key and while no stored version is as new."""
    ca = pebble_factory(config={"ordersPerPage": 2})
    issuer = make_issuer(ca)
    cert = http_cert(ca, "find.example.test", "www.find.example.test")
    key, other_key = generate_private_key("ecdsa-p256"), generate_private_key("ecdsa-p256")

    def find(c: CertificateConfig, k: bytes, **kw: Any) -> str | None:
        return issuer.find_order(c, k, **kw)[0]

    assert find(cert, key) is None  # an account without orders

    issued = CertInfo.from_pem(issuer.issue(cert, key))
    valid = find(cert, key)
    assert valid is not None and "order" in valid
    assert find(cert, key, newer_than=issued.not_before) is None, "a stored certificate's order"
    assert find(cert, other_key) is None, "another key's certificate"

    subset = http_cert(ca, "find.example.test", name="subset")
    others = [_pending_order(issuer, subset) for _ in range(2)]
    pending = _pending_order(issuer, cert)
    assert len({pending, *others}) == 3  # 4 orders in all: two pages
    assert find(cert, other_key) == pending
    assert find(cert, other_key, twins=Twins(frozenset({pending}))) is None, "another certificate holds it"
    assert find(cert, key) == valid, "issued with this key already: only the download is left"
    assert find(subset, other_key) is None, "two pending orders fit: which one is unknown"
    assert find(subset, other_key, twins=Twins(frozenset({others[0]}))) == others[-1]
    assert find(http_cert(ca, "nowhere.example.test", name="x"), key) is None
