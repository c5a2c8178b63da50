#!/usr/bin/env python3
"""KEK benchmark (issue 15 item 3): what a KEK held in a PKCS#11 token costs per stored key.

Makes its own SoftHSM2 token (a SOFTHSM2_CONF and token directory under a temp dir, as
tests/support/softhsm.py does), generates the KEK on it as ``certd kek init`` would, then
measures in this process (no interpreter start-up in the figures), each against a KEK file
(``FileKek``, AES-256-GCM in-process) for comparison:

  open            Pkcs11Kek.open: load the module (first time only), log in, find the key
  wrap            one data key wrapped inside the token (CKM_AES_GCM)
  unwrap          the same unwrapped
  wrap+unwrap     per key: what sealing a key and opening it again costs in KEK operations
  seal+open       KeyRing.seal + KeyRing.open of an EC P-256 private key PEM (a whole sealed key)
  N threads       wrap+unwrap round trips per second with N threads sharing the KEK (the
                  daemon's workers do; the KEK serialises token calls)

Usage: .venv/bin/python bench/hsm_kek.py [--keys N] [--threads N]   (prints a table; no pass/fail)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from certd.crypto.custody import FileKek, Kek, KeyRing, new_kek_secret  # noqa: E402
from certd.crypto.pkcs11kek import Pkcs11Kek  # noqa: E402
from tests.support.softhsm import SoftHsmToken  # noqa: E402

AAD = b"certd-sealed-key/1|version/www/1"


def softhsm_version() -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "softhsm2"], capture_output=True, text=True)
    return r.stdout or "?"


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def us(xs: list[float]) -> str:
    """median and 99th percentile in microseconds"""
    p99 = sorted(xs)[max(0, int(len(xs) * 0.99) - 1)]
    return f"{statistics.median(xs) * 1e6:9.1f} {p99 * 1e6:9.1f}"


def per_key(kek: Kek, n: int) -> dict[str, list[float]]:
    dek = os.urandom(32)
    wrapped = kek.wrap(dek, AAD)
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    ring = KeyRing(kek)
    return {"wrap": timed(lambda: kek.wrap(dek, AAD), n),
            "unwrap": timed(lambda: kek.unwrap(wrapped, AAD), n),
            "wrap+unwrap": timed(lambda: kek.unwrap(kek.wrap(dek, AAD), AAD), n),
            "seal+open": timed(lambda: ring.open(ring.seal(pem, "version/www/1"), "version/www/1"), n)}


def threaded_rate(kek: Kek, threads: int, seconds: float = 2.0) -> float:
    """wrap+unwrap round trips per second over all threads"""
    done = [0] * threads
    stop = time.monotonic() + seconds

    def work(i: int) -> None:
        dek = os.urandom(32)
        while time.monotonic() < stop:
            kek.unwrap(kek.wrap(dek, AAD), AAD)
            done[i] += 1

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    t = time.perf_counter()
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return sum(done) / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=2000, help="operations per measure (default 2000)")
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="certd-bench-hsm-"))
    token = SoftHsmToken(work)
    token.init()
    os.environ.update(token.env)   # before the module is loaded: SoftHSM2 reads it at C_Initialize
    load = os.getloadavg()

    Pkcs11Kek.generate(token.uri, token.module, token.pin_file).close()
    opens = timed(lambda: Pkcs11Kek.open(token.uri, token.module, token.pin_file).close(), 50)
    hsm = Pkcs11Kek.open(token.uri, token.module, token.pin_file)
    kek_file = work / "kek"
    kek_file.write_bytes(new_kek_secret())
    kek_file.chmod(0o600)
    filekek = FileKek.load(kek_file)
    rows = {"SoftHSM2 token": per_key(hsm, args.keys), "KEK file": per_key(filekek, args.keys)}
    rates = {name: threaded_rate(k, args.threads) for name, k in (("SoftHSM2 token", hsm), ("KEK file", filekek))}

    print(f"\nKEK benchmark: {args.keys} operations per measure, SoftHSM2 "
          f"{softhsm_version()}, "
          f"load average {load[0]:.2f} -> {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'measure (µs per key)':28} {'token med':>9} {'p99':>9} {'file med':>9} {'p99':>9}")
    print(f"{'open (log in, find the key)':28} {us(opens)} {'-':>9} {'-':>9}")
    for measure in ("wrap", "unwrap", "wrap+unwrap", "seal+open"):
        print(f"{measure:28} {us(rows['SoftHSM2 token'][measure])} {us(rows['KEK file'][measure])}")
    print(f"{f'{args.threads} threads, round trips/s':28} {rates['SoftHSM2 token']:9.0f} {'':9} "
          f"{rates['KEK file']:9.0f}")
    hsm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
