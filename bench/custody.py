"""What key custody ([keys]) costs, on a real state directory (no CA needed).

Prints, with and without [keys]:
  - seal + open of one key in memory (the cryptography alone);
  - storing a version (FileStore.add_version: a fsynced version directory) and loading it back;
  - the status path (load_info, which never opens a key) over N certificates;
and, with [keys]:
  - sealing an existing state directory of N certificates (what adding [keys] does once);
  - re-wrapping every key under a new KEK (certd kek rotate) over N certificates.

Usage: .venv/bin/python bench/custody.py [--count N] (default 10000; --count 1000 for a quick run)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certd.crypto.custody import FileKek, KeyRing, new_kek_secret  # noqa: E402
from certd.crypto.kekload import create_kek_file  # noqa: E402
from certd.store.files import FileStore  # noqa: E402
from tests.support.certs import make_bundle  # noqa: E402


def timed(fn: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def fill(store: FileStore, n: int) -> None:
    bundle = make_bundle()
    for i in range(n):
        name = f"c{i:05d}"
        with store.lock(name):
            v = store.add_version(name, bundle, {"reason": "bench"})
            store.set_current(name, v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=10000)
    args = ap.parse_args()
    n = args.count
    bundle = make_bundle()
    ring = KeyRing(FileKek(new_kek_secret(), "bench"))
    sealed = ring.seal(bundle.key_pem, "version/x/1")
    print(f"seal one key: {timed(lambda: ring.seal(bundle.key_pem, 'version/x/1'), 2000) * 1e6:.1f} us; "
          f"open: {timed(lambda: ring.open(sealed, 'version/x/1'), 2000) * 1e6:.1f} us")
    with tempfile.TemporaryDirectory(prefix="certd-custody-") as tmp:
        for label, keyring in (("plain", None), ("sealed", ring)):
            store = FileStore(Path(tmp) / label, keyring=keyring)
            counter = iter(range(10**6))

            def add() -> None:
                name = f"a{next(counter)}"
                with store.lock(name):
                    store.add_version(name, bundle, {})
            add_s = timed(add, 200)
            load_s = timed(lambda: store.load("a0", 1), 500)
            print(f"{label}: add_version {add_s * 1e3:.2f} ms, load {load_s * 1e3:.3f} ms (medians)")
        plain = FileStore(Path(tmp) / "big")
        t = time.perf_counter()
        fill(plain, n)
        print(f"filled {n} certificates (plain) in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        for i in range(n):
            plain.load_info(f"c{i:05d}", 1)
        print(f"status path (load_info) over {n}: {time.perf_counter() - t:.2f} s, plain")
        store = FileStore(Path(tmp) / "big", keyring=ring)
        t = time.perf_counter()
        count = len(store.keys.seal_existing())
        print(f"sealing an existing state dir: {count} keys in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        for i in range(n):
            store.load_info(f"c{i:05d}", 1)
        print(f"status path (load_info) over {n}: {time.perf_counter() - t:.2f} s, sealed")
        t = time.perf_counter()
        FileStore(Path(tmp) / "big", keyring=ring).keys.seal_existing()
        print(f"start-up check once sealed (the keys.sealed mark): {(time.perf_counter() - t) * 1e3:.2f} ms")
        create_kek_file(Path(tmp) / "new")
        new = FileKek.load(Path(tmp) / "new")
        store.keys.begin_rotation(new, str(Path(tmp) / "new"), "now")
        t = time.perf_counter()
        done = store.keys.rewrap_all()
        print(f"KEK rotation: {done} keys re-wrapped in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
