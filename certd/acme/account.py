"""The ACME account (RFC 8555 §7.3) an :class:`~certd.acme.issuer.Issuer` signs with: loaded
from the :class:`AccountStore` or registered once, shared by every thread.

If the CA no longer knows the account (Pebble restarted: fresh state), the same key is
registered again and saved (:meth:`Account.reregister`). Registration is serialized across
processes when the store can (``FileStore.account_lock``), so two processes never register
two accounts for one directory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import josepy as jose
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certd.acme.problems import Failure, problem_code
from certd.acme.transport import Network, Transport
from certd.config import AcmeConfig
from certd.core.errors import ConfigError

log = logging.getLogger("certd.issuer")  # a stable name: it is part of the log format


class AccountStore(Protocol):
    def load_account(self, directory_url: str) -> tuple[bytes, str] | None:
        """(account key PEM, registration JSON) for ``directory_url``, or None."""

    def save_account(self, directory_url: str, key_pem: bytes, registration_json: str) -> None:
        """Remember the account (the key file must be 0600)."""


class Account:
    """Key, algorithm and registration of this process's account at one CA. Thread-safe."""

    def __init__(self, acme: AcmeConfig, store: AccountStore, transport: Transport, fail: Failure) -> None:
        self._acme, self._store, self._transport, self._fail = acme, store, transport, fail
        self._lock = threading.Lock()   # key, alg and registration change together
        self.key: jose.JWK | None = None
        self.alg: jose.JWASignature = jose.ES256
        self.regr: messages.RegistrationResource | None = None
        self._raw_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None

    def ensure(self, directory: messages.Directory, time_left: Callable[[], float] | None) -> None:
        """Load the stored account, or register one (once, whichever thread comes first).
        ``time_left``: the caller's deadline, which bounds the registration's badNonce retries."""
        if self.regr is None:
            with self._lock:
                if self.regr is None:
                    with self._account_lock():
                        if self._load_stored():
                            return
                        key = ec.generate_private_key(ec.SECP256R1())
                        self._set_key(key)
                        self._register(directory, key, time_left)

    def sign(self, net: Network) -> None:
        """Make ``net`` sign with this account (after a re-registration too)."""
        with self._lock:
            net.key, net.alg, net.account = self.key, self.alg, self.regr

    def reregister(self, directory: messages.Directory, stale: messages.RegistrationResource | None,
                   time_left: Callable[[], float] | None) -> None:
        """Register the same key again, unless another thread already did."""
        with self._lock:
            if self.regr is not stale:
                return
            with self._account_lock():
                # Another process may have registered again meanwhile: use what it saved.
                if self._load_stored(unless_uri=stale.uri if stale is not None else None):
                    return
                assert self._raw_key is not None  # set with the account that went stale
                self._register(directory, self._raw_key, time_left)

    def _account_lock(self) -> AbstractContextManager[None]:
        """Registration is serialized across processes when the store can (FileStore.account_lock)."""
        lock = getattr(self._store, "account_lock", None)
        return lock(self._acme.directory) if lock is not None else nullcontext()

    def _load_stored(self, unless_uri: str | None = None) -> bool:
        """Use the stored account, if there is one (and it is not ``unless_uri``)."""
        stored = self._store.load_account(self._acme.directory)
        if stored is None:
            return False
        key_pem, regr_json = stored
        regr = messages.RegistrationResource.json_loads(regr_json)
        if unless_uri is not None and regr.uri == unless_uri:
            return False
        self._set_key(serialization.load_pem_private_key(key_pem, password=None))
        self.regr = regr
        log.debug("account_loaded directory=%s account=%s", self._acme.directory, regr.uri)
        return True

    def _set_key(self, key: Any) -> None:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            algs = {"secp256r1": jose.ES256, "secp384r1": jose.ES384, "secp521r1": jose.ES512}
            if key.curve.name not in algs:
                raise ConfigError(f"the stored ACME account key uses curve {key.curve.name}; "
                                  "remove the account directory to register a new account")
            self.key, self.alg = jose.JWKEC(key=key), algs[key.curve.name]
        elif isinstance(key, rsa.RSAPrivateKey):
            self.key, self.alg = jose.JWKRSA(key=key), jose.RS256
        else:
            raise ConfigError("the stored ACME account key is neither EC nor RSA; "
                              "remove the account directory to register a new account")
        self._raw_key = key

    def _eab(self, directory: messages.Directory) -> dict[str, Any] | None:
        acme = self._acme
        if acme.eab_kid and acme.eab_hmac_key:
            assert self.key is not None
            try:
                return messages.ExternalAccountBinding.from_data(
                    account_public_key=self.key.public_key(), kid=acme.eab_kid,
                    hmac_key=acme.eab_hmac_key, directory=directory)
            except (ValueError, TypeError, jose.DeserializationError):
                raise ConfigError(f"{acme.table} eab_hmac_key: not valid base64url; copy the HMAC key exactly "
                                  "as the CA shows it") from None
        if getattr(directory.meta, "external_account_required", False):
            raise ConfigError(f"{acme.table} eab_kid: the CA at {acme.directory} requires External Account "
                              "Binding; set eab_kid and eab_hmac_key from your CA account")
        return None

    def _register(self, directory: messages.Directory, key: Any, time_left: Callable[[], float] | None) -> None:
        """newAccount with ``key`` (caller holds the lock); saves the account."""
        acme = self._acme
        tos = getattr(directory.meta, "terms_of_service", None)
        registration = messages.NewRegistration.from_data(
            email=acme.email, terms_of_service_agreed=True if acme.agree_tos else None,
            external_account_binding=self._eab(directory))
        net = self._transport.network()
        net.key, net.alg = self.key, self.alg
        net.time_left = time_left  # the order's deadline bounds badNonce retries too
        try:
            regr = acme_client.ClientV2(directory, net).new_account(registration)  # type: ignore[arg-type]
        except acme_errors.ConflictError as e:
            # 200 + Location (RFC 8555 §7.3.1): the CA already has this key — a registration whose
            # answer was lost (disk full, SIGKILL before save_account). Adopt and save that account.
            regr = messages.RegistrationResource(uri=e.location, body=messages.Registration())
            log.warning("account_adopted directory=%s account=%s: the CA already knew this key", acme.directory,
                        e.location)
        except messages.Error as e:
            if not acme.agree_tos and (tos or problem_code(e) == "userActionRequired"
                                       or "terms" in (e.detail or "").lower()):
                raise ConfigError(f"{acme.table} agree_tos: the CA at {acme.directory} requires agreeing to its "
                                  f"terms of service{f' ({tos})' if tos else ''}; read them and set "
                                  "agree_tos = true") from None
            raise self._fail(e, f"registering an ACME account at {acme.directory}") from e
        finally:
            net.close()
        # Pebble echoes the EAB back; josepy decodes it into a frozendict it cannot serialize again.
        regr = regr.update(body=regr.body.update(external_account_binding=None))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        self._store.save_account(acme.directory, key_pem, regr.json_dumps())
        self.regr = regr
        log.info("account_registered directory=%s account=%s", acme.directory, regr.uri)
