#!/usr/bin/env python3
"""How long `certd backup export` and `certd backup restore` take, and how large the archive is.

    .venv/bin/python bench/backup.py                      # 1,000 certificates x 3 versions, [keys]
    .venv/bin/python bench/backup.py --certs 100 --plain  # smaller, keys stored unencrypted

Builds a synthetic state dir with :class:`certd.store.files.FileStore` (keys sealed under a
fresh KEK unless ``--plain``): leaves signed by a throwaway root -> intermediate, ECDSA P-256,
like a test CA's, plus one ACME account. Then times, in this process (no interpreter start-up),
the same calls the CLI makes: :func:`certd.store.backup.export` to a generated age recipient,
and :func:`certd.store.backup.restore` into an empty state dir sealed under another KEK. The
export is also split into its parts (reading and opening the keys, packing, encrypting).
Everything lives in a temporary directory (``--dir``'s parent; default: the system's), removed
at the end. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certd.core.clock import SystemClock  # noqa: E402
from certd.core.model import Bundle  # noqa: E402
from certd.crypto.custody import FileKek, KeyRing  # noqa: E402
from certd.store import backup  # noqa: E402
from certd.store.backupformat import pack  # noqa: E402
from certd.store.files import FileStore  # noqa: E402

ACME = "https://127.0.0.1:14000/dir"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TestCA:
    """A root and an intermediate; leaves for a name, 90 days, signed by the intermediate."""

    def __init__(self) -> None:
        now = datetime.now(timezone.utc)
        self.now = now
        root_key = ec.generate_private_key(ec.SECP256R1())
        self.int_key = ec.generate_private_key(ec.SECP256R1())
        root = self._ca(_name("bench root"), root_key.public_key(), _name("bench root"), root_key)
        self.intermediate = self._ca(_name("bench intermediate"), self.int_key.public_key(), root.subject, root_key)

    def _ca(self, subject: x509.Name, public: ec.EllipticCurvePublicKey, issuer: x509.Name,
            signer: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
                .serial_number(x509.random_serial_number()).not_valid_before(self.now - timedelta(days=1))
                .not_valid_after(self.now + timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(signer, hashes.SHA256()))

    def leaf(self, domain: str) -> Bundle:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(domain)).issuer_name(self.intermediate.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(self.now - timedelta(hours=1)).not_valid_after(self.now + timedelta(days=90))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
                .sign(self.int_key, hashes.SHA256()))
        return Bundle(_pem(cert), _pem(self.intermediate), _key_pem(key))


def build(root: Path, certs: int, versions: int, keyring: KeyRing | None) -> FileStore:
    ca = TestCA()
    store = FileStore(root, keyring=keyring)
    for i in range(certs):
        name = f"c{i:05d}"
        with store.lock(name):
            for _ in range(versions):
                v = store.add_version(name, ca.leaf(f"{name}.example.test"), {"initiator": "bench"})
            store.set_current(name, v)
            store.save_state(name, {"last_result": "renewed", "failures": 0})
    store.save_account(ACME, _key_pem(ec.generate_private_key(ec.SECP256R1())), '{"body": {}, "uri": "x"}')
    return store


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--certs", type=int, default=1000)
    p.add_argument("--versions", type=int, default=3)
    p.add_argument("--plain", action="store_true", help="no [keys]: keys stored unencrypted on both sides")
    p.add_argument("--dir", type=Path, default=None, help="parent of the temporary directory")
    args = p.parse_args()
    pyrage = backup.age()
    identity = pyrage.x25519.Identity.generate()
    recipient = str(identity.to_public())
    work = Path(tempfile.mkdtemp(prefix="certd-bench-backup-", dir=args.dir))
    try:
        id_path = work / "identity.txt"
        id_path.touch(mode=0o600)
        id_path.write_text(f"{identity}\n")

        def ring() -> KeyRing | None:
            return None if args.plain else KeyRing(FileKek(os.urandom(32), "bench"))

        t = time.perf_counter()
        src = build(work / "src", args.certs, args.versions, ring())
        print(f"built {args.certs} certificates x {args.versions} versions ({'plain' if args.plain else 'sealed'}) "
              f"in {time.perf_counter() - t:.1f} s under {work}", flush=True)
        clock = SystemClock()
        archive = work / "backup.age"

        t = time.perf_counter()
        snap = backup.collect(src)
        t_collect = time.perf_counter() - t
        t = time.perf_counter()
        packed = pack(snap, {"created": "bench"})
        t_pack = time.perf_counter() - t
        t = time.perf_counter()
        pyrage.encrypt(packed, [pyrage.x25519.Recipient.from_str(recipient)])
        t_encrypt = time.perf_counter() - t
        del snap, packed

        t = time.perf_counter()
        done = backup.export(src, archive, recipient, initiator="bench", clock=clock)
        t_export = time.perf_counter() - t
        dst = FileStore(work / "dst", keyring=ring())
        t = time.perf_counter()
        got = backup.restore(dst, archive, id_path, initiator="bench", clock=clock)
        t_restore = time.perf_counter() - t
        assert got.versions == done.versions == args.certs * args.versions

        print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
              f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
        print(f"export:  {t_export:6.2f} s  (read + open keys {t_collect:.2f} s, pack {t_pack:.2f} s, "
              f"encrypt {t_encrypt:.2f} s; the rest is the fsynced write)")
        print(f"restore: {t_restore:6.2f} s  ({done.versions} versions written, fsynced and "
              f"{'stored plain' if args.plain else 're-sealed under another KEK'})")
        print(f"archive: {done.size} bytes ({done.size / done.versions:.0f} bytes per version)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
