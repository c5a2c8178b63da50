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
