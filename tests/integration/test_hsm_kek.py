"""A KEK held in a real PKCS#11 token (SoftHSM2): created non-extractable on the token, every
wrap and unwrap done inside it, and each way it can fail reported in one line.

No Pebble here: these tests drive certd.crypto.pkcs11kek against a token private to the test.
Every token operation runs in a fresh process, as certd's own do: a process initialises the
module once and for good (SoftHSM2's C_Finalize would break that process's OpenSSL, see
certd/crypto/pkcs11kek.py), and each test's token has a SOFTHSM2_CONF of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.softhsm import PIN, SoftHsmToken

ROOT = Path(__file__).resolve().parents[2]
AAD = "certd-sealed-key/1|version/www/1"
PRELUDE = """\
import os, sys, threading
from pathlib import Path
from certd.crypto.custody import CustodyError, KeyRing
from certd.crypto.pkcs11kek import Pkcs11Kek, TokenUnavailable
uri, module, pin_file, args = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
AAD = {aad!r}.encode()
try:
{body}
except CustodyError as e:
    print('ERROR', type(e).__name__, e)
    sys.exit(3)
"""


def in_process(softhsm: SoftHsmToken, body: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``body`` in a new interpreter with ``uri, module, pin_file, args`` and ``AAD`` set; a
    CustodyError prints ``ERROR <class> <message>`` and exits 3."""
    script = PRELUDE.format(aad=AAD, body="".join(f"    {line}\n" for line in body.splitlines()))
    return subprocess.run([sys.executable, "-c", script, softhsm.uri, str(softhsm.module), str(softhsm.pin_file),
                           *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, **softhsm.env})


def ok(r: subprocess.CompletedProcess[str]) -> list[str]:
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout}{r.stderr}"
    return r.stdout.split()


def error(r: subprocess.CompletedProcess[str], kind: str = "CustodyError") -> str:
    """The one line a CustodyError of class ``kind`` printed."""
    assert r.returncode == 3, f"expected a CustodyError, got exit {r.returncode}:\n{r.stdout}{r.stderr}"
    assert r.stderr == "" and r.stdout.count("\n") == 1, r.stdout + r.stderr
    prefix = f"ERROR {kind} "
    assert r.stdout.startswith(prefix), r.stdout
    return r.stdout.removeprefix(prefix).strip()


@pytest.fixture
def kek_id(softhsm: SoftHsmToken) -> str:
    """The test token's KEK, generated as `certd kek init` does; its kek_id."""
    (kid,) = ok(in_process(softhsm, "print(Pkcs11Kek.generate(uri, module, pin_file).kek_id)"))
    return kid


def test_a_fresh_process_opens_the_generated_kek_under_the_same_id_and_unwraps(softhsm: SoftHsmToken) -> None:
    """generate in one process, open in another: the same kek_id, and it unwraps what the first wrapped."""
    kid, wrapped, dek = ok(in_process(softhsm, "k = Pkcs11Kek.generate(uri, module, pin_file)\n"
                                               "dek = os.urandom(32)\n"
                                               "print(k.kek_id, k.wrap(dek, AAD).hex(), dek.hex())"))
    assert kid.startswith(f"{softhsm.uri};id=%") and ";x-kcv=" in kid
    assert ok(in_process(softhsm, "k = Pkcs11Kek.open(uri, module, pin_file)\n"
                                  "print(k.kek_id, k.unwrap(bytes.fromhex(args[0]), AAD).hex())", wrapped)) == [kid, dek]


def test_wrap_unwrap_round_trip_with_a_fresh_iv_each_time(softhsm: SoftHsmToken, kek_id: str) -> None:
    """A data key wraps to iv || ciphertext || tag (60 bytes) and back; two wraps of it differ."""
    ok(in_process(softhsm, "k = Pkcs11Kek.open(uri, module, pin_file)\n"
                           "dek = os.urandom(32)\n"
                           "w1, w2 = k.wrap(dek, AAD), k.wrap(dek, AAD)\n"
                           "assert len(w1) == 12 + 32 + 16 and w1 != w2 and w1[:12] != w2[:12] and dek not in w1\n"
                           "assert k.unwrap(w1, AAD) == dek and k.unwrap(w2, AAD) == dek"))


def test_a_keyring_seals_and_opens_a_private_key_under_the_token_kek(softhsm: SoftHsmToken, kek_id: str) -> None:
    """KeyRing with the token KEK: the sealed key names the KEK and opens only in its own slot."""
    out = ok(in_process(softhsm, "ring = KeyRing(Pkcs11Kek.open(uri, module, pin_file))\n"
                                 "pem = b'-----BEGIN PRIVATE KEY-----\\nx\\n'\n"
                                 "sealed = ring.seal(pem, 'version/www/1')\n"
                                 "assert b'PRIVATE KEY' not in sealed and ring.open(sealed, 'version/www/1') == pem\n"
                                 "print(sealed.decode().split('\"kek\": \"')[1].split('\"')[0])\n"
                                 "try:\n"
                                 "    ring.open(sealed, 'version/www/2')\n"
                                 "except CustodyError:\n"
                                 "    print('moved-refused')"))
    assert out == [kek_id, "moved-refused"], out


