"""The test environment is real: Pebble 2.10 with ARI, challtestsrv DNS, private instances."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.pebble_fixtures import PebbleEnv, PebblePorts, dns_query
from tests.support.procs import ManagedProcess, ProcessFailed, WaitTimeout, wait_until


def test_directory_advertises_ari(pebble: PebbleEnv) -> None:
    """The shared Pebble's directory has renewalInfo (ARI), i.e. it is Pebble >= 2.6."""
    directory = pebble.directory()
    assert directory["renewalInfo"].startswith(f"https://127.0.0.1:{pebble.ports.acme}/")
    assert directory["newOrder"].startswith("https://127.0.0.1:")


def test_shared_pebble_is_deterministic(pebble: PebbleEnv) -> None:
    """The shared Pebble runs without VA sleeps, nonce rejection or authz reuse."""
    log = pebble.log_text()
    assert "Disabling random VA sleeps" in log
    assert "reject 0% of good nonces" in log
    assert "authz reuse for each identifier 0% of the time" in log


def test_management_api_serves_a_ca_root(pebble: PebbleEnv, tmp_path: Path) -> None:
    """/roots/0 and /intermediates/0 return a self-signed root and an intermediate it signed."""
    root = x509.load_pem_x509_certificate(pebble.write_root(tmp_path / "root.pem").read_bytes())
    intermediate = x509.load_pem_x509_certificate(pebble.intermediate_pem().encode())
    assert root.subject == root.issuer
    assert intermediate.issuer == root.subject
    intermediate.verify_directly_issued_by(root)


def test_challtestsrv_answers_any_name_with_loopback(pebble: PebbleEnv) -> None:
    """challtestsrv's DNS answers A 127.0.0.1 for any name and no AAAA (so Pebble dials IPv4)."""
    assert pebble.resolve_a("anything.example.test") == ["127.0.0.1"]
    assert dns_query("anything.example.test", pebble.dns_port, qtype=28) == []


def test_challtestsrv_serves_txt_records(pebble: PebbleEnv) -> None:
    """/set-txt makes the DNS serve the TXT value; /clear-txt removes it."""
    host = "_acme-challenge.txt.example.test."
    pebble.set_txt(host, "token-value-123")
    try:
        assert pebble.resolve_txt(host) == ["token-value-123"]
    finally:
        pebble.clear_txt(host)
    assert pebble.resolve_txt(host) == []


def test_private_instance_with_custom_validity(pebble_factory: Callable[..., PebbleEnv], pebble: PebbleEnv) -> None:
    """pebble_factory(validity=...) starts a separate instance configured as asked."""
    private = pebble_factory(validity=120, env={"PEBBLE_WFE_NONCEREJECT": "50"})
    assert private.ports.acme != pebble.ports.acme
    assert private.pebble_pid != pebble.pebble_pid
    assert "renewalInfo" in private.directory()
    log = private.log_text()
    assert "certificate validity period of 120 seconds" in log
    assert "reject 50% of good nonces" in log
    assert private.root_pem() != pebble.root_pem()


def test_restart_keeps_ports_and_renews_state(pebble_factory: Callable[..., PebbleEnv]) -> None:
    """kill() then start() brings Pebble back on the same ports with a new root."""
    private = pebble_factory()
    url, old_root, old_pid = private.directory_url, private.root_pem(), private.pebble_pid
    private.kill()
    assert not private.alive
    with pytest.raises(OSError):
        private.directory()
    private.start()
    assert private.directory_url == url
    assert private.pebble_pid != old_pid
    assert private.root_pem() != old_root


def test_cert_status_of_unknown_serial_is_an_error(pebble: PebbleEnv) -> None:
    """/cert-status-by-serial answers 404 for a serial Pebble never issued."""
    with pytest.raises(AssertionError, match="HTTP 404"):
        pebble.cert_status("00:DE:AD:BE:EF")


def test_pebble_that_cannot_bind_fails_with_its_log_and_leaks_nothing(tmp_path: Path) -> None:
    """A Pebble whose port is taken raises ProcessFailed quoting its log; both PIDs are gone."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        ports = PebblePorts.pick()
        ports = PebblePorts(**{**ports.__dict__, "acme": blocker.getsockname()[1]})
        env = PebbleEnv(tmp_path, ports=ports)
        with pytest.raises(ProcessFailed, match="(?s)pebble.*address already in use"):
            env.start()
    for pid in (env.pebble_pid, env.challtestsrv_pid):
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_failed_start_reports_log_tail(tmp_path: Path) -> None:
    """A process that exits before it is ready fails with the tail of its log."""
    proc = ManagedProcess(
        ["/bin/sh", "-c", "echo 'bind: address already in use' >&2; exit 3"],
        log_path=tmp_path / "sh.log",
        name="failing",
    ).start()
    with pytest.raises(ProcessFailed, match="(?s)exit status 3.*address already in use"):
        proc.wait_ready(lambda: False, timeout=5, what="never")


def test_wait_until_names_what_it_waited_for() -> None:
    """wait_until raises a timeout naming what it waited for and the last ignored error."""
    def refuse() -> bool:
        raise ConnectionRefusedError("nope")

    with pytest.raises(WaitTimeout, match=r"waiting for the thing.*nope"):
        wait_until(refuse, timeout=0.05, what="the thing", ignore=(OSError,))


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    """stop() kills a process that ignores SIGTERM after its deadline, and reaps it."""
    proc = ManagedProcess(
        ["/bin/sh", "-c", "trap '' TERM; echo sigterm-ignored; while :; do sleep 0.05; done"],
        log_path=tmp_path / "sh.log",
    ).start()
    proc.wait_ready(lambda: "sigterm-ignored\n" in proc.log_text(), timeout=5, what="trap set")
    assert proc.stop(timeout=0.2) == -9
    assert not proc.alive
    assert proc.pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
