"""``pkcs11:`` URIs (RFC 7512) as ``[keys] kek`` names a KEK on a token: parsed and printed."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from certd.crypto.custody import CustodyError

_PATH_ATTRS = ("token", "object", "id", "type", "serial")


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of a ``pkcs11:`` URI certd uses: which token (label, optionally its serial) and
    which key on it (label, optionally its CKA_ID)."""

    token: str
    object: str
    id: bytes | None = None
    serial: str | None = None

    @classmethod
    def parse(cls, uri: str) -> Pkcs11Uri:
        """RFC 7512 §2.3: ``pkcs11:`` then ``;``-separated path attributes, percent-decoded
        (labels as UTF-8, ``id`` as raw bytes). Vendor attributes (``x-...``) are ignored; a
        query (``?pin-value=...``) is refused: the PIN comes from ``pkcs11_pin_file``."""
        where = f"kek = {uri!r}"
        if not uri.startswith("pkcs11:"):
            raise CustodyError(f"{where}: not a PKCS#11 URI; expected e.g. \"pkcs11:token=certd;object=kek\"")
        path, _, query = uri[len("pkcs11:"):].partition("?")
        if query:
            raise CustodyError(f"{where}: query attributes (after '?') are not used; give the PIN in "
                               f"pkcs11_pin_file and the module in pkcs11_module")
        attrs: dict[str, bytes] = {}
        for part in filter(None, path.split(";")):
            name, eq, value = part.partition("=")
            if not eq or name in attrs:
                raise CustodyError(f"{where}: {part!r} is {'repeated' if eq else 'not name=value'}")
            if name.startswith("x-"):
                continue
            if name not in _PATH_ATTRS:
                raise CustodyError(f"{where}: attribute {name!r} is not supported (use {', '.join(_PATH_ATTRS)})")
            attrs[name] = unquote_to_bytes(value)
        if attrs.get("type", b"secret-key") != b"secret-key":
            raise CustodyError(f"{where}: type={attrs['type'].decode(errors='replace')} cannot be a KEK; the KEK "
                               f"is an AES secret key (type=secret-key)")
        try:
            text = {k: v.decode() for k, v in attrs.items() if k in ("token", "object", "serial")}
        except UnicodeDecodeError:
            raise CustodyError(f"{where}: a label is not UTF-8 after percent-decoding") from None
        if not text.get("token") or not text.get("object"):
            raise CustodyError(f"{where}: name the token and the key, e.g. \"pkcs11:token=certd;object=kek\"")
        return cls(text["token"], text["object"], attrs.get("id") or None, text.get("serial"))

    def __str__(self) -> str:
        """The canonical form: labels percent-encoded where RFC 7512 asks, ``id`` byte by byte."""
        parts = [f"token={_pct(self.token)}"]
        if self.serial:
            parts.append(f"serial={_pct(self.serial)}")
        parts.append(f"object={_pct(self.object)}")
        if self.id:
            parts.append("id=" + "".join(f"%{b:02X}" for b in self.id))
        return "pkcs11:" + ";".join(parts)


def _pct(label: str) -> str:
    # RFC 7512 §2.3 pchar, less ';' (the separator) and '?'
    return quote(label, safe="-._~!$&'()*+,=:@")
