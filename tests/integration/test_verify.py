"""Live verification against real TLS servers: what the probe reports is what a client receives."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from certd.core.clock import FakeClock, SystemClock, isoformat
from certd.config import VerifyEndpoint
from certd.core.errors import VerificationFailed
from certd.core.model import Bundle
from certd.verify.handshake import await_served, probe
from tests.support.procs import free_port
from tests.support.server_fixtures import TestCA, fingerprint, write_combined

DOMAIN = "www.example.test"


@pytest.fixture
def served(tmp_path: Path, test_ca: TestCA, haproxy_factory):
    """HAProxy serving a fresh leaf for DOMAIN from test_ca; returns (server, bundle)."""
    bundle = test_ca.issue(DOMAIN, "example.test")
    return haproxy_factory(write_combined(tmp_path / "www.pem", bundle)), bundle


def test_probe_reports_served_leaf_valid_chain_and_name(served, test_ca: TestCA) -> None:
    """A good endpoint: the served leaf's facts, chain and name valid, no error."""
    server, bundle = served
    result = probe(VerifyEndpoint("127.0.0.1", server.port, DOMAIN, test_ca.root_path))
    assert result.info == bundle.info
    assert (result.chain_valid, result.name_valid, result.error) == (True, True, None)


def test_await_served_mismatch_names_what_was_served(served, test_ca: TestCA) -> None:
    """Expected vs served: the error names the served serial and expiry and the expected print."""
    server, bundle = served
    endpoint = VerifyEndpoint("127.0.0.1", server.port, DOMAIN, test_ca.root_path)
    expected = fingerprint(test_ca.issue(DOMAIN))
    clock = FakeClock(datetime(2026, 12, 3, tzinfo=timezone.utc))  # probes are real; the waits between them fake
    with pytest.raises(VerificationFailed) as failed:
        await_served([endpoint], expected, timeout=0.2, clock=clock)
    assert clock.monotonic() - FakeClock.MONOTONIC_START == pytest.approx(0.2)   # gave up at its timeout, not later
    message = str(failed.value)
    assert message == (f"127.0.0.1:{server.port} (SNI {DOMAIN}): served serial {bundle.info.serial} "
                       f"(not after {isoformat(bundle.info.not_after)}, fingerprint "
                       f"{bundle.info.fingerprint_sha256}), expected fingerprint {expected}")


def test_await_served_returns_at_once_when_already_served(served, test_ca: TestCA) -> None:
    """The expected leaf already served: one round of handshakes, no sleeping."""
    server, bundle = served
    endpoints = [VerifyEndpoint("127.0.0.1", server.port, DOMAIN, test_ca.root_path),
                 VerifyEndpoint("127.0.0.1", server.port, "example.test", test_ca.root_path)]
    clock = FakeClock()
    before = clock.monotonic()
    results = await_served(endpoints, fingerprint(bundle), timeout=1, clock=clock)
    assert clock.monotonic() == before  # never slept
    assert [r.info.fingerprint_sha256 for r in results if r.info] == [fingerprint(bundle)] * 2


def test_chain_against_wrong_trust_anchors(served, other_ca: TestCA) -> None:
    """Trust anchors of another CA: chain_valid False with OpenSSL's reason; leaf still reported."""
    server, bundle = served
    result = probe(VerifyEndpoint("127.0.0.1", server.port, DOMAIN, other_ca.root_path))
    assert result.info == bundle.info
    assert (result.chain_valid, result.name_valid) == (False, True)
    assert result.error == (f"chain does not validate against {other_ca.root_path}: "
                            "unable to get local issuer certificate")
    with pytest.raises(VerificationFailed, match="chain does not validate against"):
        await_served([result.endpoint], fingerprint(bundle), timeout=0.05, clock=SystemClock())


