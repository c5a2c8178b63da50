"""Configuration validation over a corpus of bad configs: one actionable line each, exit 2."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from certd import config
from certd.core.errors import ConfigError

GOOD = """
[daemon]
state_dir = "state"
control_socket = "run/control.sock"

[acme]
directory = "https://127.0.0.1:14000/dir"
email = "ops@example.test"
agree_tos = true

[[certificate]]
name = "www"
domains = ["www.example.test", "example.test"]
http01_listen = "127.0.0.1:5002"

[certificate.deploy]
live_dir = "live/www"

[[certificate.reload]]
command = ["/bin/true"]

[[certificate.verify]]
endpoint = "127.0.0.1:8443"
"""

ACME = '[acme]\ndirectory = "https://127.0.0.1:14000/dir"\n'


def cert(body: str, name: str = "www") -> str:
    return ACME + f'[[certificate]]\nname = "{name}"\n' + body


# (id, config text, fragments every one of which must appear in the single problem line)
CORPUS: list[tuple[str, str, tuple[str, ...]]] = [
    ("toml-syntax", "[acme\ndirectory = 1", ("TOML syntax error", "line 1")),
    ("toml-unterminated-string", ACME + 'email = "ops@x.test\n', ("TOML syntax error",)),
    ("toml-duplicate-key", ACME + 'email = "a@b.test"\nemail = "c@d.test"\n', ("TOML syntax error",)),
    ("missing-acme", '[daemon]\nstate_dir = "/tmp/x"\n', ("acme", "required key is missing")),
    ("acme-not-table", 'acme = "https://x"\n', ("acme", "expected a table")),
    ("missing-directory", '[acme]\nemail = "a@b.test"\n', ("acme.directory", "required key is missing")),
    ("directory-not-url", '[acme]\ndirectory = "127.0.0.1:14000"\n', ("acme.directory", "not an http(s) URL")),
    ("directory-http-remote", '[acme]\ndirectory = "http://ca.example.test/dir"\n', ("acme.directory", "loopback test CA only", "https://")),
    ("directory-ftp", '[acme]\ndirectory = "ftp://ca.test/dir"\n', ("acme.directory", "not an http(s) URL")),
    ("directory-int", '[acme]\ndirectory = 14000\n', ("acme.directory", "expected a string, got an integer")),
    ("bad-email", ACME + 'email = "ops-at-example"\n', ("acme.email", "not an e-mail address")),
    ("agree-tos-string", ACME + 'agree_tos = "yes"\n', ("acme.agree_tos", "expected true or false")),
    ("missing-ca-bundle", ACME + 'ca_bundle = "/nonexistent/ca.pem"\n', ("acme.ca_bundle", "/nonexistent/ca.pem does not exist")),
    ("eab-half", ACME + 'eab_kid = "kid-1"\n', ("eab_hmac_key", "both eab_kid and eab_hmac_key")),
    ("eab-bad-hmac", ACME + 'eab_kid = "k"\neab_hmac_key = "not base64!"\n', ("acme.eab_hmac_key", "base64url")),
    ("unknown-top-key", ACME + 'certificates = []\n', ("certificates", "unknown key")),
    ("unknown-acme-key", ACME + 'emial = "a@b.test"\n', ("acme.emial", "unknown key")),
    ("unknown-daemon-key", '[daemon]\nstatedir = "/x"\n' + ACME, ("daemon.statedir", "unknown key")),
    ("workers-zero", '[daemon]\nworkers = 0\n' + ACME, ("daemon.workers", "out of range")),
    ("workers-bool", '[daemon]\nworkers = true\n' + ACME, ("daemon.workers", "expected an integer, got true or false")),
    ("metrics-port-range", '[daemon]\nmetrics_listen = "127.0.0.1:99999"\n' + ACME, ("daemon.metrics_listen", "out of range")),
    ("metrics-no-port", '[daemon]\nmetrics_listen = "localhost"\n' + ACME, ("daemon.metrics_listen", "host:port")),
    ("control-group-unknown", '[daemon]\ncontrol_group = "no-such-group-xyz"\n' + ACME, ("daemon.control_group", "no such group")),
    ("certificate-not-array", ACME + '[certificate]\nname = "www"\n', ("certificate", "expected an array")),
    ("missing-name", ACME + '[[certificate]]\ndomains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n', ("certificate[0].name", "required")),
    ("bad-name-slash", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n', name="../etc"), ("name", "names a directory")),
    ("bad-name-empty", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n', name=""), ("name",)),
    ("duplicate-name", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n') + '[[certificate]]\nname = "www"\ndomains = ["b.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n', ("duplicate name 'www'",)),
    ("missing-domains", cert('http01_listen = "127.0.0.1:5002"\n'), ("(www).domains", "required")),
    ("empty-domains", cert('domains = []\nhttp01_listen = "127.0.0.1:5002"\n'), ("(www).domains", "empty")),
    ("domains-string", cert('domains = "a.example.test"\nhttp01_listen = "127.0.0.1:5002"\n'), ("(www).domains", "expected an array")),
    ("domain-int", cert('domains = [42]\nhttp01_listen = "127.0.0.1:5002"\n'), ("domains[0]", "expected a string")),
    ("domain-single-label", cert('domains = ["localhost"]\nhttp01_listen = "127.0.0.1:5002"\n'), ("domains[0]", "single-label")),
    ("domain-ip", cert('domains = ["127.0.0.1"]\nhttp01_listen = "127.0.0.1:5002"\n'), ("domains[0]", "IP address")),
    ("domain-underscore", cert('domains = ["bad_name.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n'), ("domains[0]", "not a valid")),
    ("domain-leading-hyphen", cert('domains = ["-www.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n'), ("domains[0]", "not a valid")),
    ("domain-label-too-long", cert(f'domains = ["{"a" * 64}.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n'), ("domains[0]",)),
    ("domain-bad-idn", cert('domains = ["xn--zz.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n'), ("domains[0]", "not a valid")),
    ("domain-space", cert('domains = ["www example.test"]\nhttp01_listen = "127.0.0.1:5002"\n'), ("domains[0]",)),
    ("domain-duplicate", cert('domains = ["a.example.test", "A.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n'), ("domains[1]", "listed twice")),
    ("wildcard-middle", cert('domains = ["www.*.example.test"]\nchallenge = "dns-01"\ndns01_hook = ["/bin/true"]\n'), ("domains[0]", "left-most label")),
    ("wildcard-http01", cert('domains = ["*.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n'), ("(www).challenge", "wildcard", "dns-01")),
    ("wildcard-tls-alpn", cert('domains = ["*.example.test"]\nchallenge = "tls-alpn-01"\ntlsalpn01_listen = "127.0.0.1:5001"\n'), ("wildcard", "dns-01")),
    ("unknown-key-type", cert('domains = ["a.example.test"]\nkey_type = "ed25519"\nhttp01_listen = "127.0.0.1:5002"\n'), ("(www).key_type", "unknown key type 'ed25519'", "ecdsa-p256")),
    ("unknown-challenge", cert('domains = ["a.example.test"]\nchallenge = "http-02"\n'), ("(www).challenge", "unknown challenge")),
    ("http01-no-responder", cert('domains = ["a.example.test"]\n'), ("http01_listen", "exactly one of")),
    ("http01-both", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\nhttp01_webroot = "/var/www"\n'), ("exactly one of",)),
    ("http01-port-zero", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:0"\n'), ("http01_listen", "out of range")),
    ("http01-port-huge", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:65536"\n'), ("http01_listen", "out of range")),
    ("http01-port-text", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:http"\n'), ("http01_listen", "host:port")),
    ("dns01-no-hook", cert('domains = ["a.example.test"]\nchallenge = "dns-01"\n'), ("dns01_hook", "set and clear")),
    ("dns01-relative-hook", cert('domains = ["a.example.test"]\nchallenge = "dns-01"\ndns01_hook = ["hooks/dns"]\n'), ("dns01_hook", "not an absolute path")),
    ("dns01-missing-hook", cert('domains = ["a.example.test"]\nchallenge = "dns-01"\ndns01_hook = ["/nonexistent/hook"]\n'), ("dns01_hook", "does not exist")),
    ("dns01-hook-not-exec", cert('domains = ["a.example.test"]\nchallenge = "dns-01"\ndns01_hook = ["/etc/passwd"]\n'), ("dns01_hook", "not an executable")),
    ("dns01-hook-args-int", cert('domains = ["a.example.test"]\nchallenge = "dns-01"\ndns01_hook = ["/bin/true", 5]\n'), ("dns01_hook", "must be a string")),
    ("alpn-no-listen", cert('domains = ["a.example.test"]\nchallenge = "tls-alpn-01"\n'), ("tlsalpn01_listen",)),
    ("renew-before-fraction-one", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\nrenew_before = "3/3"\n'), ("renew_before", "strictly between 0 and 1")),
    ("renew-before-zero-den", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\nrenew_before = "1/0"\n'), ("renew_before",)),
    ("renew-before-bad-unit", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\nrenew_before = "30 days"\n'), ("renew_before", "\"30d\"")),
    ("renew-before-int", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\nrenew_before = 30\n'), ("renew_before", "expected a string")),
    ("keep-versions-one", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\nkeep_versions = 1\n'), ("keep_versions", "rollback backup")),
    ("verify-timeout-bad", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\nverify_timeout = "soon"\n'), ("verify_timeout", "positive duration")),
    ("unknown-cert-key", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\nreuse-key = true\n'), ("(www).reuse-key", "unknown key")),
    ("deploy-unknown-key", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[certificate.deploy]\nlivedir = "/x"\n'), ("deploy.livedir", "unknown key")),
    ("deploy-unknown-group", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[certificate.deploy]\ngroup = "no-such-group-xyz"\n'), ("deploy.group", "no such group")),
    ("deploy-same-path", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[certificate.deploy]\nlive_dir = "/etc/x"\ncombined = "/etc/x"\n'), ("same path",)),
    ("deploy-file-bad-content", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.deploy.files]]\npath = "/etc/x.pem"\ncontent = "pfx"\n'), ("files[0].content", "unknown content")),
    ("deploy-file-key-world-readable", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.deploy.files]]\npath = "/etc/x.key"\ncontent = "privkey"\nmode = "0644"\n'), ("files[0].mode", "private key")),
    ("deploy-file-bad-mode", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.deploy.files]]\npath = "/etc/x.pem"\ncontent = "cert"\nmode = "rw-r--r--"\n'), ("files[0].mode", "octal")),
    ("deploy-file-unknown-owner", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.deploy.files]]\npath = "/etc/x.pem"\ncontent = "cert"\nowner = "no-such-user-xyz"\n'), ("files[0].owner", "no such user")),
    ("reload-neither", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.reload]]\ntimeout = "5s"\n'), ("reload[0]", "exactly one of")),
    ("reload-unknown-builtin", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.reload]]\nhook = "apache"\n'), ("reload[0].hook", "unknown built-in hook 'apache'")),
    ("reload-command-shell-string", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.reload]]\ncommand = "systemctl reload nginx"\n'), ("reload[0].command", "expected an array")),
    ("reload-command-relative", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.reload]]\ncommand = ["nginx", "-s", "reload"]\n'), ("reload[0].command", "not an absolute path", "without a shell")),
    ("reload-command-empty", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.reload]]\ncommand = []\n'), ("reload[0]",)),
    ("reload-timeout-negative", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.reload]]\ncommand = ["/bin/true"]\ntimeout = "-5s"\n'), ("reload[0].timeout", "positive duration")),
    ("reload-nginx-missing-config", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.reload]]\nhook = "nginx"\nconfig = "/nonexistent/nginx.conf"\n'), ("reload[0].config", "does not exist")),
    ("reload-haproxy-no-socket", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[certificate.deploy]\ncombined = "/etc/haproxy/www.pem"\n[[certificate.reload]]\nhook = "haproxy"\n'), ("reload[0].socket", "stats socket")),
    ("reload-haproxy-no-crt", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.reload]]\nhook = "haproxy"\nsocket = "/run/haproxy.sock"\n'), ("reload[0].crt",)),
    ("reload-unknown-key", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.reload]]\ncommand = ["/bin/true"]\nshell = true\n'), ("reload[0].shell", "unknown key")),
    ("verify-no-endpoint", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.verify]]\nsni = "a.example.test"\n'), ("verify[0].endpoint", "required")),
    ("verify-bad-endpoint", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.verify]]\nendpoint = "https://127.0.0.1:443/"\n'), ("verify[0].endpoint", "host:port")),
    ("verify-port-range", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.verify]]\nendpoint = "127.0.0.1:70000"\n'), ("verify[0].endpoint", "out of range")),
    ("verify-wildcard-sni", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.verify]]\nendpoint = "127.0.0.1:443"\nsni = "*.example.test"\n'), ("verify[0].sni", "wildcard")),
    ("verify-missing-ca", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.verify]]\nendpoint = "127.0.0.1:443"\nca_bundle = "/nonexistent/root.pem"\n'), ("verify[0].ca_bundle", "does not exist")),
    ("metrics-not-loopback", '[daemon]\nmetrics_listen = "0.0.0.0:9464"\n' + ACME, ("daemon.metrics_listen", "0.0.0.0 is not a loopback address", "metrics_allow_remote = true")),
    ("metrics-hostname-not-loopback", '[daemon]\nmetrics_listen = "metrics.example.test:9464"\n' + ACME, ("daemon.metrics_listen", "not a loopback address")),
    ("metrics-allow-remote-string", '[daemon]\nmetrics_allow_remote = "yes"\n' + ACME, ("daemon.metrics_allow_remote", "expected true or false")),
    ("metrics-textfile-not-prom", '[daemon]\nmetrics_textfile = "/var/lib/node_exporter/certd.txt"\n' + ACME, ("daemon.metrics_textfile", "only *.prom files")),
    ("metrics-textfile-int", '[daemon]\nmetrics_textfile = 1\n' + ACME, ("daemon.metrics_textfile", "expected a string")),
    ("drift-interval-bad", '[daemon]\ndrift_interval = "often"\n' + ACME, ("daemon.drift_interval", "positive duration")),
    ("drift-interval-zero", '[daemon]\ndrift_interval = 0\n' + ACME, ("daemon.drift_interval", "positive duration")),
    ("repair-drift-string", '[daemon]\nrepair_drift = "yes"\n' + ACME, ("daemon.repair_drift", "expected true or false")),
    ("deploy-repair-drift-int", cert('domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[certificate.deploy]\nrepair_drift = 1\n'), ("deploy.repair_drift", "expected true or false")),
    ("alerts-not-table", 'alerts = "https://hooks.example.test/x"\n' + ACME, ("alerts", "expected a table")),
    ("alerts-no-url", ACME + '[alerts]\ntimeout = "5s"\n', ("alerts.webhook_url", "required key is missing")),
    ("alerts-url-not-http", ACME + '[alerts]\nwebhook_url = "hooks.example.test/certd"\n', ("alerts.webhook_url", "not an http(s) URL")),
    ("alerts-url-ftp", ACME + '[alerts]\nwebhook_url = "ftp://hooks.example.test/certd"\n', ("alerts.webhook_url", "not an http(s) URL")),
    ("alerts-token-in-clear", ACME + '[alerts]\nwebhook_url = "http://hooks.example.test/certd"\nbearer_token = "t0k"\n', ("alerts.webhook_url", "clear text", "https://")),
    ("alerts-empty-token", ACME + '[alerts]\nwebhook_url = "https://hooks.example.test/certd"\nbearer_token = " "\n', ("alerts.bearer_token", "empty token")),
    ("alerts-token-file-missing", ACME + '[alerts]\nwebhook_url = "https://hooks.example.test/certd"\nbearer_token_file = "/nonexistent/token"\n', ("alerts.bearer_token_file", "does not exist")),
    ("alerts-timeout-long", ACME + '[alerts]\nwebhook_url = "https://hooks.example.test/certd"\ntimeout = "5m"\n', ("alerts.timeout", "at most")),
    ("alerts-timeout-bad", ACME + '[alerts]\nwebhook_url = "https://hooks.example.test/certd"\ntimeout = "soon"\n', ("alerts.timeout", "positive duration")),
    ("alerts-unknown-key", ACME + '[alerts]\nwebhook_url = "https://hooks.example.test/certd"\nurl = "x"\n', ("alerts.url", "unknown key")),
]


def problems_for(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "certd.toml"
    path.write_text(text)
    path.chmod(0o600)  # as a config holding a secret must be
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    return exc.value.problems


@pytest.mark.parametrize("text,fragments", [(t, f) for _, t, f in CORPUS], ids=[i for i, _, _ in CORPUS])
def test_bad_config_gives_one_actionable_line(tmp_path, text, fragments):
    """Each broken config yields exactly one problem line naming the file, the key and the fix."""
    problems = problems_for(tmp_path, text)
    assert len(problems) == 1, problems
    line = problems[0]
    assert line.startswith(str(tmp_path / "certd.toml") + ": ")
    assert "\n" not in line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"


def test_corpus_is_large():
    """The corpus covers at least 50 distinct broken configurations."""
    assert len(CORPUS) >= 50 and len({i for i, _, _ in CORPUS}) == len(CORPUS)


def test_good_config_parses_into_typed_values(tmp_path):
    """A valid file becomes frozen dataclasses with relative paths resolved against its directory."""
    path = tmp_path / "certd.toml"
    path.write_text(GOOD)
    cfg = config.load(path)
    www = cfg.certificate("www")
    assert cfg.daemon.state_dir == tmp_path / "state"
    assert www.deploy.live_dir == tmp_path / "live/www"
    assert www.domains == ("www.example.test", "example.test")
    assert www.http01_listen == config.Listen("127.0.0.1", 5002)
    assert www.verify[0].sni == "www.example.test"
    assert www.reload[0].kind == "command" and www.reload[0].timeout == 30.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        www.name = "other"  # type: ignore[misc]


def test_idn_domains_are_encoded_and_lowercased(tmp_path):
    """Internationalized and upper-case names become the A-labels the CA expects."""
    cfg_text = cert('domains = ["Bücher.Example.test", "*.WILD.example.test"]\nchallenge = "dns-01"\ndns01_hook = ["/bin/true"]\n')
    path = tmp_path / "c.toml"
    path.write_text(cfg_text)
    assert config.load(path).certificate("www").domains == ("xn--bcher-kva.example.test", "*.wild.example.test")


def test_all_problems_are_reported_together(tmp_path):
    """An operator sees every problem in one run, not one per attempt."""
    text = cert('domains = ["*.x.example.test"]\nkey_type = "dsa"\nbogus = 1\n')
    assert len(problems_for(tmp_path, text)) == 4  # wildcard, no responder, key type, unknown key


def test_world_writable_hook_is_refused(tmp_path):
    """A hook anyone can rewrite would let anyone run code as certd."""
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o777)
    text = cert(f'domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n[[certificate.reload]]\ncommand = ["{hook}"]\n')
    (line,) = problems_for(tmp_path, text)
    assert "world-writable" in line and "chmod o-w" in line


def test_control_socket_in_missing_directory_is_a_runtime_problem(tmp_path):
    """check-config (and the daemon) refuse a control socket whose directory does not exist."""
    path = tmp_path / "c.toml"
    path.write_text('[daemon]\ncontrol_socket = "/nonexistent-dir/control.sock"\n' + ACME)
    config.load(path)  # fine for one-shot commands
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(path, check_runtime=True)


def test_missing_file_names_the_fix(tmp_path):
    """A missing config file says how to point certd at one."""
    with pytest.raises(ConfigError, match="--config PATH or set CERTD_CONFIG"):
        config.load(tmp_path / "nope.toml")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "certd.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


@pytest.mark.parametrize("text", [t for _, t, _ in CORPUS[::7]], ids=[i for i, _, _ in CORPUS[::7]])
def test_check_config_exits_2_with_one_line_and_no_traceback(tmp_path, text):
    """`certd check-config` on a broken file: exit 2, one line on stderr, no traceback."""
    path = tmp_path / "certd.toml"
    # check-config also checks the control socket's directory: point it somewhere that exists.
    sock = f'control_socket = "{tmp_path}/control.sock"\n'
    path.write_text(text.replace("[daemon]\n", "[daemon]\n" + sock, 1) if text.startswith("[daemon]")
                    else "[daemon]\n" + sock + text)
    path.chmod(0o600)
    r = run_cli("--config", str(path), "check-config")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_check_config_accepts_a_good_file(tmp_path):
    """A valid file: exit 0 and a line naming the certificates."""
    (tmp_path / "run").mkdir()
    path = tmp_path / "certd.toml"
    path.write_text(GOOD)
    r = run_cli("--config", str(path), "check-config")
    assert r.returncode == 0, r.stderr
    assert "OK (1 certificate: www)" in r.stdout


def test_config_from_environment_variable(tmp_path):
    """Without --config, $CERTD_CONFIG names the file."""
    r = run_cli("check-config", env={"CERTD_CONFIG": str(tmp_path / "missing.toml")})
    assert r.returncode == 2 and "missing.toml: no such file" in r.stderr


BAD_CLI = [
    ("no-command", []),
    ("unknown-command", ["frobnicate"]),
    ("renew-force-without-names", ["renew", "--force"]),
    ("rollback-without-name", ["rollback"]),
    ("rollback-bad-version", ["rollback", "www", "--to", "three"]),
    ("unknown-flag", ["status", "--jsn"]),
    ("unknown-certificate", ["status", "nosuchcert"]),
    ("verify-unknown-certificate", ["verify", "nosuchcert"]),
]


@pytest.mark.parametrize("argv", [a for _, a in BAD_CLI], ids=[i for i, _ in BAD_CLI])
def test_bad_command_line_exits_2_with_one_line(tmp_path, argv):
    """A wrong invocation is a usage error: exit 2, one line, no traceback."""
    path = tmp_path / "certd.toml"
    path.write_text(GOOD)
    r = run_cli("--config", str(path), *argv)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_monitoring_keys_parse_into_typed_values(tmp_path):
    """Metrics, drift and alert settings become typed values; loopback names need no permission."""
    (tmp_path / "token").write_text("s3cret\n")
    (tmp_path / "token").chmod(0o600)
    path = tmp_path / "certd.toml"
    path.write_text(GOOD.replace("[daemon]\n", '[daemon]\nmetrics_listen = "[::1]:9464"\nmetrics_textfile = "certd.prom"\n'
                                 'drift_interval = "10m"\nrepair_drift = true\n', 1).replace(
        '[certificate.deploy]\n', '[certificate.deploy]\nrepair_drift = false\n', 1)
        + '\n[alerts]\nwebhook_url = "https://hooks.example.test/certd"\nbearer_token_file = "token"\ntimeout = "3s"\n')
    cfg = config.load(path)
    d = cfg.daemon
    assert (d.metrics_listen, d.metrics_textfile, d.drift_interval, d.repair_drift) == \
        (config.Listen("::1", 9464), tmp_path / "certd.prom", 600.0, True)
    assert cfg.certificate("www").deploy.repair_drift is False
    assert cfg.alerts == config.AlertsConfig("https://hooks.example.test/certd", None, tmp_path / "token", 3.0)
    assert "s3cret" not in repr(config.AlertsConfig("https://x.test/h", bearer_token="s3cret"))
    plain = config.load(_write(tmp_path, GOOD))
    assert plain.alerts is None and plain.daemon.drift_interval == 300.0 and plain.daemon.repair_drift is False
    assert plain.certificate("www").deploy.repair_drift is None


def _write(tmp_path, text: str):
    path = tmp_path / "plain.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_remote_metrics_need_explicit_permission(tmp_path):
    """metrics_allow_remote = true accepts a non-loopback listener; an http webhook on loopback may carry a token."""
    cfg = config.load(_write(tmp_path, '[daemon]\nmetrics_listen = "0.0.0.0:9464"\nmetrics_allow_remote = true\n' + ACME
                             + '[alerts]\nwebhook_url = "http://127.0.0.1:9000/hook"\nbearer_token = "t"\n'))
    assert cfg.daemon.metrics_allow_remote and cfg.alerts is not None and cfg.alerts.bearer_token == "t"


def test_token_file_readable_by_others_and_both_token_kinds_are_refused(tmp_path):
    """A world-readable token file leaks the secret; a token and a token file at once is ambiguous."""
    token = tmp_path / "token"
    token.write_text("t\n")
    token.chmod(0o644)
    (line,) = problems_for(tmp_path, ACME + f'[alerts]\nwebhook_url = "https://x.example.test/h"\nbearer_token_file = "{token}"\n')
    assert "alerts.bearer_token_file" in line and "chmod o-rwx" in line
    token.chmod(0o600)
    (line,) = problems_for(tmp_path, ACME + f'[alerts]\nwebhook_url = "https://x.example.test/h"\nbearer_token = "t"\nbearer_token_file = "{token}"\n')
    assert "alerts.bearer_token" in line and "not both" in line


def test_textfile_in_a_missing_directory_is_a_runtime_problem(tmp_path):
    """check-config (and the daemon) refuse a textfile whose directory does not exist."""
    path = _write(tmp_path, '[daemon]\nmetrics_textfile = "/nonexistent-dir/certd.prom"\n' + ACME)
    config.load(path)
    with pytest.raises(ConfigError, match="directory /nonexistent-dir does not exist"):
        config.load(path, check_runtime=True)


def test_peek_control_socket_finds_the_socket_in_a_broken_file_in_any_toml_form(tmp_path: Path) -> None:
    """The CLI reaches the daemon through the [daemon] table alone, a dotted key, or the default."""
    p = tmp_path / "certd.toml"
    p.write_text('[daemon]\ncontrol_socket = "run/c.sock"  # relative\n\n[[certificate]]\nname = \n')
    assert config.peek_control_socket(p) == tmp_path / "run" / "c.sock"
    p.write_text('daemon.control_socket = "/x/y.sock"\n[acme]\n')
    assert config.peek_control_socket(p) == Path("/x/y.sock")
    p.write_text('[acme]\ndirectory = "x"\n[daemon]\nstate_dir = "/s"\n')
    assert config.peek_control_socket(p) == config.DaemonConfig.control_socket
    p.write_text("[daemon\n")
    assert config.peek_control_socket(p) == config.DaemonConfig.control_socket


@pytest.mark.parametrize("section, key, file_key", [
    ('[acme]\ndirectory = "https://127.0.0.1:14000/dir"\neab_kid = "kid-1"\neab_hmac_key = "c2VjcmV0LWtleQ"\n',
     "acme.eab_hmac_key", "eab_hmac_key_file"),
    (ACME + '[alerts]\nwebhook_url = "https://x.example.test/h"\nbearer_token = "s3cret"\n',
     "alerts.bearer_token", "bearer_token_file"),
])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_an_inline_secret_in_a_config_others_can_read_is_refused(tmp_path, section, key, file_key, mode):
    """One line naming the file, its mode and both fixes; the same config at 0600 loads."""
    path = tmp_path / "certd.toml"
    path.write_text(section)
    path.chmod(mode)
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    (line,) = exc.value.problems
    assert key in line and f"{mode:04o}" in line and f"chmod 600 {path}" in line and file_key in line
    assert "s3cret" not in line and "c2VjcmV0LWtleQ" not in line
    path.chmod(0o600)
    config.load(path)


def test_eab_hmac_key_file_is_read_and_the_key_is_in_no_repr(tmp_path):
    """The key comes from its own file (others may not read it) and never shows in a repr."""
    key = tmp_path / "eab.key"
    key.write_text("c2VjcmV0LWtleQ\n")
    key.chmod(0o640)
    path = tmp_path / "certd.toml"
    path.write_text(f'[acme]\ndirectory = "https://127.0.0.1:14000/dir"\neab_kid = "kid-1"\neab_hmac_key_file = "{key}"\n')
    path.chmod(0o644)  # no secret inline: a readable config is fine
    cfg = config.load(path)
    assert cfg.acme.eab_hmac_key == "c2VjcmV0LWtleQ" and cfg.acme.eab_hmac_key_file == key
    assert "c2VjcmV0LWtleQ" not in repr(cfg) and "c2VjcmV0LWtleQ" not in repr(cfg.acme)
    key.chmod(0o644)
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    (line,) = exc.value.problems
    assert "acme.eab_hmac_key_file" in line and "chmod o-rwx" in line


def test_a_certificate_name_with_a_trailing_newline_is_refused(tmp_path):
    """'www\\n' passed the old pattern ("$" matches before a final newline) and named a directory."""
    (line,) = problems_for(tmp_path, cert('domains = ["www.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n').replace('name = "www"', 'name = "www\\n"'))
    assert "certificate[0].name" in line and "1-64 characters" in line


def test_a_command_hook_names_the_capabilities_it_keeps(tmp_path):
    """capabilities = ["CAP_KILL"] is kept (upper-cased); an unknown name is one actionable line."""
    base = GOOD.replace('command = ["/bin/true"]', 'command = ["/bin/true"]\ncapabilities = ["cap_kill"]')
    assert config.load(_write(tmp_path, base)).certificate("www").reload[0].capabilities == ("CAP_KILL",)
    assert config.load(_write(tmp_path, GOOD)).certificate("www").reload[0].capabilities == ()
    (line,) = problems_for(tmp_path, GOOD.replace('command = ["/bin/true"]', 'command = ["/bin/true"]\ncapabilities = ["CAP_ROOT"]'))
    assert "certificate[0] (www).reload[0].capabilities" in line and "CAP_ROOT: not a capability" in line
