"""A key-encryption key held in a PKCS#11 token (an HSM, or SoftHSM2 in the tests).

``[keys] kek = "pkcs11:token=certd;object=kek"`` names an AES-256 secret key on a token; certd
asks the token to wrap and unwrap data keys with CKM_AES_GCM (a random 12-byte IV, the slot as
associated data, a 128-bit tag: ``wrapped = iv || ciphertext || tag``). The KEK is generated on
the token (:meth:`Pkcs11Kek.generate`, ``certd kek init``) as a sensitive, non-extractable token
object: no certd process, backup or core dump ever holds it, only the data keys it unwraps.

The token is a device that can go away. Every failure is a :class:`CustodyError` with one
actionable line, raised before anything is written, so what is deployed and served stays as it
was. One session is kept open (a login per call would cost more than the wrap); a call that
fails because the session or the key's handle died re-opens the session once, and then works
or reports the token unavailable (:class:`TokenUnavailable`, transient). A re-opened session
must find the same key (same CKA_ID and check value): a token re-plugged with another key under
the label is refused, not used to seal new keys the old ones do not open.

certd never re-initialises the module in a running process (C_Finalize + C_Initialize): with
SoftHSM2 that breaks the process's OpenSSL (it releases the RDRAND engine it made OpenSSL's
default; the next TLS handshake fails with ``ENGINE: NO_SUCH_ENGINE``, observed on Debian 12).
A module that lists its tokens only at initialisation (SoftHSM2) therefore needs a certd restart
to see a token plugged back; one whose slots report a re-inserted token gets a new session.

python-pkcs11 drives one PKCS#11 library per process, and a session must not run two operations
at once: every token call here holds one process-wide lock (the daemon's workers wrap and unwrap
concurrently; a wrap takes well under a millisecond on SoftHSM2, so the lock costs nothing).
python-pkcs11 is the ``hsm`` extra: without it, using a PKCS#11 KEK fails naming the extra.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from certd.crypto.custody import CustodyError, read_secret_file
from certd.crypto.pkcs11uri import Pkcs11Uri

NEEDS_EXTRA = "kek = \"pkcs11:...\" needs python-pkcs11: pip install 'certd[hsm]'"
IV_BYTES = 12
TAG_BITS = 128
KEK_BITS = 256
_ID_BYTES = 8   # CKA_ID of a generated KEK: random, so two KEKs under one label get different ids

_LOCK = threading.RLock()
T = TypeVar("T")


class TokenUnavailable(CustodyError):
    """The token (or its library) does not answer now: removed, re-plugged, or its module failed.
    Transient: nothing was written, and a later attempt may find the token back."""

    transient = True


def _import_pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise CustodyError(NEEDS_EXTRA) from None
    return pkcs11


# --- the PIN, the library ------------------------------------------------------------------


def read_pin(pin_file: Path) -> str:
    """The user PIN from ``pin_file`` (one line; a trailing newline is not part of it). Like a
    KEK file, it must not be readable by other users: it unlocks the KEK."""
    raw = read_secret_file(pin_file, "pkcs11_pin_file", "the KEK",
                           "write the token's user PIN into it (mode 600, owned by certd's user)")
    pin = raw.decode(errors="replace").rstrip("\r\n")
    if not pin or "\n" in pin:
        raise CustodyError(f"pkcs11_pin_file {pin_file}: expected the PIN on one line, found "
                           f"{'nothing' if not pin else 'several lines'}")
    return pin


class _Library:
    """The process's one PKCS#11 library (python-pkcs11 keeps a single function table)."""

    def __init__(self, module: Path, lib: Any) -> None:
        self.module = module
        self.lib = lib


_library: _Library | None = None
_opened: dict[tuple[str, Path, str], Pkcs11Kek] = {}   # what open() handed out, by URI, module and PIN