def test_server_without_intermediate_fails_chain(tmp_path: Path, test_ca: TestCA, haproxy_factory) -> None:
    """A server sending the leaf alone (no intermediate) does not validate, though the root is right."""
    bundle = test_ca.issue(DOMAIN)
    leaf_only = Bundle(bundle.cert_pem, b"", bundle.key_pem)
    server = haproxy_factory(write_combined(tmp_path / "www.pem", leaf_only))
    result = probe(VerifyEndpoint("127.0.0.1", server.port, DOMAIN, test_ca.root_path))
    assert result.info == bundle.info and not result.chain_valid and result.name_valid
    assert "unable to get local issuer certificate" in (result.error or "")


def test_system_store_rejects_private_ca(served) -> None:
    """No ca_bundle: the system store is used, and a private CA is not in it."""
    server, _ = served
    result = probe(VerifyEndpoint("127.0.0.1", server.port, DOMAIN))
    assert not result.chain_valid
    assert "against the system trust store" in (result.error or "")


def test_wrong_sni_name(served, test_ca: TestCA) -> None:
    """An SNI name the leaf does not cover: name_valid False, chain still valid, names listed."""
    server, bundle = served
    result = probe(VerifyEndpoint("127.0.0.1", server.port, "shop.example.test", test_ca.root_path))
    assert result.info == bundle.info
    assert (result.chain_valid, result.name_valid) == (True, False)
    assert result.error == ("name shop.example.test does not match the certificate "
                            f"(names: {DOMAIN}, example.test)")


def test_wildcard_name(tmp_path: Path, test_ca: TestCA, haproxy_factory) -> None:
    """A wildcard leaf covers one label, not two."""
    bundle = test_ca.issue("*.example.test")
    server = haproxy_factory(write_combined(tmp_path / "w.pem", bundle))
    assert probe(VerifyEndpoint("127.0.0.1", server.port, DOMAIN, test_ca.root_path)).ok
    deep = probe(VerifyEndpoint("127.0.0.1", server.port, "a.www.example.test", test_ca.root_path))
    assert deep.chain_valid and not deep.name_valid


def test_nothing_listening() -> None:
    """A closed port: no certificate, "connection refused", and await_served says so quickly."""
    endpoint = VerifyEndpoint("127.0.0.1", free_port(), DOMAIN)
    result = probe(endpoint)
    assert result.info is None and not result.ok
    assert result.error == "connection refused"
    clock = FakeClock(datetime(2026, 12, 3, tzinfo=timezone.utc))
    with pytest.raises(VerificationFailed) as failed:
        await_served([endpoint], "00" * 32, timeout=0.1, clock=clock)
    assert clock.monotonic() - FakeClock.MONOTONIC_START == pytest.approx(0.1)
    assert str(failed.value) == f"127.0.0.1:{endpoint.port} (SNI {DOMAIN}): connection refused"


def test_await_served_reports_every_failing_endpoint(served, test_ca: TestCA) -> None:
    """With several endpoints, the error lists each one that is wrong, and only those."""
    server, bundle = served
    good = VerifyEndpoint("127.0.0.1", server.port, DOMAIN, test_ca.root_path)
    dead = VerifyEndpoint("127.0.0.1", free_port(), DOMAIN, test_ca.root_path)
    wrong = VerifyEndpoint("127.0.0.1", server.port, "shop.example.test", test_ca.root_path)
    with pytest.raises(VerificationFailed) as failed:
        await_served([good, dead, wrong], fingerprint(bundle), timeout=0.05, clock=SystemClock())
    parts = str(failed.value).split("; ")
    assert parts == [f"{dead}: connection refused",
                     f"{wrong}: name shop.example.test does not match the certificate "
                     f"(names: {DOMAIN}, example.test)"]


def test_handshake_is_fast(served, test_ca: TestCA) -> None:
    """One verified loopback handshake stays far below the 300 ms rollback budget."""
    server, _ = served
    endpoint = VerifyEndpoint("127.0.0.1", server.port, DOMAIN, test_ca.root_path)
    probe(endpoint)  # context cached from here on
    timings = []
    for _ in range(20):
        start = time.perf_counter()
        assert probe(endpoint).ok
        timings.append(time.perf_counter() - start)
    assert sorted(timings)[len(timings) // 2] < 0.025
