"""``[certificate.rollout]``: a fleet's release settings per certificate, each bad value one actionable line."""

from __future__ import annotations

from pathlib import Path

import pytest

from certd import config
from certd.core.errors import ConfigError
from certd.core.release import Rollout

CERT = ('[acme]\ndirectory = "https://127.0.0.1:14000/dir"\n'
        '[[certificate]]\nname = "www"\ndomains = ["www.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n')


def _load(tmp_path: Path, rollout: str | None) -> config.Config:
    path = tmp_path / "certd.toml"
    path.write_text(CERT + (f"[certificate.rollout]\n{rollout}" if rollout is not None else ""))
    return config.load(path)


@pytest.mark.parametrize("text,expected", [
    (None, None),
    ("", Rollout()),
    ('canaries = 2\nmax_failed_nodes = 1\nfleet_timeout = "5m"\n', Rollout(2, 1, 300.0)),
    ('canaries = ["web-2", "web-9", "web-2"]\n', Rollout(("web-2", "web-9"))),
    ("canaries = 0\n", Rollout(0)),
])
def test_good_rollout_sections_parse(tmp_path: Path, text: str | None, expected: Rollout | None) -> None:
    """A rollout table parses to its settings (defaults: 1 canary, 0 failed nodes, 10 min); none means no release."""
    assert _load(tmp_path, text).certificate("www").rollout == expected


@pytest.mark.parametrize("text,fragments", [
    ("canaries = -1\n", ("rollout.canaries", "0 or more")),
    ('canaries = "two"\n', ("rollout.canaries", "expected")),
    ("canaries = true\n", ("rollout.canaries", "expected")),
    ('canaries = ["web 1"]\n', ("rollout.canaries", "node names")),
    ("canaries = [1]\n", ("rollout.canaries", "node names")),
    ("canaries = []\n", ("rollout.canaries", "node names")),
    ("max_failed_nodes = -2\n", ("rollout.max_failed_nodes", "0 or more")),
    ('max_failed_nodes = "1"\n', ("rollout.max_failed_nodes", "expected")),
    ('fleet_timeout = "soon"\n', ("rollout.fleet_timeout", "positive duration")),
    ("stagger = 3\n", ("rollout.stagger", "unknown key")),
])
def test_bad_rollout_values_give_one_line_each(tmp_path: Path, text: str, fragments: tuple[str, ...]) -> None:
    """Each bad rollout value is refused with one line naming the key and what is expected."""
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    lines = [line for line in str(e.value).splitlines() if "rollout" in line]
    assert len(lines) == 1, str(e.value)
    assert all(f in lines[0] for f in fragments), lines[0]


def _fleet_config(tmp_path: Path, canaries: str, verify: bool) -> Path:
    kek = tmp_path / "kek"
    kek.write_bytes(bytes(32))
    kek.chmod(0o600)
    path = tmp_path / "certd.toml"
    path.write_text(f'[keys]\nkek_file = "{kek}"\n[cluster]\ndatabase = "postgresql://db/certd"\nnode = "web-1"\n'
                    + CERT + ('[[certificate.verify]]\nendpoint = "127.0.0.1:8443"\n' if verify else "")
                    + f"[certificate.rollout]\ncanaries = {canaries}\n")
    path.chmod(0o600)
    return path


def test_a_canary_named_here_without_verify_endpoints_is_refused(tmp_path: Path) -> None:
    """canaries = ["web-1"] on web-1, which cannot handshake-check www: one line saying why and the two fixes."""
    with pytest.raises(ConfigError) as e:
        config.load(_fleet_config(tmp_path, '["web-1"]', verify=False))
    assert len(e.value.problems) == 1, e.value.problems
    line = e.value.problems[0]
    assert "rollout.canaries" in line and "proves nothing" in line and "name another node" in line


@pytest.mark.parametrize("canaries,verify", [('["web-1"]', True), ('["web-2"]', False), ("1", False)])
def test_other_canary_settings_pass_the_check(tmp_path: Path, canaries: str, verify: bool) -> None:
    """Named here with verify endpoints, another node named, or a count (hollow nodes are skipped): accepted."""
    assert config.load(_fleet_config(tmp_path, canaries, verify)).certificate("www").rollout is not None
