"""certbot lineages (renewal configs written by real certbot, fresh keys) translated into certd tables."""

from __future__ import annotations

import shutil
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import josepy as jose
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from certd.core.errors import UsageError
from certd.engine import certbot_import as ci
from certd.engine import certbot_read as cr

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "certbot"
KEYS = {"a.example.test": ec.SECP256R1(), "b site": 3072, "c.example.test": ec.SECP384R1(),
        "d.example.test": ec.SECP256R1(), "e.example.test": ec.SECP256R1()}
DOMAINS = {"a.example.test": ["a.example.test", "www.a.example.test"], "b site": ["b.example.test"]}


def _key(spec: object) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if isinstance(spec, int):
        return rsa.generate_private_key(public_exponent=65537, key_size=spec)
    assert isinstance(spec, ec.EllipticCurve)
    return ec.generate_private_key(spec)


def _lineage(root: Path, name: str, spec: object) -> None:
    """archive/<name>/*1.pem and live/<name>/*.pem symlinks, as certbot lays them out."""
    key = _key(spec)
    now = datetime.now(timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test issuer")])
    names = DOMAINS.get(name, [name])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=89))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    files = {"cert": cert_pem, "chain": cert_pem, "fullchain": cert_pem + cert_pem,
             "privkey": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())}
    (root / "archive" / name).mkdir(parents=True)
    (root / "live" / name).mkdir(parents=True)
    for kind, data in files.items():
        (root / "archive" / name / f"{kind}1.pem").write_bytes(data)
        (root / "live" / name / f"{kind}.pem").symlink_to(f"../../archive/{name}/{kind}1.pem")


