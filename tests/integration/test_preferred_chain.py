"""preferred_chain against real Pebble 2.10 with two alternate roots (PEBBLE_ALTERNATE_ROOTS): the
chain certd deploys must verify against the root the configuration names, or be the CA's default
when no chain leads there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from certd.core.model import split_pem_chain
from tests.support.certd_env import CertdEnv

SNI = "www.example.test"


@pytest.fixture(scope="module")
def alternates(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.support.pebble_fixtures import PebbleEnv
    env = PebbleEnv(tmp_path_factory.mktemp("pebble-chains"), env={"PEBBLE_ALTERNATE_ROOTS": "2"})
    try:
        yield env.start()
    finally:
        env.stop()


def root(ca: Any, index: int) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.root_pem(index).encode())


def cn(name: x509.Name) -> str:
    return str(name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
        else:
            assert isinstance(key, ec.EllipticCurvePublicKey)
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    except Exception:  # noqa: BLE001 - any verification failure means "not signed by it"
        return False
    return True


def deployed_top(tmp_path: Path) -> x509.Certificate:
    chain = split_pem_chain((tmp_path / "live" / "www" / "chain.pem").read_bytes())
    return x509.load_pem_x509_certificate(chain[-1])


def issue(tmp_path: Path, ca: Any, preferred: str) -> CertdEnv:
    env = CertdEnv(tmp_path, ca)
    env.write_config([env.http_cert("www", [SNI], preferred_chain=preferred,
                                    deploy={"live_dir": str(tmp_path / "live" / "www")})])
    env.run("renew", "--all", check=0)
    return env


def test_the_preferred_alternate_chain_is_stored_and_verifies_to_its_root(tmp_path: Path, alternates: Any) -> None:
    """preferred_chain naming alternate root 2: the deployed chain's top is signed by that root."""
    default_root, wanted = root(alternates, 0), root(alternates, 2)
    assert cn(wanted.subject) != cn(default_root.subject)
    issue(tmp_path, alternates, cn(wanted.subject))
    top = deployed_top(tmp_path)
    assert cn(top.issuer) == cn(wanted.subject) and signed_by(top, wanted) and not signed_by(top, default_root)


def test_an_unknown_preferred_chain_falls_back_to_the_default(tmp_path: Path, alternates: Any) -> None:
    """A preferred_chain no chain leads to: the default chain is stored (and the renewal succeeds)."""
    issue(tmp_path, alternates, "No Such Root CA")
    assert signed_by(deployed_top(tmp_path), root(alternates, 0))
