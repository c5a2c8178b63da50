#!/usr/bin/env python3
"""Write a throwaway CA and a ``localhost`` certificate for Pebble's own HTTPS listeners.

Pebble ships no certificate for its ACME (directory) and management listeners. This makes:

    <dir>/ca.pem    the CA that clients trust (``ClientNetwork(verify_ssl=...)``, curl --cacert)
    <dir>/ca.key    its key (0600)
    <dir>/cert.pem  leaf for DNS:localhost, IP:127.0.0.1, IP:::1, signed by the CA
    <dir>/key.pem   its key (0600)

This CA only protects the transport to Pebble; it has nothing to do with the roots Pebble
issues certificates from (those are random per start: fetch them from the management API).

Usage: ``python3 pebble/gen_certs.py DIR [--days N]``. Importable: :func:`write_certs`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LEAF_NAMES = ("localhost",)
LEAF_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class CertPaths:
    """Where :func:`write_certs` put each file."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte (replacing any file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (0644) via a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_certs(directory: Path, days: int = 365) -> CertPaths:
    """Create ``directory`` if needed and write a fresh CA + leaf into it (see module doc)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Backdate a little so a clock a few minutes behind still accepts the certificates.
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certd test Pebble transport CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    leaf_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in LEAF_NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in LEAF_IPS]
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    paths = CertPaths(
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca.key",
        cert=directory / "cert.pem",
        key=directory / "key.pem",
    )
    _write_private(paths.ca_key, _key_pem(ca_key))
    _write_private(paths.key, _key_pem(leaf_key))
    _write_public(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_public(paths.cert, leaf_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; prints the paths it wrote."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="where to write ca.pem, cert.pem, ...")
    parser.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    args = parser.parse_args(argv)
    paths = write_certs(args.directory, days=args.days)
    for path in (paths.ca_cert, paths.ca_key, paths.cert, paths.key):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