@pytest.mark.parametrize("change", ["aad", "ciphertext", "iv", "truncated"])
def test_unwrap_refuses_other_aad_or_an_altered_wrapped_key(softhsm: SoftHsmToken, kek_id: str, change: str) -> None:
    """The token's GCM tag check fails for another slot's aad or any altered byte; the session survives it."""
    alter = {"aad": "aad = b'certd-sealed-key/1|version/www/2'", "ciphertext": "data[20] ^= 1",
             "iv": "data[0] ^= 1", "truncated": "data = data[:20]"}[change]
    r = in_process(softhsm, "k = Pkcs11Kek.open(uri, module, pin_file)\n"
                            "wrapped = k.wrap(b'd' * 32, AAD)\n"
                            f"aad, data = AAD, bytearray(wrapped)\n{alter}\n"
                            "try:\n    k.unwrap(bytes(data), aad)\n"
                            "finally:\n    assert k.unwrap(wrapped, AAD) == b'd' * 32")
    assert error(r).startswith(f"the data key does not unwrap under KEK {kek_id}: ")


def test_a_second_generate_under_the_same_label_is_refused_and_the_kek_stays(softhsm: SoftHsmToken,
                                                                             kek_id: str) -> None:
    """`certd kek init` twice: the second refuses (the label is taken) and the first KEK still opens."""
    line = error(in_process(softhsm, "Pkcs11Kek.generate(uri, module, pin_file)"))
    assert line == (f"{softhsm.uri}: the token already has an object labelled 'kek'; refusing to create another "
                    f"KEK under it (use it as it is, or pick another object= label)")
    assert ok(in_process(softhsm, "print(Pkcs11Kek.open(uri, module, pin_file).kek_id)")) == [kek_id]


def test_the_kek_on_the_token_is_sensitive_and_never_extractable(softhsm: SoftHsmToken, kek_id: str) -> None:
    """Read back through python-pkcs11: an AES-256 private token object whose value cannot be read."""
    ok(in_process(softhsm, f"""\
import pkcs11
from pkcs11 import Attribute as A, KeyType, ObjectClass
lib = pkcs11.lib(str(module))
with lib.get_token(token_label={softhsm.label!r}).open(user_pin={PIN!r}) as session:
    (key,) = list(session.get_objects({{A.CLASS: ObjectClass.SECRET_KEY, A.LABEL: 'kek'}}))
    assert key.key_type == KeyType.AES and key[A.VALUE_LEN] == 32
    assert key[A.TOKEN] and key[A.PRIVATE] and key[A.SENSITIVE] and key[A.ALWAYS_SENSITIVE]
    assert not key[A.EXTRACTABLE] and key[A.NEVER_EXTRACTABLE]
    assert not key[A.WRAP] and not key[A.UNWRAP] and not key[A.MODIFIABLE] and not key[A.COPYABLE]
    assert key[A.ENCRYPT] and key[A.DECRYPT]
    try:
        key[A.VALUE]
        raise AssertionError('the KEK value was readable')
    except pkcs11.AttributeSensitive:
        pass"""))


def test_two_keks_under_one_label_have_different_ids(softhsm: SoftHsmToken, kek_id: str, tmp_path: Path) -> None:
    """A KEK made again under the same label (another token) gets another kek_id: old seals name the old one."""
    other = SoftHsmToken(tmp_path / "other")
    other.init()
    (other_id,) = ok(in_process(other, "print(Pkcs11Kek.generate(uri, module, pin_file).kek_id)"))
    assert other_id != kek_id and other_id.startswith(f"{other.uri};id=%")


def test_wrong_pin_is_one_line_naming_the_pin_file_not_the_pin(softhsm: SoftHsmToken, kek_id: str) -> None:
    """A wrong PIN: one line that says the PIN file is wrong, never the PIN."""
    softhsm.pin_file.write_text("0000-wrong\n")
    line = error(in_process(softhsm, "Pkcs11Kek.open(uri, module, pin_file)"))
    assert "the PIN in pkcs11_pin_file is wrong" in line and "0000-wrong" not in line and PIN not in line


def test_pin_file_readable_by_others_is_refused(softhsm: SoftHsmToken, kek_id: str) -> None:
    """A PIN file other users can read is refused with the chmod that fixes it."""
    softhsm.pin_file.chmod(0o644)
    assert error(in_process(softhsm, "Pkcs11Kek.open(uri, module, pin_file)")).endswith(
        f"it unlocks the KEK: chmod 600 {softhsm.pin_file}")


