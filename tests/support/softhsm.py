"""A real PKCS#11 token for a test: SoftHSM2 (Debian's ``softhsm2``) with its own config.

Fixture (registered as a pytest plugin by ``tests/conftest.py``):

- ``softhsm`` -> :class:`SoftHsmToken`: a token initialised for this test only, in a token
  directory under ``tmp_path`` named by a ``SOFTHSM2_CONF`` of its own. Unpacks as
  ``uri, module, pin_file = softhsm`` (what ``[keys]`` needs); ``.env`` is the environment a
  process needs to find the token (give it to CertdEnv's ``extra_env``); ``.remove()`` /
  ``.replug()`` take the token away and bring it back (its directory moved out and in).

SoftHSM2 reads ``SOFTHSM2_CONF`` when a process initialises the module, once: a process can
never switch to another test's token, and must not finalise and re-initialise the module either
(that breaks its OpenSSL, see certd/crypto/pkcs11kek.py). So token work runs in processes of
its own (certd's, or a short ``python -c``), never in pytest's; each token still gets a label of
its own, so one process can never mistake an earlier test's token for this one.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
SOFTHSM2_UTIL = "softhsm2-util"
TOKEN_LABEL = "certd test"   # and a number; a space: the URI percent-encodes it (RFC 7512)
KEY_LABEL = "kek"
PIN = "4711-certd"
SO_PIN = "so-0815-certd"
# Each token gets its own label: a process that loaded SoftHSM2 under an earlier test's
# SOFTHSM2_CONF still lists that test's token, and must not find it under this test's name.
_serial = itertools.count(1)


class SoftHsmToken:
    """One initialised SoftHSM2 token (no objects on it yet)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.tokendir = base / "tokens"
        self.conf = base / "softhsm2.conf"
        self.pin_file = base / "pin"
        self.module = MODULE
        self.label = f"{TOKEN_LABEL} {os.getpid()}-{next(_serial)}"
        self.uri = f"pkcs11:token={self.label.replace(' ', '%20')};object={KEY_LABEL}"
        self.away = base / "removed-token"

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def __iter__(self) -> Iterator[object]:
        return iter((self.uri, self.module, self.pin_file))

    def init(self) -> None:
        self.tokendir.mkdir(parents=True)
        self.conf.write_text(f"directories.tokendir = {self.tokendir}\nobjectstore.backend = file\n"
                             "log.level = ERROR\nslots.removable = false\n")
        self.pin_file.write_text(PIN + "\n")
        self.pin_file.chmod(0o600)
        r = subprocess.run([SOFTHSM2_UTIL, "--init-token", "--free", "--label", self.label, "--pin", PIN,
                            "--so-pin", SO_PIN], capture_output=True, text=True, env=self._util_env(), timeout=30)
        if r.returncode != 0:
            pytest.fail(f"softhsm2-util --init-token failed ({r.returncode}): {r.stdout}{r.stderr}")

    def token_dir(self) -> Path:
        """The token's own directory inside the token directory (SoftHSM2 names it by a UUID)."""
        (only,) = [p for p in self.tokendir.iterdir() if p.is_dir()]
        return only

    def remove(self) -> None:
        """Unplug: the token's directory moves out of SoftHSM2's sight."""
        self.token_dir().rename(self.away)

    def replug(self) -> None:
        self.away.rename(self.tokendir / "replugged")

    def _util_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}


@pytest.fixture
def softhsm(tmp_path: Path) -> SoftHsmToken:
    """A SoftHSM2 token private to this test (its ``.env`` names its SOFTHSM2_CONF)."""
    if not MODULE.is_file():
        pytest.fail(f"{MODULE} is missing: run scripts/setup.sh (it installs Debian's softhsm2)")
    token = SoftHsmToken(tmp_path / "softhsm")
    token.init()
    return token
