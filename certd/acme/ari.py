"""ACME Renewal Information (RFC 9773): the certificate identifier and the CA's suggested
renewal window."""

from __future__ import annotations

import base64
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from acme import client as acme_client
from acme import messages
from cryptography import x509

from certd.acme.transport import Network
from certd.core.clock import Clock, utc
from certd.core.errors import AcmeError
from certd.core.model import split_pem_chain
from certd.core.retry_after import retry_after_seconds

log = logging.getLogger("certd.issuer")  # a stable name: it is part of the log format


@dataclass(frozen=True)
class RenewalInfo:
    """The CA's suggested renewal window for one certificate (RFC 9773 §4.2)."""

    window_start: datetime      # aware UTC
    window_end: datetime        # aware UTC
    retry_after: datetime | None  # aware UTC: when the CA asks to be asked again (None: it did not
    #                               say); clamped in one place, certd.core.policy.ari_poll_interval
    explanation_url: str | None


def ari_cert_id(cert_pem: bytes) -> str:
    """RFC 9773 §4.1 certificate identifier: base64url(AKI keyIdentifier) "." base64url(serial).

    The serial is the content of its DER INTEGER: big-endian two's complement, so a serial whose
    top bit is set gets a leading zero byte.
    """
    blocks = split_pem_chain(cert_pem)
    if not blocks:
        raise ValueError("no PEM certificate")
    cert = x509.load_pem_x509_certificate(blocks[0])
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        aki = None
    if not aki:
        raise ValueError("the certificate has no authority key identifier; it has no ARI identifier")
    serial = cert.serial_number
    serial_der = serial.to_bytes(max(1, math.ceil((serial.bit_length() + 1) / 8)), "big", signed=True)
    return f"{_b64(aki)}.{_b64(serial_der)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def askable_cert_id(cert_pem: bytes, now: datetime) -> str | None:
    """``cert_pem``'s ARI identifier, or None when there is nothing to ask: it has no authority
    key identifier, or it has expired (RFC 9773 §4.3: clients must not ask then; renew now)."""
    try:
        cert_id = ari_cert_id(cert_pem)
    except ValueError as e:
        log.debug("no ARI for this certificate: %s", e)
        return None
    cert = x509.load_pem_x509_certificate(split_pem_chain(cert_pem)[0])
    if cert.not_valid_after_utc <= now:
        return None
    return cert_id


def fetch_renewal_info(net: Network, url: str, clock: Clock) -> RenewalInfo:
    """GET ``url`` (the directory's renewalInfo / the certificate's identifier): the window,
    and when to ask again (Retry-After)."""
    response = net.get(url, content_type=acme_client.ClientNetwork.JSON_CONTENT_TYPE)
    body = response.json()
    window = messages.RenewalInfo.from_json(body).suggested_window
    if window.start is None or window.end is None or window.end <= window.start:
        raise AcmeError("fetching renewal information: the CA sent no valid suggestedWindow "
                        "(RFC 9773 §4.2); will retry", transient=True)
    now = clock.now()
    wait = retry_after_seconds(response.headers.get("Retry-After"), now)
    explanation = body.get("explanationURL") if isinstance(body, dict) else None
    return RenewalInfo(window_start=utc(window.start), window_end=utc(window.end),
                       retry_after=None if wait is None else now + timedelta(seconds=wait),
                       explanation_url=explanation if isinstance(explanation, str) else None)
