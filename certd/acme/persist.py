"""dns-persist-01 (draft-ietf-acme-dns-persist): one persistent TXT record per name, naming the
CA and the ACME account, instead of a DNS change per order.

The record, as Pebble 2.10 validates it (va.validateDNSPersist01) and the draft defines it::

    _validation-persist.<name>.  IN TXT  "<issuer-domain-name>; accounturi=<account URL>[; policy=wildcard]"

``issuer-domain-name`` is one of the names the challenge object lists in ``issuer-domain-names``
(the CA's CAA identities, also in the directory's ``meta.caaIdentities``); ``policy=wildcard``
lets the record authorize ``*.<name>`` too. The challenge has no token and is answered with an
empty JSON object.

With ``dns_persist_hook``, certd publishes the record itself (``hook... persist <name> <value>``)
the first time a process needs it for that name and value (and again after an hour); the hook
must make sure that value is among the TXT records of the name, *adding* it beside others — a
wildcard and a plain certificate of one name, or two CAs, each need their own — and be
idempotent (the value is the same for every order). Without a hook the operator publishes it
once, as ``certd dns-persist-record NAME`` prints it.
"""

from __future__ import annotations

from collections.abc import Sequence

import josepy as jose

CHALLENGE = "dns-persist-01"
RECORD_PREFIX = "_validation-persist"


class EmptyResponse(jose.JSONObjectWithFields):
    """The answer to a dns-persist-01 challenge: ``{}`` (nothing to prove beyond the record).

    Truthy on purpose: the JWS code sends an empty payload (a POST-as-GET, which only *reads*
    the challenge) for a falsy object, and a fieldless josepy object is falsy (its length is 0).
    """

    def __bool__(self) -> bool:
        return True


def record_value(issuer_domain: str, account_uri: str, wildcard: bool) -> str:
    return f"{issuer_domain}; accounturi={account_uri}" + ("; policy=wildcard" if wildcard else "")


def record_lines(domains: Sequence[str], issuer_domain: str, account_uri: str) -> list[str]:
    """The zone-file lines to publish for ``domains`` (one per base name; a wildcard folds into
    its base name's record with policy=wildcard)."""
    bases: dict[str, bool] = {}
    for d in domains:
        base = d[2:] if d.startswith("*.") else d
        bases[base] = bases.get(base, False) or d.startswith("*.")
    return [f'{RECORD_PREFIX}.{base}. 300 IN TXT "{record_value(issuer_domain, account_uri, wild)}"'
            for base, wild in bases.items()]
