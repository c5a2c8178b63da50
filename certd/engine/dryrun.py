"""``certd renew --dry-run``: a full order against a staging directory and the checks made before
a version is stored; nothing stored, deployed, reloaded, journaled or audited as a renewal.

What an SRE runs before trusting a new configuration: it proves the challenge setup (responder,
webroot, DNS hook), the account and the CA's acceptance of the names, key type and profile. It
orders from the ``staging_directory`` of the certificate's first CA (or ``--server``), never from the production
directory: a dry run there would count toward the CA's rate limits. The staging account is
registered once and kept in the state directory beside the production one (keyed by the
directory URL), so repeated dry runs do not create accounts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from certd.acme.issuer import connect
from certd.config import AcmeConfig, CertificateConfig
from certd.core.clock import isoformat
from certd.core.errors import OperationFailed, UsageError
from certd.core.model import split_pem_chain
from certd.crypto import certcheck, keys
from certd.engine.outcome import Outcome, Result
from certd.engine.ports import IssuerPort, Ports, Say
from certd.ops.log import event

log = logging.getLogger("certd.renew")


def staging_url(ports: Ports, server: str | None, cert: CertificateConfig | None = None) -> tuple[AcmeConfig, str]:
    """The CA a dry run of ``cert`` stands in for (its first CA: the one its renewals order from;
    no ``cert``: the first configured) and the directory it orders from; :class:`UsageError`
    without one."""
    acme = ports.config.cas_for(cert)[0] if cert is not None else ports.config.acme
    table = acme.table
    url = server or acme.staging_directory
    if url is None:
        whose = f" ({cert.name}'s first CA)" if cert is not None and table != "[acme]" else ""
        raise UsageError(f"renew --dry-run: no {table} staging_directory{whose}; a dry run against the production "
                         f"directory ({acme.directory}) would count toward its rate limits: set staging_directory "
                         "or pass --server URL")
    if url == acme.directory:
        raise UsageError(f"renew --dry-run: {url} is the production directory of {table}; a dry run there counts "
                         "toward its rate limits: name the CA's staging directory")
    return acme, url


def dry_run(ports: Ports, certs: list[CertificateConfig], server: str | None, initiator: str,
            progress: Callable[[str, str], None] | None = None) -> list[Outcome]:
    """Order each certificate from the staging directory of its first CA and check what comes
    back (every certificate's staging directory is checked before any order)."""
    where = {cert.name: staging_url(ports, server, cert) for cert in certs}
    issuers: dict[str, IssuerPort] = {}
    try:
        out = []
        for cert in certs:
            acme, url = where[cert.name]
            if url not in issuers:
                # Not the production account's External Account Binding: EAB keys are often
                # single-use, and a staging CA that needs one says so (externalAccountRequired).
                issuers[url] = connect(dataclasses.replace(acme, directory=url, eab_kid=None, eab_hmac_key=None,
                                                           eab_hmac_key_file=None), ports.store, ports.clock)
            out.append(_one(ports, issuers[url], cert, url, initiator, progress))
        return out
    finally:
        for issuer in issuers.values():
            issuer.close()


def _one(ports: Ports, issuer: IssuerPort, cert: CertificateConfig, url: str, initiator: str,
         progress: Callable[[str, str], None] | None) -> Outcome:
    say: Say = (lambda msg: progress(cert.name, msg)) if progress is not None else (lambda _msg: None)
    say(f"dry run against {url}")
    key_pem = keys.generate_private_key(cert.key_type)
    try:
        fullchain = issuer.issue(cert, key_pem, progress=say)
        bundle = certcheck.check_issued(fullchain, key_pem, cert.identifiers, ports.clock.now())
    except OperationFailed as e:
        event(log, "dry_run_failed", logging.WARNING, name=cert.name, server=url, error=str(e), initiator=initiator)
        return Outcome(cert.name, Result.FAILED, f"dry run failed: {e}")
    info = bundle.info
    event(log, "dry_run_ok", name=cert.name, server=url, serial=info.serial, initiator=initiator)
    chain = len(split_pem_chain(bundle.chain_pem)) if bundle.chain_pem else 0
    return Outcome(cert.name, Result.CHECKED,
                   f"dry run OK against {url}: would store serial {info.serial}, not after "
                   f"{isoformat(info.not_after)}, {chain} chain certificate(s); nothing stored or deployed",
                   serial=info.serial)
