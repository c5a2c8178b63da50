"""IP address identifiers (RFC 8738) against real Pebble 2.10: an order for 127.0.0.1, validated
by http-01 and by tls-alpn-01 (the CA connects to the address itself; tls-alpn-01 sends the
reverse-DNS name as SNI), deployed behind nginx and verified by a handshake that sends no SNI."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.support.certd_env import CertdEnv, key_matches

IP = "127.0.0.1"


def leaf_without_sni(port: int) -> x509.Certificate:
    """What nginx serves to a client that sends no SNI (as for an IP address)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_an_ip_only_certificate_is_issued_served_and_verified(tmp_path: Path, pebble: Any, nginx_factory: Any,
                                                              challenge: str) -> None:
    """ip_addresses = ["127.0.0.1"] alone: the CA validates the address, nginx serves a
    certificate whose only name is that iPAddress SAN, and certd's verification (no SNI) passes."""
    env = CertdEnv(tmp_path, pebble)
    env.refresh_root()
    live = tmp_path / "live" / "ip"
    solver = ({"http01_listen": f"127.0.0.1:{pebble.http_port}"} if challenge == "http-01"
              else {"tlsalpn01_listen": f"127.0.0.1:{pebble.tls_port}"})
    cert = {"name": "ip", "domains": [], "ip_addresses": [IP], "challenge": challenge, **solver,
            "deploy": {"live_dir": str(live)}}
    env.write_config([cert])
    env.run("renew", "--all", check=0)
    nginx = nginx_factory(live / "fullchain.pem", live / "privkey.pem")
    env.write_config([{**cert, "reload": [{"hook": "nginx", "config": str(nginx.config)}],
                       "verify": [{"endpoint": f"127.0.0.1:{nginx.port}", "ca_bundle": str(env.root_path)}]}])
    r = env.run("renew", "--force", "ip", check=0)
    assert "verified" in r.stdout or "renewed" in r.stdout
    row = env.status("ip")["ip"]
    assert row["ip_addresses"] == [IP] and row["domains"] == [] and row["version"] == 2
    served = leaf_without_sni(nginx.port)
    assert sans(served) == ([], [IP])
    assert key_matches(live / "fullchain.pem", live / "privkey.pem")
    assert env.run("verify", "ip", check=0).returncode == 0


def test_ip_addresses_need_http01_or_tlsalpn01(tmp_path: Path, pebble: Any) -> None:
    """dns-01 cannot validate an IP address: check-config says so; a bad address is named."""
    env = CertdEnv(tmp_path, pebble)
    env.write_config([env.dns_cert("www", ["www.example.test"], ip_addresses=[IP, "300.1.1.1"])])
    r = env.run("check-config", check=2)
    assert "only be validated with http-01 or tls-alpn-01" in r.stderr and "'300.1.1.1' is not an IP address" in r.stderr