@pytest.mark.parametrize("uri, kind, expected", [
    ("pkcs11:token=elsewhere;object=kek", "TokenUnavailable", "PKCS#11 token 'elsewhere' is unavailable: not found in /usr/lib/softhsm/libsofthsm2.so (tokens present: 'LABEL'); plug it in, or fix the token= label in kek"),
    ("URI;serial=0000;object=kek", "TokenUnavailable", "PKCS#11 token 'LABEL' is unavailable: not found in /usr/lib/softhsm/libsofthsm2.so (tokens present: 'LABEL'); plug it in, or fix the token= and serial= in kek"),
    ("URI;object=nokek", "CustodyError", "PKCS#11 token 'LABEL' has no AES key labelled 'nokek'; create it with `certd kek init`"),
    ("URI;object=kek;id=%00", "CustodyError", "PKCS#11 token 'LABEL' has no AES key labelled 'kek' with that id; create it with `certd kek init`"),
])
def test_missing_token_or_key_is_one_line_saying_what_to_do(softhsm: SoftHsmToken, kek_id: str, uri: str,
                                                           kind: str, expected: str) -> None:
    """A token that is not there lists the tokens that are; a missing key points at `certd kek init`."""
    uri = uri.replace("URI", softhsm.uri.split(";")[0])
    line = error(in_process(softhsm, "Pkcs11Kek.open(args[0], module, pin_file)", uri), kind)
    assert line == expected.replace("LABEL", softhsm.label)


@pytest.mark.parametrize("module, expected", [
    ("/no/such/libpkcs11.so", "does not exist; install the token's PKCS#11 module"),
    ("PIN_FILE", "does not load as a PKCS#11 module"),
])
def test_a_missing_or_wrong_module_is_one_line(softhsm: SoftHsmToken, module: str, expected: str) -> None:
    """pkcs11_module pointing at nothing, or at a file that is no PKCS#11 library."""
    module = str(softhsm.pin_file) if module == "PIN_FILE" else module
    line = error(in_process(softhsm, "Pkcs11Kek.open(uri, Path(args[0]), pin_file)", module))
    assert line.startswith(f"pkcs11_module {module} ") and expected in line


def test_a_removed_token_fails_unwrap_and_wrap_as_unavailable(softhsm: SoftHsmToken, kek_id: str) -> None:
    """Token gone mid-run: unwrap and wrap raise TokenUnavailable (transient), one line; back, it opens again."""
    r = in_process(softhsm, "k = Pkcs11Kek.open(uri, module, pin_file)\n"
                            "wrapped = k.wrap(b's' * 32, AAD)\n"
                            "Path(args[0]).rename(args[1])   # the token is pulled\n"
                            "for attempt in (lambda: k.unwrap(wrapped, AAD), lambda: k.wrap(b's' * 32, AAD)):\n"
                            "    try:\n"
                            "        attempt()\n"
                            "        raise AssertionError('worked without the token')\n"
                            "    except TokenUnavailable as e:\n"
                            "        assert e.transient and '\\n' not in str(e)\n"
                            "        print(e)",
                   str(softhsm.token_dir()), str(softhsm.away))
    lines = ok(r) and r.stdout.splitlines()
    assert len(lines) == 2 and all(f"PKCS#11 token '{softhsm.label}' is unavailable" in line for line in lines)
    softhsm.replug()
    assert ok(in_process(softhsm, "print(Pkcs11Kek.open(uri, module, pin_file).kek_id)")) == [kek_id]


def test_concurrent_wraps_and_unwraps_from_many_threads(softhsm: SoftHsmToken, kek_id: str) -> None:
    """The daemon's workers share one KEK: 8 threads x 50 round trips, every one correct."""
    out = ok(in_process(softhsm, "k = Pkcs11Kek.open(uri, module, pin_file)\n"
                                 "bad = []\n"
                                 "def work(n):\n"
                                 "    for i in range(50):\n"
                                 "        dek, aad = os.urandom(32), f'version/n{n}/{i}'.encode()\n"
                                 "        if k.unwrap(k.wrap(dek, aad), aad) != dek:\n"
                                 "            bad.append((n, i))\n"
                                 "threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]\n"
                                 "[t.start() for t in threads]\n"
                                 "[t.join() for t in threads]\n"
                                 "print(len(bad))"))
    assert out == ["0"]


def test_opening_the_kek_again_in_one_process_reuses_it(softhsm: SoftHsmToken, kek_id: str) -> None:
    """A daemon reload opens [keys] again: the same KEK object and session, not one more session each time."""
    ok(in_process(softhsm, "k1 = Pkcs11Kek.open(uri, module, pin_file)\n"
                           "k2 = Pkcs11Kek.open(uri, module, pin_file)\n"
                           "assert k1 is k2 and k1.unwrap(k2.wrap(b'r' * 32, AAD), AAD) == b'r' * 32"))


def test_without_python_pkcs11_the_error_names_the_extra(softhsm: SoftHsmToken) -> None:
    """python-pkcs11 not installed: the error says which extra to install."""
    r = in_process(softhsm, "sys.modules['pkcs11'] = None   # how an absent package looks to import\n"
                            "Pkcs11Kek.open(uri, module, pin_file)")
    assert error(r) == "kek = \"pkcs11:...\" needs python-pkcs11: pip install 'certd[hsm]'"
