"""`[keys] kek = "pkcs11:..."`: the URI as RFC 7512 reads it, and the PIN file's checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from certd.crypto.custody import CustodyError
from certd.crypto.pkcs11kek import read_pin
from certd.crypto.pkcs11uri import Pkcs11Uri


@pytest.mark.parametrize("uri, token, obj, key_id, serial", [
    ("pkcs11:token=certd;object=kek", "certd", "kek", None, None),
    ("pkcs11:object=kek;token=certd", "certd", "kek", None, None),
    ("pkcs11:token=certd%20hsm;object=k%C3%A9k", "certd hsm", "kék", None, None),
    ("pkcs11:token=a%3Bb;object=kek;id=%01%ff%20", "a;b", "kek", b"\x01\xff ", None),
    ("pkcs11:token=certd;object=kek;type=secret-key;serial=0815", "certd", "kek", None, "0815"),
    ("pkcs11:token=certd;object=kek;x-kcv=abcdef", "certd", "kek", None, None),
    ("pkcs11:token=certd;object=kek;", "certd", "kek", None, None),
])
def test_uri_parts_are_percent_decoded(uri: str, token: str, obj: str, key_id: bytes | None, serial: str | None) -> None:
    """Labels decode as UTF-8 and id as raw bytes; attribute order and vendor attributes do not matter."""
    parsed = Pkcs11Uri.parse(uri)
    assert (parsed.token, parsed.object, parsed.id, parsed.serial) == (token, obj, key_id, serial)


@pytest.mark.parametrize("uri, message", [
    ("pkcs12:token=certd;object=kek", "not a PKCS#11 URI"),
    ("pkcs11:token=certd", "name the token and the key"),
    ("pkcs11:object=kek", "name the token and the key"),
    ("pkcs11:token=;object=kek", "name the token and the key"),
    ("pkcs11:token=certd;object=kek?pin-value=1234", "give the PIN in pkcs11_pin_file"),
    ("pkcs11:token=certd;object=kek;type=private", "cannot be a KEK"),
    ("pkcs11:token=certd;object=kek;slot-id=3", "attribute 'slot-id' is not supported"),
    ("pkcs11:token=certd;token=other;object=kek", "is repeated"),
    ("pkcs11:token=certd;object", "is not name=value"),
    ("pkcs11:token=%ff;object=kek", "not UTF-8"),
])
def test_bad_uris_are_one_line_errors(uri: str, message: str) -> None:
    """A URI certd cannot use: one line naming the problem (and never echoing a PIN from a query)."""
    with pytest.raises(CustodyError) as e:
        Pkcs11Uri.parse(uri)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("uri", [
    "pkcs11:token=certd;object=kek",
    "pkcs11:token=certd%20hsm;serial=0815;object=a%3Bb;id=%01%FF",
])
def test_str_is_canonical_and_parses_back(uri: str) -> None:
    """str() of a parsed URI is RFC 7512 again, with ';' in labels and every id byte encoded."""
    assert str(Pkcs11Uri.parse(uri)) == uri
    assert Pkcs11Uri.parse(str(Pkcs11Uri.parse(uri))) == Pkcs11Uri.parse(uri)


@pytest.mark.parametrize("content, mode, expected", [
    (b"1234\n", 0o600, "1234"),
    (b"12 34\r\n", 0o400, "12 34"),
    (b"1234", 0o600, "1234"),
])
def test_pin_is_the_first_line_without_its_newline(tmp_path: Path, content: bytes, mode: int, expected: str) -> None:
    """The PIN file holds the PIN on one line; the line ending is not part of it."""
    pin = tmp_path / "pin"
    pin.write_bytes(content)
    pin.chmod(mode)
    assert read_pin(pin) == expected


@pytest.mark.parametrize("content, mode, message", [
    (b"1234\n", 0o640, "is accessible to other users (mode 0640)"),
    (b"1234\n", 0o604, "chmod 600"),
    (b"\n", 0o600, "found nothing"),
    (b"12\n34\n", 0o600, "found several lines"),
    (None, 0o600, "does not exist"),
])
def test_bad_pin_files_are_refused_without_showing_the_pin(tmp_path: Path, content: bytes | None, mode: int,
                                                           message: str) -> None:
    """Missing, empty, multi-line or group/world-accessible PIN files: one line, no PIN in it."""
    pin = tmp_path / "pin"
    if content is not None:
        pin.write_bytes(content)
        pin.chmod(mode)
    with pytest.raises(CustodyError) as e:
        read_pin(pin)
    assert message in str(e.value) and "1234" not in str(e.value) and "\n" not in str(e.value)
