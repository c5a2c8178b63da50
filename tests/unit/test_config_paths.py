"""Deploy paths shared between certificates, and HAProxy's relative ``crt``: both used to pass
check-config and fail only at the first renewal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from certd import config
from certd.core.errors import ConfigError

ACME = '[acme]\ndirectory = "https://127.0.0.1:14000/dir"\n'
DAEMON = '[daemon]\nstate_dir = "state"\ncontrol_socket = "control.sock"\n'


def two(first_deploy: str, second_deploy: str) -> str:
    def one(name: str, deploy: str) -> str:
        return (f'[[certificate]]\nname = "{name}"\ndomains = ["{name}.example.test"]\n'
                f'http01_listen = "127.0.0.1:5002"\n[certificate.deploy]\n{deploy}\n')
    return DAEMON + ACME + one("alpha", first_deploy) + one("beta", second_deploy)


SHARED = [
    ("live_dir", 'live_dir = "/etc/ssl/certd/shared"', 'live_dir = "/etc/ssl/certd/shared"', "deploy.live_dir"),
    ("combined", 'combined = "/etc/haproxy/shared.pem"', 'combined = "/etc/haproxy/shared.pem"', "deploy.combined"),
    ("file", '[[certificate.deploy.files]]\npath = "/etc/app/tls.pem"\ncontent = "fullchain"',
     '[[certificate.deploy.files]]\npath = "/etc/app/tls.pem"\ncontent = "cert"', "deploy.files[0].path"),
    ("combined-vs-file", 'combined = "/etc/app/tls.pem"',
     '[[certificate.deploy.files]]\npath = "/etc/app/tls.pem"\ncontent = "cert"', "deploy.files[0].path"),
    ("relative-vs-absolute", 'live_dir = "live/x"', 'live_dir = "{dir}/live/x"', "deploy.live_dir"),
]


@pytest.mark.parametrize("first,second,key", [s[1:] for s in SHARED], ids=[s[0] for s in SHARED])
def test_two_certificates_deploying_to_one_path_are_refused_naming_both(tmp_path: Path, first: str, second: str,
                                                                         key: str) -> None:
    """The second certificate's renewal used to fail at staging and show it as missing."""
    path = tmp_path / "certd.toml"
    path.write_text(two(first, second.format(dir=tmp_path)))
    with pytest.raises(ConfigError) as exc:
        config.load(path)
    assert len(exc.value.problems) == 1, exc.value.problems
    line = exc.value.problems[0]
    assert f"certificate[1].{key}" in line and "alpha" in line and "beta" in line, line


def test_check_config_reports_the_shared_path_on_one_line_exit_2(tmp_path: Path) -> None:
    """check-config catches it, not the first renewal."""
    path = tmp_path / "certd.toml"
    path.write_text(two('live_dir = "/etc/ssl/certd/shared"', 'live_dir = "/etc/ssl/certd/shared"'))
    r = subprocess.run([sys.executable, "-m", "certd.cli", "--config", str(path), "check-config"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "alpha" in r.stderr and "beta" in r.stderr, r.stderr


def test_distinct_paths_still_pass(tmp_path: Path) -> None:
    """Only a shared path is refused."""
    path = tmp_path / "certd.toml"
    path.write_text(two('live_dir = "/etc/ssl/certd/alpha"', 'live_dir = "/etc/ssl/certd/beta"'))
    assert list(config.load(path).names) == ["alpha", "beta"]


def test_haproxy_relative_crt_is_resolved_against_the_config_directory(tmp_path: Path) -> None:
    """HAProxy only knows absolute (or crt-base) paths; a relative crt sent as it is made the
    rotation fail with "Can't replace a certificate which is not referenced"."""
    path = tmp_path / "certd.toml"
    path.write_text(ACME + '[[certificate]]\nname = "lb"\ndomains = ["lb.example.test"]\n'
                    'http01_listen = "127.0.0.1:5002"\n[certificate.deploy]\ncombined = "certs/lb.pem"\n'
                    '[[certificate.reload]]\nhook = "haproxy"\nsocket = "run/admin.sock"\ncrt = "certs/lb.pem"\n')
    hook = config.load(path).certificate("lb").reload[0]
    assert hook.socket == tmp_path / "run/admin.sock"
    assert hook.crt == str(tmp_path / "certs/lb.pem")
