"""The bad-input corpus, end to end: every broken config (tests/unit/test_config.py's CORPUS plus
the cases below) and every wrong invocation goes through the real ``certd`` command line, and
each must give exit 2 and exactly one actionable line on stderr, never a traceback.

The extra cases: internationalized names that are not valid IDNA, hooks that are relative,
missing, not executable, world-writable or in a directory anyone can write to, for every key
that names a program (``dns01_hook``, ``reload.command``, the nginx hook's ``binary``), files
that do not exist, text with control characters (a value must not break the one-line rule),
and the control socket in a missing directory through ``check-config`` and ``run``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from certd import config
from certd.core.errors import ConfigError
from tests.unit.test_config import ACME, CORPUS, GOOD, cert

HTTP = 'domains = ["a.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n'
DNS = 'domains = ["a.example.test"]\nchallenge = "dns-01"\n'


def dns_hook(argv0: str) -> str:
    return cert(DNS + f'dns01_hook = ["{argv0}", "http://127.0.0.1:8055"]\n')


def command_hook(argv0: str) -> str:
    return cert(HTTP + f'[[certificate.reload]]\ncommand = ["{argv0}"]\n')


def nginx_binary(binary: str) -> str:
    return cert(HTTP + f'[[certificate.reload]]\nhook = "nginx"\nbinary = "{binary}"\n')


def domain(name: str) -> str:
    return cert(f'domains = ["{name}"]\nhttp01_listen = "127.0.0.1:5002"\n')


# Paths under {tmp} are made by the ``hooks`` fixture: ww-hook (0777), noexec-hook (0644),
# wwdir/hook (0755 in a 0777 directory), stickydir/hook (0755 in a 1777 directory: fine).
EXTRA: list[tuple[str, str, tuple[str, ...]]] = [
    # internationalized names
    ("idn-invalid-punycode", domain("xn--zz.example.test"), ("domains[0]", "Invalid A-label")),
    ("idn-empty-punycode", domain("xn--.example.test"), ("domains[0]", "no Punycode")),
    ("idn-hyphens-3-4", domain("ab--cd.example.test"), ("domains[0]", "hyphens in 3rd and 4th position")),
    ("idn-leading-combining-mark", domain("\\u0300a.example.test"), ("domains[0]", "combining character")),
    ("idn-mixed-direction", domain("ab\\u05d0.example.test"), ("domains[0]", "direction")),
    ("idn-digits-first-rtl", domain("\\u0661\\u0662a.example.test"), ("domains[0]", "directionality")),
    ("idn-symbol", domain("\\u2603.example.test"), ("domains[0]", "U+2603", "not allowed")),
    ("idn-emoji", domain("\\U0001F600.example.test"), ("domains[0]", "U+1F600")),
    ("idn-empty-label", domain("b\\u00fccher..example.test"), ("domains[0]", "Empty Label")),
    ("idn-too-long", domain("a." + "b." * 130 + "example.test"), ("domains[0]", "too long")),
    ("domain-with-port", domain("www.example.test:443"), ("domains[0]", "U+003A")),
    ("domain-with-slash", domain("www.example.test/"), ("domains[0]", "U+002F")),
    ("domain-nul", domain("www.ex\\u0000ample.test"), ("domains[0]", "U+0000")),
    ("domain-newline", domain("www.ex\\nample.test"), ("domains[0]", "U+000A")),
    ("wildcard-twice", cert('domains = ["*.*.example.test"]\nchallenge = "dns-01"\ndns01_hook = ["/bin/true"]\n'), ("domains[0]", "left-most label")),
    # programs: every key that names one
    ("dns01-world-writable", dns_hook("{tmp}/ww-hook"), ("dns01_hook", "world-writable", "chmod o-w")),
    ("dns01-in-world-writable-dir", dns_hook("{tmp}/wwdir/hook"), ("dns01_hook", "{tmp}/wwdir", "world-writable")),
    ("dns01-not-executable", dns_hook("{tmp}/noexec-hook"), ("dns01_hook", "not an executable")),
    ("dns01-directory", dns_hook("{tmp}"), ("dns01_hook", "not an executable")),
    ("dns01-dot-relative", dns_hook("./hooks/dns-challtestsrv"), ("dns01_hook", "not an absolute path")),
    ("command-world-writable", command_hook("{tmp}/ww-hook"), ("reload[0].command", "world-writable")),
    ("command-in-world-writable-dir", command_hook("{tmp}/wwdir/hook"), ("reload[0].command", "{tmp}/wwdir", "world-writable")),
    ("command-missing", command_hook("/nonexistent/reload-lb"), ("reload[0].command", "/nonexistent/reload-lb does not exist")),
    ("command-not-executable", command_hook("{tmp}/noexec-hook"), ("reload[0].command", "not an executable")),
    ("command-home-relative", command_hook("~nosuchuser-xyz/bin/reload"), ("reload[0].command", "not an absolute path")),
    ("nginx-binary-relative", nginx_binary("sbin/nginx"), ("reload[0].binary", "not an absolute path")),
    ("nginx-binary-missing", nginx_binary("/nonexistent/sbin/nginx"), ("reload[0].binary", "does not exist")),
    ("nginx-binary-not-on-path", nginx_binary("nginx-no-such-build"), ("reload[0].binary", "not found on $PATH")),
    ("nginx-binary-world-writable", nginx_binary("{tmp}/ww-hook"), ("reload[0].binary", "world-writable")),
    ("nginx-binary-in-world-writable-dir", nginx_binary("{tmp}/wwdir/hook"), ("reload[0].binary", "world-writable")),
    ("nginx-binary-not-executable", nginx_binary("{tmp}/noexec-hook"), ("reload[0].binary", "not an executable")),
    ("nginx-binary-empty", nginx_binary(""), ("reload[0].binary",)),
    # files that do not exist
    ("nginx-config-missing-relative", cert(HTTP + '[[certificate.reload]]\nhook = "nginx"\nconfig = "nginx/nginx.conf"\n'), ("reload[0].config", "does not exist")),
    ("acme-ca-bundle-directory-missing", ACME + 'ca_bundle = "/nonexistent-dir/"\n', ("acme.ca_bundle", "does not exist")),
    ("verify-ca-relative-missing", cert(HTTP + '[[certificate.verify]]\nendpoint = "127.0.0.1:443"\nca_bundle = "roots/missing.pem"\n'), ("verify[0].ca_bundle", "does not exist")),
    # control characters never break the one-line rule
    ("path-with-newline", ACME + 'ca_bundle = "/no/such\\nfile.pem"\n', ("acme.ca_bundle", "does not exist")),
    ("key-with-newline", ACME + '"emial\\naddress" = "a@b.test"\n', ("unknown key",)),
    ("name-with-newline", cert(HTTP, name="www\\nx"), ("name", "names a directory")),
    ("key-type-with-escape", cert(HTTP + 'key_type = "ecdsa\\u001b[31m"\n'), ("key_type", "unknown key type")),
    # values
    ("order-timeout-bad", ACME + 'order_timeout = "a while"\n', ("acme.order_timeout", "positive duration")),
    ("order-timeout-zero", ACME + 'order_timeout = 0\n', ("acme.order_timeout", "positive duration")),
    ("file-not-utf8", "[acme]\ndirectory = \"https://x.test/d\"\nemail = \"\xe9@x.test\"\n", ("not UTF-8",)),
]


@pytest.fixture
def hooks(tmp_path: Path) -> Path:
    """Programs in the states the corpus needs (see the comment above EXTRA)."""
    for name, mode in (("ww-hook", 0o777), ("noexec-hook", 0o644)):
        (tmp_path / name).write_text("#!/bin/sh\nexit 0\n")
        (tmp_path / name).chmod(mode)
    for d, mode in (("wwdir", 0o777), ("stickydir", 0o1777)):
        (tmp_path / d).mkdir()
        (tmp_path / d / "hook").write_text("#!/bin/sh\nexit 0\n")
        (tmp_path / d / "hook").chmod(0o755)
        (tmp_path / d).chmod(mode)
    return tmp_path


def write_config(tmp_path: Path, text: str) -> Path:
    """The corpus text with {tmp} filled in, written as Latin-1 (one case is not UTF-8), with a
    control socket in a directory that exists (check-config checks that too)."""
    text = text.replace("{tmp}", str(tmp_path))
    sock = f'control_socket = "{tmp_path}/control.sock"\n'
    if text.startswith("[daemon]"):
        text = text.replace("[daemon]\n", "[daemon]\n" + sock, 1)
    elif "[daemon]" not in text:
        text = text + "\n[daemon]\n" + sock   # last: before, it would swallow top-level keys
    path = tmp_path / "certd.toml"
    path.write_bytes(text.encode("latin-1"))  # the corpus is ASCII (TOML escapes) but for one case
    path.chmod(0o600)  # some cases hold an inline secret, which a readable config may not
    return path


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "certd.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def assert_one_line_exit_2(r: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("certd: ") and len(lines[0]) < 600, lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("text,fragments", [(t, f) for _, t, f in EXTRA], ids=[i for i, _, _ in EXTRA])
def test_extra_bad_config_gives_one_actionable_line(hooks: Path, text: str, fragments: tuple[str, ...]) -> None:
    """Each extra broken config yields exactly one problem line naming the file, the key and the fix."""
    path = write_config(hooks, text)
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    (line,) = exc.value.problems
    assert line.startswith(f"{path}: ") and line.isprintable(), line
    for fragment in fragments:
        assert fragment.replace("{tmp}", str(hooks)) in line, f"{fragment!r} not in {line!r}"


def test_hook_in_a_sticky_directory_is_accepted(hooks: Path) -> None:
    """A hook in a sticky world-writable directory (like /tmp) cannot be replaced by others: accepted."""
    for text in (dns_hook("{tmp}/stickydir/hook"), command_hook("{tmp}/stickydir/hook"),
                 nginx_binary("{tmp}/stickydir/hook")):
        config.load(write_config(hooks, text))


def test_every_bad_config_through_check_config(hooks: Path) -> None:
    """Every config of both corpora through `certd check-config`: exit 2, one line, no traceback."""
    corpus = [(i, t) for i, t, _ in CORPUS + EXTRA]
    assert len(corpus) >= 100

    def check(case: tuple[str, str]) -> tuple[str, str | None]:
        ident, text = case
        work = hooks / ident
        work.mkdir()
        for name in ("ww-hook", "noexec-hook", "wwdir", "stickydir"):
            os.symlink(hooks / name, work / name)
        path = write_config(work, text.replace("{tmp}", str(hooks)))
        r = run_cli("--config", str(path), "check-config")
        try:
            assert_one_line_exit_2(r, str(path))
        except AssertionError as e:
            return ident, str(e)
        return ident, None

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [(i, why) for i, why in pool.map(check, corpus) if why]
    assert failures == []


def test_control_socket_in_a_missing_directory_through_check_config_and_run(tmp_path: Path) -> None:
    """`certd check-config` and `certd run` both refuse a control socket in a missing directory: exit 2, one line."""
    path = tmp_path / "certd.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/state"\ncontrol_socket = "/nonexistent-dir/control.sock"\n'
                    + ACME)
    for command in ("check-config", "run"):
        r = run_cli("--config", str(path), command)
        assert_one_line_exit_2(r, "daemon.control_socket", "directory /nonexistent-dir does not exist", "RuntimeDirectory")
    assert not (tmp_path / "state").exists()


BAD_CLI: list[tuple[str, list[str], str]] = [
    ("no-command", [], "COMMAND is required"),
    ("unknown-command", ["frobnicate"], "invalid choice"),
    ("unknown-global-flag", ["--verbose", "status"], "unrecognized arguments"),
    ("config-flag-without-value", ["status", "--config"], ""),
    ("renew-force-without-names", ["renew", "--force"], "name the certificates"),
    ("renew-unknown-name", ["renew", "nosuchcert"], "unknown certificate nosuchcert"),
    ("renew-unknown-and-known", ["renew", "www", "nosuchcert"], "unknown certificate nosuchcert"),
    ("renew-unknown-flag", ["renew", "--forse", "www"], "unrecognized arguments"),
    ("renew-reason-without-value", ["renew", "www", "--reason"], "expected one argument"),
    ("renew-name-with-newline", ["renew", "no\nsuch"], "unknown certificate"),
    ("status-unknown-flag", ["status", "--jsn"], "unrecognized arguments"),
    ("status-unknown-name", ["status", "nosuchcert"], "unknown certificate"),
    ("status-json-unknown-name", ["status", "--json", "nosuchcert"], "unknown certificate"),
    ("verify-unknown-name", ["verify", "nosuchcert"], "unknown certificate"),
    ("verify-unknown-flag", ["verify", "--all"], "unrecognized arguments"),
    ("rollback-without-name", ["rollback"], "required: NAME"),
    ("rollback-bad-version", ["rollback", "www", "--to", "three"], "invalid int value"),
    ("rollback-version-without-value", ["rollback", "www", "--to"], "expected one argument"),
    ("rollback-unknown-name", ["rollback", "nosuchcert"], "unknown certificate"),
    ("rollback-nothing-issued", ["rollback", "www"], "has no certificate yet"),
    ("rollback-two-names", ["rollback", "www", "api"], "unrecognized arguments"),
    ("check-config-extra-argument", ["check-config", "www"], "unrecognized arguments"),
    ("run-extra-argument", ["run", "now"], "unrecognized arguments"),
    ("reload-without-daemon", ["reload"], "no daemon listens"),
    ("reload-extra-argument", ["reload", "now"], "unrecognized arguments"),
    ("backup-without-subcommand", ["backup"], "SUBCOMMAND is required"),
    ("backup-export-without-file", ["backup", "export"], "required: FILE"),
    ("backup-export-without-recipient", ["backup", "export", "/nonexistent/b.age"], "sets no [keys] backup_recipient"),
    ("backup-restore-without-identity", ["backup", "restore", "b.age"], "required: --identity"),
    ("backup-restore-missing-identity", ["backup", "restore", "b.age", "--identity", "/nonexistent/id"], "no such file"),
]

# Commands that read the configuration, each against a missing, a broken and an unreadable file.
CONFIG_COMMANDS = [["check-config"], ["status"], ["status", "--json"], ["renew", "--all"], ["verify"],
                   ["rollback", "www"], ["run"]]


def test_corpus_of_command_lines_is_large() -> None:
    """At least 50 wrong invocations are checked."""
    assert len(BAD_CLI) + 4 * len(CONFIG_COMMANDS) >= 50


@pytest.mark.parametrize("argv,fragment", [(a, f) for _, a, f in BAD_CLI], ids=[i for i, _, _ in BAD_CLI])
def test_bad_command_line_exits_2_with_one_line(tmp_path: Path, argv: list[str], fragment: str) -> None:
    """A wrong invocation against a valid config: exit 2, one line naming the problem, no traceback."""
    (tmp_path / "run").mkdir()
    path = tmp_path / "certd.toml"
    path.write_text(GOOD)
    args = ["--config", str(path), *argv] if argv[-1:] != ["--config"] else argv
    assert_one_line_exit_2(run_cli(*args), fragment)


@pytest.mark.parametrize("argv", CONFIG_COMMANDS, ids=["-".join(a) for a in CONFIG_COMMANDS])
def test_every_command_refuses_a_bad_config_file(tmp_path: Path, argv: list[str]) -> None:
    """Missing, broken, not-UTF-8 and directory config files: exit 2 and one line for every command."""
    missing = tmp_path / "missing.toml"
    broken = tmp_path / "broken.toml"
    broken.write_text("bogus = 1\n" + GOOD)
    (tmp_path / "run").mkdir()
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(GOOD.replace("ops@", "\xe9@").encode("latin-1"))
    assert_one_line_exit_2(run_cli("--config", str(missing), *argv), "no such file", "--config PATH")
    assert_one_line_exit_2(run_cli("--config", str(broken), *argv), "bogus", "unknown key")
    assert_one_line_exit_2(run_cli("--config", str(latin1), *argv), "not UTF-8")
    assert_one_line_exit_2(run_cli("--config", str(tmp_path), *argv), "cannot read")