def _load(module: Path) -> _Library:
    """The process's library for ``module``, loaded (and initialised) on first use."""
    global _library
    p11 = _import_pkcs11()
    if _library is not None:
        if _library.module != module:
            raise CustodyError(f"pkcs11_module {module}: this process already uses {_library.module}, and a "
                               f"process can load one PKCS#11 module; configure the same module everywhere")
        return _library
    if not module.is_file():
        raise CustodyError(f"pkcs11_module {module} does not exist; install the token's PKCS#11 module (for "
                           f"SoftHSM2: apt-get install softhsm2 -> /usr/lib/softhsm/libsofthsm2.so)")
    try:
        lib = p11.lib(str(module))
    except RuntimeError as e:   # dlopen or C_GetFunctionList failed; the text is dlerror()'s
        raise CustodyError(f"pkcs11_module {module} does not load as a PKCS#11 module ({str(e)[-200:]}); point "
                           f"pkcs11_module at the vendor's .so for this machine") from None
    except p11.PKCS11Error as e:   # C_Initialize failed
        raise CustodyError(f"pkcs11_module {module} loads but does not initialise ({_name(e)}); check its "
                           f"configuration (SoftHSM2: SOFTHSM2_CONF and its token directory)") from None
    _library = _Library(module, lib)
    return _library


def _name(e: BaseException) -> str:
    # python-pkcs11's exceptions carry no text: the class names the CKR_ code (never the PIN)
    return type(e).__name__


# --- the KEK ---------------------------------------------------------------------------------