@pytest.fixture
def le(tmp_path: Path) -> Path:
    root = tmp_path / "letsencrypt"
    shutil.copytree(FIXTURES, root, ignore=shutil.ignore_patterns("README.md"))
    for name, spec in KEYS.items():
        _lineage(root, name, spec)
    (account,) = root.glob("accounts/*/*/*")
    jwk = jose.JWKRSA(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    (account / "private_key.json").write_text(jwk.json_dumps())
    return root


def by_name(le: Path) -> dict[str, ci.Lineage]:
    lineages, refused = ci.plan(le)
    assert refused == []
    return {lin.conf.name: lin for lin in lineages}


def table(lin: ci.Lineage) -> dict[str, object]:
    text = "\n".join(line[2:] for line in lin.toml.splitlines()[1:]) if lin.commented else lin.toml
    (cert,) = tomllib.loads(text)["certificate"]
    return dict(cert)


def test_the_nested_webroot_map_and_top_level_keys_parse() -> None:
    """certbot's ConfigObj file: top-level paths, [renewalparams] and [[webroot_map]] are all read."""
    conf = cr.read_conf(FIXTURES / "renewal" / "b site.conf")
    assert conf.top["cert"] == "/etc/letsencrypt/live/b site/cert.pem"
    assert conf.params["authenticator"] == "webroot" and conf.params["preferred_chain"] == "Pebble Root"
    assert conf.webroot_map == {"b.example.test": "/var/www/html"}
    assert cr.webroot_paths(conf) == ["/var/www/html"]


def test_standalone_becomes_the_built_in_responder_on_certbots_address(le: Path) -> None:
    """authenticator = standalone -> http-01 with http01_listen on certbot's http01_address:port."""
    t = table(by_name(le)["a.example.test"])
    assert t["challenge"] == "http-01" and t["http01_listen"] == "127.0.0.1:53851"
    assert t["domains"] == ["a.example.test", "www.a.example.test"] and t["key_type"] == "ecdsa-p256"
    assert [f["content"] for f in t["deploy"]["files"]] == ["cert", "chain", "fullchain", "privkey"]  # type: ignore[index]
    assert t["deploy"]["files"][0]["path"] == str(le / "live" / "a.example.test" / "cert.pem")  # type: ignore[index]


def test_webroot_rsa_and_preferred_chain_are_carried_over_and_the_name_made_valid(le: Path) -> None:
    """A webroot lineage named "b site" becomes b-site, rsa-3072, http01_webroot, preferred_chain."""
    lin = by_name(le)["b site"]
    t = table(lin)
    assert (t["name"], t["key_type"], t["http01_webroot"], t["preferred_chain"]) == \
        ("b-site", "rsa-3072", "/var/www/html", "Pebble Root")
    assert any("renamed from certbot's 'b site'" in n for n in lin.notes)


def test_a_dns_plugin_is_a_commented_placeholder_with_one_line_to_fill_in(le: Path) -> None:
    """dns-cloudflare -> a commented dns-01 table with a dns01_hook placeholder and one note."""
    lin = by_name(le)["d.example.test"]
    assert lin.commented and all(line.startswith("#") for line in lin.toml.splitlines())
    assert table(lin)["dns01_hook"] == [ci.DNS_HOOK_PLACEHOLDER]
    assert len(lin.notes) == 1 and "dns01_hook" in lin.notes[0]


def test_nginx_authenticator_is_refused_with_its_reason_and_its_pre_hook_noted(le: Path) -> None:
    """authenticator = nginx is written commented out, saying why; its pre_hook is not carried over."""
    lin = by_name(le)["e.example.test"]
    assert lin.commented and any("nginx authenticator is not translated" in n for n in lin.notes)
    assert any("pre_hook" in n for n in lin.notes)


def test_hooks_plain_commands_become_argv_and_shell_ones_are_refused(le: Path) -> None:
    """renew_hook "systemctl reload nginx" -> an absolute argv; "echo done | logger" -> one refusal line."""
    argv, _ = ci.translate_hook("deploy_hook", "true --x 'a b'")
    assert argv == [shutil.which("true"), "--x", "a b"]  # quoted words split as sh would
    assert ci.translate_hook("post_hook", "echo done | logger")[0] is None
    assert ci.translate_hook("deploy_hook", "/bin/sh -c 'x; y'")[0] is None
    argv, why = ci.translate_hook("deploy_hook", f"{shutil.which('true')} --graceful")
    assert argv == [shutil.which("true"), "--graceful"] and why == ""
    missing, why = ci.translate_hook("renew_hook", "/usr/local/bin/no-such-reload --graceful")
    assert missing is None and "not an executable" in why
    lin = by_name(le)["a.example.test"]
    assert sum("post_hook" in n for n in lin.notes) == 1


def test_the_account_dir_is_found_from_the_server_url() -> None:
    """certbot keeps an account under accounts/<host><path>/<id> of its server's directory URL."""
    assert cr.account_dir(Path("/le"), "https://acme-v02.api.letsencrypt.org/directory", "x") == \
        Path("/le/accounts/acme-v02.api.letsencrypt.org/directory/x")


def test_the_account_is_read_as_certd_stores_it(le: Path) -> None:
    """read_account returns a PEM key that loads and the registration URI from regr.json."""
    account = cr.read_account(le, "https://acme-v02.api.letsencrypt.org/directory", "5c190261a04acec303086f67631f2ac5")
    assert account.uri == "https://acme-v02.api.letsencrypt.org/acme/acct/38072ad00a9041ac"
    assert isinstance(serialization.load_pem_private_key(account.key_pem, None), rsa.RSAPrivateKey)
    with pytest.raises(UsageError, match="cannot read certbot's account"):
        cr.read_account(le, "https://acme-v02.api.letsencrypt.org/directory", "nope")


def test_a_lineage_whose_files_are_gone_is_refused_alone(le: Path) -> None:
    """A lineage whose live/ files are missing gets one line; the others are still translated."""
    shutil.rmtree(le / "live" / "c.example.test")
    lineages, refused = ci.plan(le)
    assert len(refused) == 1 and refused[0].startswith("c.example.test: not imported: ")
    assert len(lineages) == 4


def test_a_directory_without_renewal_configs_is_one_clear_error(tmp_path: Path) -> None:
    """Pointing at something that is not certbot's config dir says what was expected."""
    with pytest.raises(UsageError, match="no renewal/ directory"):
        ci.plan(tmp_path)
    (tmp_path / "renewal").mkdir()
    with pytest.raises(UsageError, match="no \\*.conf"):
        ci.plan(tmp_path)


@pytest.mark.parametrize("raw,name", [("b site", "b-site"), ("..x", "x"), ("ü.example", "example"), ("", "certbot")])
def test_certd_names(raw: str, name: str) -> None:
    """Lineage names are mapped onto certd's name rules."""
    assert ci.certd_name(raw) == name
