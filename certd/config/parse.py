"""Parsed TOML -> the validated Config: one method per section, every problem collected as
``<file>: <key>: <what is wrong and what is expected>`` (see certd/config/schema.py)."""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from certd.config.cas import CASections
from certd.config.cluster import ClusterSection
from certd.config.keyclass import KeyClassSections
from certd.config.rollout import RolloutSection
from certd.config.schema import (CHALLENGES, KEY_TYPES, AcmeConfig,
                          AlertsConfig, CertificateConfig, Config, DaemonConfig, KeysConfig, RenewBefore)
from certd.config.values import Table, is_loopback, normalize_domain, parse_duration, type_name

from certd.config.targets import TargetSections

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: "$" would let "www\n" through
_PROFILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class Parser(TargetSections, KeyClassSections, ClusterSection, CASections, RolloutSection):
    """Builds a Config from parsed TOML, collecting every problem instead of stopping at the first."""

    def config(self, data: dict[str, Any]) -> Config | None:
        top = Table(self, "", data)
        daemon = self.daemon(Table(self, "daemon", top.get("daemon", dict, {})))
        self.acme_was_there = "acme" in data
        if isinstance(data.get("ca"), dict):  # [ca] for [[ca]]: one line, not three (type, no CA, unknown names)
            self.problem("ca", "a single [ca] table; CA tables are written [[ca]] (two brackets), one per CA")
            self.ca_unreadable = True
            top.get("ca", dict, None)  # read (so not also "unknown key")
        ca_raw = [] if self.ca_unreadable else top.get("ca", list, [])
        cas = self.cas(top.get("acme", dict, None), ca_raw)  # before the certificates naming them
        certs_raw = top.get("certificate", list, [])
        alerts_t = top.get("alerts", dict, None)
        alerts = self.alerts(Table(self, "alerts", alerts_t)) if alerts_t is not None else None
        keys_t = top.get("keys", dict, None)
        keys = self.keys(Table(self, "keys", keys_t)) if keys_t is not None else None
        classes = self.key_classes(top.get("key_class", list, []))  # before the certificates naming them
        cluster_t = top.get("cluster", dict, None)
        cluster = self.cluster(Table(self, "cluster", cluster_t), has_keys=keys_t is not None) \
            if cluster_t is not None else None
        top.done()
        certs: list[CertificateConfig] = []
        names: dict[str, int] = {}
        targets: dict[Path, tuple[int, str, str]] = {}
        for i, raw in enumerate(certs_raw):
            cert = self.certificate(i, raw)
            if cert is None:
                continue
            if cert.name in names:
                self.problem(f"certificate[{i}].name", f"duplicate name {cert.name!r} (also certificate[{names[cert.name]}]); names must be unique")
            names.setdefault(cert.name, i)
            self.check_shared_targets(i, cert, targets)
            self.check_named_canary(i, cert, cluster.node if cluster is not None else None)
            certs.append(cert)
        if not cas:
            return None
        return Config(self.path, daemon, cas[0], tuple(certs), alerts, keys, classes, cluster, cas=cas)

    def keys(self, t: Table) -> KeysConfig | None:
        kek_file = self.path_value(t, "kek_file")
        credential = t.get("kek_credential", str)
        uri = t.get("kek", str)
        module = self.path_value(t, "pkcs11_module", must_exist=uri is not None)
        pin_file = self.path_value(t, "pkcs11_pin_file", must_exist=uri is not None)
        old_raw = t.get("old_kek_files", list, [])
        recipient = t.get("backup_recipient", str)
        t.done()
        sources = [k for k, v in (("kek_file", kek_file), ("kek_credential", credential), ("kek", uri)) if v is not None]
        if len(sources) != 1:
            self.problem(t.key("kek_file"), "set exactly one KEK source: kek_file = \"/etc/certd/kek\" (create it with "
                                           "`certd kek init`), kek_credential = \"NAME\" (systemd LoadCredential=), "
                                           f"or kek = \"pkcs11:token=...;object=...\"; found {', '.join(sources) or 'none'}")
        if credential is not None and not _NAME_RE.fullmatch(credential):
            self.problem(t.key("kek_credential"), f"{credential!r} is not a credential name (the first field of "
                                                  "LoadCredential=, e.g. \"certd-kek\")")
        if uri is not None:
            if not re.fullmatch(r"pkcs11:(?=.*\btoken=[^;]+)(?=.*\bobject=[^;]+)[^\s]*", uri):
                self.problem(t.key("kek"), f"{uri!r}: expected a PKCS#11 URI naming token and object, e.g. "
                                           "\"pkcs11:token=certd;object=kek\"")
            for k, v in (("pkcs11_module", module), ("pkcs11_pin_file", pin_file)):
                if v is None and not t.data.get(k):
                    self.problem(t.key(k), f"kek = \"pkcs11:...\" needs {k}")
        elif (module is None) != (pin_file is None):
            # beside kek_file they serve `certd kek rotate --new pkcs11:...` (moving onto a token)
            self.problem(t.key("pkcs11_module"), "pkcs11_module and pkcs11_pin_file go together")
        old: list[Path] = []
        for j, raw in enumerate(old_raw):
            if not isinstance(raw, str) or not raw:
                self.problem(t.key(f"old_kek_files[{j}]"), f"expected a file path, got {type_name(raw)}")
                continue
            p = Path(raw)
            old.append(p if p.is_absolute() else self.base / p)
        if recipient is not None and not re.fullmatch(r"age1[02-9ac-hj-np-z]{58}", recipient):
            self.problem(t.key("backup_recipient"), f"{recipient!r} is not an age recipient (age1 followed by 58 "
                                                    "bech32 characters; `age-keygen -y IDENTITY` prints it)")
        if len(sources) != 1:
            return None
        return KeysConfig(kek_file, credential, uri, module, pin_file, tuple(old), recipient)

    def check_shared_targets(self, i: int, cert: CertificateConfig, seen: dict[Path, tuple[int, str, str]]) -> None:
        """Two certificates deploying to one path would overwrite each other: the second one's
        renewal then fails at staging. Refused here, naming both certificates."""
        d = cert.deploy
        mine = [("live_dir", d.live_dir), ("combined", d.combined),
                *((f"files[{j}].path", f.path) for j, f in enumerate(d.files))]
        for key, path in mine:
            if path is None:
                continue
            other = seen.get(path)
            if other is None:
                seen[path] = (i, cert.name, key)
            elif other[0] != i:
                self.problem(f"certificate[{i}].deploy.{key}",
                             f"{path} is also certificate[{other[0]}] ({other[1]})'s deploy.{other[2]}; two "
                             f"certificates ({other[1]} and {cert.name}) cannot deploy to the same path: give each its own")

    def daemon(self, t: Table) -> DaemonConfig:
        d = DaemonConfig()
        state_dir = self.path_value(t, "state_dir") or d.state_dir
        sock = self.path_value(t, "control_socket") or d.control_socket
        group = t.get("control_group", str)
        if group is not None:
            self.check_group(t.key("control_group"), group)
        metrics = self.listen(t, "metrics_listen")
        workers = t.get("workers", int, d.workers)
        if not 1 <= workers <= 64:
            self.problem(t.key("workers"), f"{workers} is out of range; expected 1..64")
        ca_probe = self.duration(t, "ca_probe_interval", DaemonConfig.ca_probe_interval)
        allow_remote = t.get("metrics_allow_remote", bool, False)
        if metrics is not None and not allow_remote and not is_loopback(metrics.host):
            self.problem(t.key("metrics_listen"), f"{metrics.host} is not a loopback address; metrics name every certificate and its schedule: keep 127.0.0.1 (scrape through a proxy) or set metrics_allow_remote = true")
        textfile = self.path_value(t, "metrics_textfile")
        if textfile is not None and textfile.suffix != ".prom":
            self.problem(t.key("metrics_textfile"), f"{textfile.name}: node_exporter's textfile collector reads only *.prom files; use e.g. \"/var/lib/node_exporter/certd.prom\"")
        elif textfile is not None and self.check_runtime and not textfile.parent.is_dir():
            self.problem(t.key("metrics_textfile"), f"directory {textfile.parent} does not exist; create it or choose another path")
        drift_interval = self.duration(t, "drift_interval", DaemonConfig.drift_interval)
        repair = t.get("repair_drift", bool, False)
        t.done()
        if self.check_runtime and not sock.parent.is_dir():
            self.problem(t.key("control_socket"), f"directory {sock.parent} does not exist; create it (systemd's RuntimeDirectory=certd does) or choose another path")
        return DaemonConfig(state_dir, sock, group, metrics, workers, ca_probe_interval=ca_probe,
                            metrics_allow_remote=allow_remote, metrics_textfile=textfile,
                            drift_interval=drift_interval, repair_drift=repair)

    def alerts(self, t: Table) -> AlertsConfig | None:
        url = t.get("webhook_url", str, required=True)
        token = t.get("bearer_token", str)
        if token is not None:
            self.inline_secret(t, "bearer_token", "bearer_token_file")
        token_file = self.path_value(t, "bearer_token_file", must_exist=True)
        timeout = self.duration(t, "timeout", AlertsConfig.timeout)
        t.done()
        if timeout > 60:
            self.problem(t.key("timeout"), f"{timeout:g}s is too long for one attempt; expected at most \"60s\" (failed attempts are retried)")
        if token is not None and token_file is not None:
            self.problem(t.key("bearer_token"), "set bearer_token or bearer_token_file, not both")
        if token is not None and not token.strip():
            self.problem(t.key("bearer_token"), "empty token; remove the key or set the token")
        if token_file is not None:
            try:
                if token_file.stat().st_mode & 0o007:
                    self.problem(t.key("bearer_token_file"), f"{token_file} is accessible to other users; it holds a secret (chmod o-rwx)")
            except OSError:
                pass  # must_exist reported it
        if url is None:
            return None
        m = re.match(r"^(https?)://(\[[0-9A-Fa-f:.]+\]|[^/\s:?#]+)(:\d+)?([/?]\S*)?$", url)
        if not m:
            self.problem(t.key("webhook_url"), f"{url!r} is not an http(s) URL; expected e.g. \"https://hooks.example.test/certd\"")
            return None
        if m.group(1) == "http" and (token or token_file) and not is_loopback(m.group(2).strip("[]")):
            self.problem(t.key("webhook_url"), f"{url!r}: the bearer token would cross the network in clear text; use https://")
        return AlertsConfig(url, token, token_file, timeout)

    def directory_url(self, t: Table, key: str, required: bool = False) -> str | None:
        directory = t.get(key, str, required=required)
        if directory is not None and not re.match(r"^https?://[^/\s]+(/\S*)?$", directory):
            self.problem(t.key(key), f"{directory!r} is not an http(s) URL; expected e.g. \"https://127.0.0.1:14000/dir\"")
        elif directory is not None and directory.lower().startswith("http://") and not is_loopback(
                urlsplit(directory).hostname or ""):
            self.problem(t.key(key), f"{directory!r}: plain http:// is for a loopback test CA only; the "
                                     "account's requests would cross the network in clear text; use https://")
        return directory

    def acme(self, t: Table) -> AcmeConfig | None:
        directory = self.directory_url(t, "directory", required=True)
        staging = self.directory_url(t, "staging_directory")
        if staging is not None and staging == directory:
            self.problem(t.key("staging_directory"), "is the production directory; a dry run there counts toward "
                                                     "its rate limits: name the CA's staging directory")
        email = t.get("email", str)
        if email is not None and not _EMAIL_RE.match(email):
            self.problem(t.key("email"), f"{email!r} is not an e-mail address")
        agree = t.get("agree_tos", bool, False)
        ca_bundle = self.path_value(t, "ca_bundle", must_exist=True)
        anchors = self.path_value(t, "trust_anchors", must_exist=True)
        kid = t.get("eab_kid", str)
        hmac = t.get("eab_hmac_key", str)
        hmac_file = self.path_value(t, "eab_hmac_key_file", must_exist=True)
        if hmac is not None:
            self.inline_secret(t, "eab_hmac_key", "eab_hmac_key_file")
            if hmac_file is not None:
                self.problem(t.key("eab_hmac_key"), "set eab_hmac_key or eab_hmac_key_file, not both")
        elif hmac_file is not None:
            hmac = self.secret_file(t, "eab_hmac_key_file", hmac_file)
        if (kid is None) != (hmac is None and hmac_file is None):
            self.problem(t.key("eab_kid" if kid is None else "eab_hmac_key"), "External Account Binding needs both eab_kid and eab_hmac_key (or eab_hmac_key_file)")
        if hmac is not None and not re.match(r"^[A-Za-z0-9_=-]+$", hmac):
            self.problem(t.key("eab_hmac_key_file" if hmac_file else "eab_hmac_key"), "expected base64url text (as the CA handed it out)")
        order_timeout = self.duration(t, "order_timeout", AcmeConfig.order_timeout)
        t.done()
        if directory is None:
            return None
        return AcmeConfig(directory, email, agree, ca_bundle, kid, hmac, order_timeout, eab_hmac_key_file=hmac_file,
                          staging_directory=staging, trust_anchors=anchors)

    def certificate(self, i: int, raw: Any) -> CertificateConfig | None:
        t = Table(self, f"certificate[{i}]", raw)
        name = t.get("name", str, required=True)
        if name is not None:
            if not _NAME_RE.fullmatch(name):
                self.problem(t.key("name"), f"{name!r}: expected 1-64 characters of letters, digits, '.', '_', '-' (it names a directory)")
                name = None
            else:
                t.where = f"certificate[{i}] ({name})"
        domains = self.domains(t)
        key_type = t.get("key_type", str, "ecdsa-p256")
        if key_type not in KEY_TYPES:
            self.problem(t.key("key_type"), f"unknown key type {key_type!r}; expected one of {', '.join(KEY_TYPES)}")
        reuse_key = t.get("reuse_key", bool, False)
        challenge = t.get("challenge", str, "http-01")
        http_listen = self.listen(t, "http01_listen")
        webroot = self.path_value(t, "http01_webroot")
        dns_hook = self.argv(t, "dns01_hook")
        persist_hook = self.argv(t, "dns_persist_hook")
        alpn_listen = self.listen(t, "tlsalpn01_listen")
        self.check_challenge(t, challenge, domains)
        ips = self.ip_addresses(t, challenge)
        renew_before = self.renew_before(t)
        keep = t.get("keep_versions", int, 5)
        if not 2 <= keep <= 100:
            self.problem(t.key("keep_versions"), f"{keep} is out of range; expected 2..100 (the previous version is the rollback backup)")
        verify_timeout = self.duration(t, "verify_timeout", 10.0)
        insecure_shared = t.get("insecure_shared_deploy_dir", bool, False)
        ref = self.class_ref(t)
        ca_refs = self.ca_refs(t)
        profile, preferred = self.profiles(t)
        chain = t.get("preferred_chain", str)
        if chain is not None and not chain.strip():
            self.problem(t.key("preferred_chain"), "empty; name the issuer CN of the chain's topmost certificate, "
                                                   "e.g. \"ISRG Root X1\", or remove the key")
            chain = None
        deploy = self.deploy(Table(self, t.key("deploy"), t.get("deploy", dict, {})))
        hooks = tuple(h for j, raw_h in enumerate(t.get("reload", list, []))
                      if (h := self.reload(Table(self, t.key(f"reload[{j}]"), raw_h), deploy)) is not None)
        default_sni = next((d for d in domains if not d.startswith("*.")),
                           domains[0][2:] if domains else (ips[0] if ips else ""))
        verify = tuple(v for j, raw_v in enumerate(t.get("verify", list, []))
                       if (v := self.verify(Table(self, t.key(f"verify[{j}]"), raw_v), default_sni)) is not None)
        rollout = self.rollout(t)
        t.done()
        if name is None or not (domains or ips):
            return None
        cert = CertificateConfig(name, tuple(domains), key_type, reuse_key, challenge, http_listen,
                                 webroot, dns_hook, alpn_listen, renew_before, keep, verify_timeout,
                                 deploy, hooks, verify, insecure_shared, profile=profile,
                                 preferred_profile=preferred, preferred_chain=chain, ip_addresses=tuple(ips),
                                 dns_persist_hook=persist_hook, ca=ca_refs, rollout=rollout)
        return self.apply_key_class(cert, ref)

    def profiles(self, t: Table) -> tuple[str | None, str | None]:
        """``profile`` (required of the CA) or ``preferred_profile`` (used when offered)."""
        found = []
        for key in ("profile", "preferred_profile"):
            value = t.get(key, str)
            if value is not None and not _PROFILE_RE.fullmatch(value):
                self.problem(t.key(key), f"{value!r}: expected a profile name as the CA's directory lists it "
                                         "(letters, digits, '.', '_', '-'), e.g. \"tlsserver\"")
                value = None
            found.append(value)
        if found[0] is not None and found[1] is not None:
            self.problem(t.key("preferred_profile"), "set profile (the CA must offer it) or preferred_profile "
                                                     "(used when offered), not both")
        return found[0], found[1]

    def domains(self, t: Table) -> list[str]:
        with_ips = bool(t.data.get("ip_addresses")) if isinstance(t.data, dict) else False
        raw = t.get("domains", list, [] if with_ips else None, required=not with_ips)
        if raw is None:
            return []
        if not raw and not with_ips:
            self.problem(t.key("domains"), "empty; list at least one domain name (or ip_addresses)")
        out: list[str] = []
        for j, d in enumerate(raw):
            key = t.key(f"domains[{j}]")
            if not isinstance(d, str):
                self.problem(key, f"expected a string, got {type_name(d)}")
                continue
            norm, why = normalize_domain(d)
            if why:
                self.problem(key, why)
            elif norm in out:
                self.problem(key, f"{d!r} is listed twice")
            else:
                out.append(norm)
        return out

    def ip_addresses(self, t: Table, challenge: str) -> list[str]:
        """RFC 8738 identifiers, in compressed text form; not for dns-01 (no DNS name to put a
        TXT record under); no unspecified, multicast or zoned (``fe80::1%eth0``) address."""
        out: list[str] = []
        for j, raw in enumerate(t.get("ip_addresses", list, [])):
            key = t.key(f"ip_addresses[{j}]")
            try:
                ip = str(ipaddress.ip_address(raw)) if isinstance(raw, str) else None
            except ValueError:
                ip = None
            addr = ipaddress.ip_address(ip) if ip is not None and "%" not in ip else None
            if ip is None or addr is None:
                self.problem(key, f"{raw!r} is not an IP address a certificate can name; expected e.g. \"192.0.2.10\" "
                                  "or \"2001:db8::10\" (no %zone)")
            elif addr.is_unspecified or addr.is_multicast:
                self.problem(key, f"{raw!r} is an unspecified or multicast address; no CA can validate it")
            elif ip in out:
                self.problem(key, f"{raw!r} is listed twice")
            else:
                out.append(ip)
        if out and challenge not in ("http-01", "tls-alpn-01"):
            self.problem(t.key("ip_addresses"), f"IP addresses can only be validated with http-01 or tls-alpn-01 "
                                                f"(RFC 8738 §7), not {challenge}")
        return out

    def check_challenge(self, t: Table, challenge: str, domains: list[str]) -> None:
        """Cross-key checks; a key that is present but invalid was reported already."""
        has = t.data.__contains__
        if challenge not in CHALLENGES:
            self.problem(t.key("challenge"), f"unknown challenge {challenge!r}; expected one of {', '.join(CHALLENGES)}")
            return
        wild = [d for d in domains if d.startswith("*.")]
        if wild and challenge not in ("dns-01", "dns-persist-01"):
            self.problem(t.key("challenge"), f"{wild[0]!r} is a wildcard; wildcards can only be validated with challenge = \"dns-01\" or \"dns-persist-01\" (RFC 8555 §7.1.3)")
        if challenge == "http-01":
            if has("http01_listen") == has("http01_webroot"):
                self.problem(t.key("http01_listen"), "http-01 needs exactly one of http01_listen (built-in responder) or http01_webroot")
        elif challenge == "dns-01" and not has("dns01_hook"):
            self.problem(t.key("dns01_hook"), "dns-01 needs dns01_hook = [\"/path/to/hook\", ...] to set and clear the TXT record")
        if has("dns_persist_hook") and challenge != "dns-persist-01":
            self.problem(t.key("dns_persist_hook"), f"goes with challenge = \"dns-persist-01\", not {challenge!r}")
        if challenge == "tls-alpn-01" and not has("tlsalpn01_listen"):
            self.problem(t.key("tlsalpn01_listen"), "tls-alpn-01 needs tlsalpn01_listen = \"host:port\" for the built-in responder")

    def renew_before(self, t: Table) -> RenewBefore | None:
        raw = t.get("renew_before", str)
        if raw is None:
            return None
        m = re.match(r"^\s*(\d+)\s*/\s*(\d+)\s*$", raw)
        if m:
            num, den = int(m.group(1)), int(m.group(2))
            if den == 0 or not 0 < num < den:
                self.problem(t.key("renew_before"), f"{raw!r}: a fraction must lie strictly between 0 and 1, e.g. \"1/3\"")
                return None
            return RenewBefore(fraction=Fraction(num, den))
        seconds = parse_duration(raw)
        if seconds is None or seconds <= 0:
            self.problem(t.key("renew_before"), f"{raw!r}: expected a fraction such as \"1/3\" or a duration such as \"30d\", \"12h\", \"90m\"")
            return None
        return RenewBefore(duration=timedelta(seconds=seconds))