class Pkcs11Kek:
    """An AES-256 KEK on a PKCS#11 token; implements :class:`certd.crypto.custody.Kek`.

    Open it with :meth:`open` (or create it with :meth:`generate`); wrap and unwrap run inside
    the token. Safe to share between threads."""

    def __init__(self, uri: Pkcs11Uri, module: Path, pin: str, library: _Library) -> None:
        self.uri = uri
        self.module = module
        self._pin = pin
        self._library = library
        self._session: Any = None
        self._key: Any = None
        self._id = ""

    def __repr__(self) -> str:   # never the PIN
        return f"Pkcs11Kek({self._id or self.uri})"

    @property
    def kek_id(self) -> str:
        """``pkcs11:token=...;object=...;id=...`` (the key's CKA_ID) and ``x-kcv=...`` (its check
        value: 3 bytes of AES(key, 0), public by design): two keys under one label differ."""
        return self._id

    @classmethod
    def open(cls, uri: str, module: Path, pin_file: Path) -> Pkcs11Kek:
        """Log in to the token and find the key; :class:`CustodyError` says what is missing.
        Opened again in the same process (the daemon re-reads ``[keys]`` at every reload), the
        KEK already open is checked and handed back instead of opening one more session."""
        parsed = Pkcs11Uri.parse(uri)
        pin = read_pin(pin_file)
        with _LOCK:
            kek = _opened.get((str(parsed), module, pin))
            if kek is None:
                kek = cls(parsed, module, pin, _load(module))
            kek._run(lambda key, p11: key[p11.Attribute.KEY_TYPE], "the token does not answer for the KEK")
            _opened[(str(parsed), module, pin)] = kek
            return kek

    @classmethod
    def generate(cls, uri: str, module: Path, pin_file: Path) -> Pkcs11Kek:
        """Create the KEK on the token: AES-256, a token object, sensitive, never extractable,
        usable only to encrypt and decrypt. Refuses when the token already has an object with
        the label (it may be the KEK every stored key depends on)."""
        p11 = _import_pkcs11()
        parsed = Pkcs11Uri.parse(uri)
        pin = read_pin(pin_file)
        with _LOCK:
            kek = cls(parsed, module, pin, _load(module))
            session = kek._login()
            label = parsed.object
            try:
                if next(iter(session.get_objects({p11.Attribute.LABEL: label})), None) is not None:
                    raise CustodyError(f"{parsed}: the token already has an object labelled {label!r}; "
                                       f"refusing to create another KEK under it (use it as it is, or pick "
                                       f"another object= label)")
                key = session.generate_key(p11.KeyType.AES, KEK_BITS, label=label, store=True,
                                           id=parsed.id or os.urandom(_ID_BYTES), template=_kek_template(p11))
            except p11.PKCS11Error as e:
                raise CustodyError(f"{parsed}: the token refused to create the KEK ({_name(e)}); is it "
                                   f"write-protected, full, or without AES-256 key generation?") from None
            kek._adopt(session, key)
            return kek

    def wrap(self, dek: bytes, aad: bytes) -> bytes:
        iv = os.urandom(IV_BYTES)
        param = _GcmParam(iv, aad)   # referenced by the closure: the token reads its buffers
        return iv + self._run(lambda key, p11: key.encrypt(dek, mechanism=p11.Mechanism.AES_GCM,
                                                           mechanism_param=param.raw),
                              f"the token refused to wrap a data key under {self._id}")

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        refused = (f"the data key does not unwrap under KEK {self._id}: the sealed key was altered, moved, "
                   f"or sealed by another key with this label")
        if len(wrapped) < IV_BYTES + TAG_BITS // 8:
            raise CustodyError(refused)
        param = _GcmParam(wrapped[:IV_BYTES], aad)
        sealed = wrapped[IV_BYTES:]
        return self._run(lambda key, p11: key.decrypt(sealed, mechanism=p11.Mechanism.AES_GCM,
                                                      mechanism_param=param.raw), refused)

    def close(self) -> None:
        """Close the session (the key stays on the token)."""
        with _LOCK:
            self._drop()

    # -- the session ------------------------------------------------------------------------

    def _run(self, op: Callable[[Any, Any], T], refused: str) -> T:
        """``op(key, pkcs11)`` in the token, re-opening the session once if it or the key's handle
        died. A failure while the token still answers is the input's fault: ``refused``."""
        p11 = _import_pkcs11()
        with _LOCK:
            for _attempt in (1, 2):
                if self._key is None:
                    self._adopt_key(self._login())
                try:
                    return op(self._key, p11)
                except (p11.PKCS11Error, RuntimeError) as e:
                    if self._alive(p11):   # the token answers: it refused this input
                        raise CustodyError(f"{refused} ({_name(e)})") from None
                    self._drop()
            raise TokenUnavailable(f"PKCS#11 token {self.uri.token!r} is unavailable: its session fails even after "
                                   f"re-opening it; put the token back (then restart certd if the module lists "
                                   f"tokens only at start, as SoftHSM2 does)")

    def _alive(self, p11: Any) -> bool:
        try:
            self._key[p11.Attribute.KEY_TYPE]
            return True
        except (p11.PKCS11Error, RuntimeError):
            return False

    def _drop(self) -> None:
        session, self._session, self._key = self._session, None, None
        if session is not None:
            try:
                session.close()
            except Exception:   # noqa: BLE001 - a dead session is closed enough
                pass

    def _adopt_key(self, session: Any) -> None:
        """Find the key in ``session`` and keep both; it must be the key first opened. The
        session is closed again when it is not kept."""
        try:
            self._find_key(session)
        except CustodyError:
            try:
                session.close()
            except Exception:   # noqa: BLE001 - the error being raised says more
                pass
            raise

    def _find_key(self, session: Any) -> None:
        p11 = _import_pkcs11()
        try:
            attrs = {p11.Attribute.CLASS: p11.ObjectClass.SECRET_KEY, p11.Attribute.KEY_TYPE: p11.KeyType.AES,
                     p11.Attribute.LABEL: self.uri.object}
            if self.uri.id:
                attrs[p11.Attribute.ID] = self.uri.id
            keys = list(session.get_objects(attrs))
        except (p11.PKCS11Error, RuntimeError) as e:
            raise self._unavailable("searching it", e) from None
        if not keys:
            raise CustodyError(f"PKCS#11 token {self.uri.token!r} has no AES key labelled {self.uri.object!r}"
                               f"{' with that id' if self.uri.id else ''}; create it with `certd kek init`")
        if len(keys) > 1:
            raise CustodyError(f"PKCS#11 token {self.uri.token!r} has {len(keys)} AES keys labelled "
                               f"{self.uri.object!r}; add the KEK's id to the URI (;id=%..)")
        self._adopt(session, keys[0])

    def _adopt(self, session: Any, key: Any) -> None:
        kek_id = _kek_id(self.uri, key)
        if self._id and kek_id != self._id:
            raise TokenUnavailable(f"PKCS#11 token {self.uri.token!r} is unavailable: it now holds another key "
                                   f"labelled {self.uri.object!r} ({kek_id}, not {self._id}); put the original "
                                   f"token back")
        self._session, self._key, self._id = session, key, kek_id

    def _login(self) -> Any:
        p11 = _import_pkcs11()
        token = self._token(p11)
        try:
            return token.open(rw=True, user_pin=self._pin)
        except p11.UserAlreadyLoggedIn:
            # PKCS#11 logs in the application, not the session: another session of this process
            # (another Pkcs11Kek on the token) has, and a new session shares its login.
            return self._open_logged_in(token, p11)
        except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange):
            raise CustodyError(f"PKCS#11 token {self.uri.token!r}: the PIN in pkcs11_pin_file is wrong; fix the "
                               f"file before retrying (the token locks the PIN after a few wrong tries)") from None
        except p11.PinLocked:
            raise CustodyError(f"PKCS#11 token {self.uri.token!r}: the user PIN is locked; the token's security "
                               f"officer must set a new one (pkcs11-tool --login --login-type so --init-pin)") from None
        except p11.PinExpired:
            raise CustodyError(f"PKCS#11 token {self.uri.token!r}: the user PIN has expired; set a new one and "
                               f"write it to pkcs11_pin_file") from None
        except (p11.PKCS11Error, RuntimeError) as e:
            raise self._unavailable("opening a session", e) from None

    def _open_logged_in(self, token: Any, p11: Any) -> Any:
        try:
            return token.open(rw=True)
        except (p11.PKCS11Error, RuntimeError) as e:
            raise self._unavailable("opening a session", e) from None

    def _unavailable(self, doing: str, e: BaseException) -> TokenUnavailable:
        return TokenUnavailable(f"PKCS#11 token {self.uri.token!r} is unavailable: {doing} failed ({_name(e)}); "
                                f"check that it is plugged in and that {self.module} works with it")

    def _token(self, p11: Any) -> Any:
        lib = self._library.lib
        try:
            found = [t for t in lib.get_tokens(token_label=self.uri.token)
                     if self.uri.serial is None or t.serial.decode(errors="replace") == self.uri.serial]
        except (p11.PKCS11Error, RuntimeError) as e:
            raise self._unavailable("listing the tokens", e) from None
        if len(found) == 1:
            return found[0]
        if found:
            raise CustodyError(f"{len(found)} PKCS#11 tokens are labelled {self.uri.token!r}; add serial=... to the "
                               f"URI (softhsm2-util --show-slots or pkcs11-tool -L shows the serials)")
        which = "token= and serial=" if self.uri.serial else "token= label"
        raise TokenUnavailable(f"PKCS#11 token {self.uri.token!r} is unavailable: not found in {self.module} (tokens "
                               f"present: {_labels(p11, lib)}); plug it in, or fix the {which} in kek")


def _labels(p11: Any, lib: Any) -> str:
    try:
        labels = [repr(t.label) for t in lib.get_tokens() if t.label]
    except (p11.PKCS11Error, RuntimeError):
        return "cannot list them"
    return ", ".join(labels) or "none"


def _kek_template(p11: Any) -> dict[Any, Any]:
    a = p11.Attribute
    return {a.TOKEN: True, a.PRIVATE: True, a.SENSITIVE: True, a.EXTRACTABLE: False, a.ENCRYPT: True,
            a.DECRYPT: True, a.WRAP: False, a.UNWRAP: False, a.SIGN: False, a.VERIFY: False, a.DERIVE: False,
            a.MODIFIABLE: False, a.COPYABLE: False}


def _kek_id(uri: Pkcs11Uri, key: Any) -> str:
    p11 = _import_pkcs11()
    base = Pkcs11Uri(uri.token, uri.object, _attribute(p11, key, p11.Attribute.ID) or None, uri.serial)
    kcv = _attribute(p11, key, p11.Attribute.CHECK_VALUE)
    return str(base) + (f";x-kcv={kcv.hex()}" if kcv else "")


def _attribute(p11: Any, key: Any, attr: Any) -> bytes:
    try:
        return bytes(key[attr])
    except (p11.PKCS11Error, RuntimeError):   # a token without CKA_CHECK_VALUE (before PKCS#11 2.40)
        return b""


class _GcmParam:
    """CK_GCM_PARAMS (PKCS#11 2.40 / 3.0 layout, which SoftHSM2 2.6 and current HSMs take) as the
    raw bytes python-pkcs11 passes through. The buffers the struct points at live as long as
    this object: keep it referenced until the call returns."""

    class _Struct(ctypes.Structure):
        _fields_ = [("pIv", ctypes.c_void_p), ("ulIvLen", ctypes.c_ulong), ("ulIvBits", ctypes.c_ulong),
                    ("pAAD", ctypes.c_void_p), ("ulAADLen", ctypes.c_ulong), ("ulTagBits", ctypes.c_ulong)]

    def __init__(self, iv: bytes, aad: bytes) -> None:
        self._iv = ctypes.create_string_buffer(iv, len(iv))
        self._aad = ctypes.create_string_buffer(aad, len(aad))
        self.raw = bytes(self._Struct(ctypes.addressof(self._iv), len(iv), len(iv) * 8,
                                      ctypes.addressof(self._aad), len(aad), TAG_BITS))

