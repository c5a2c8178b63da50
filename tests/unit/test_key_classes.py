"""Key classes: ``[[key_class]]`` settings a certificate inherits by name, its own settings
winning, the default last; which rule set each setting is recorded for the policy's reasons."""

from __future__ import annotations

from datetime import timedelta
from fractions import Fraction
from pathlib import Path

import pytest

from certd import config
from certd.core.errors import ConfigError
from certd.core.policy import RenewBefore

ACME = '[acme]\ndirectory = "https://127.0.0.1:14000/dir"\n'
CRITICAL = """
[[key_class]]
name = "critical"
key_type = "ecdsa-p384"
reuse_key = true
max_key_age = "30d"
renew_before = "1/2"
keep_versions = 3
destroy_after = "7d"
"""


def _cert(body: str = "", name: str = "www") -> str:
    return (f'[[certificate]]\nname = "{name}"\ndomains = ["{name}.example.test"]\n'
            f'http01_listen = "127.0.0.1:5002"\n{body}')


def _load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "certd.toml"
    path.write_text(ACME + text)
    return config.load(path)


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, text)
    return exc.value.problems


def test_class_settings_win_over_the_defaults(tmp_path: Path) -> None:
    """A certificate naming a class gets every setting the class sets, each recorded as the class's."""
    www = _load(tmp_path, CRITICAL + _cert('key_class = "critical"\n')).certificate("www")
    assert (www.key_type, www.reuse_key, www.keep_versions) == ("ecdsa-p384", True, 3)
    assert www.renew_before == RenewBefore(fraction=Fraction(1, 2))
    assert (www.max_key_age, www.destroy_after) == (30 * 86400.0, 7 * 86400.0)
    assert www.key_class == "critical"
    assert www.origin("key_type") == www.origin("max_key_age") == "key_class critical"


def test_the_certificates_own_settings_win_over_its_class(tmp_path: Path) -> None:
    """Settings written on the certificate beat the class's; the rest still come from the class."""
    www = _load(tmp_path, CRITICAL + _cert('key_class = "critical"\nkey_type = "rsa-2048"\nreuse_key = false\n'
                                           'max_key_age = "12h"\nrenew_before = "10d"\nkeep_versions = 7\n')
                ).certificate("www")
    assert (www.key_type, www.reuse_key, www.keep_versions, www.max_key_age) == ("rsa-2048", False, 7, 12 * 3600.0)
    assert www.renew_before == RenewBefore(duration=timedelta(days=10))
    assert www.destroy_after == 7 * 86400.0
    assert www.origin("key_type") == www.origin("max_key_age") == www.origin("renew_before") == "certificate"
    assert www.origin("destroy_after") == "key_class critical"


def test_a_class_leaves_what_it_does_not_set_to_the_default(tmp_path: Path) -> None:
    """A class with only max_key_age changes nothing else; a class nobody names is fine."""
    cfg = _load(tmp_path, '[[key_class]]\nname = "short"\nmax_key_age = "1h"\n'
                          '[[key_class]]\nname = "unused"\nkey_type = "rsa-4096"\n'
                          + _cert('key_class = "short"\n') + _cert(name="plain"))
    www, plain = cfg.certificate("www"), cfg.certificate("plain")
    assert (www.key_type, www.reuse_key, www.keep_versions, www.renew_before) == ("ecdsa-p256", False, 5, None)
    assert www.max_key_age == 3600.0 and www.origin("key_type") == "default"
    assert [c.name for c in cfg.key_classes] == ["short", "unused"]
    assert plain.key_class is None and plain.origins == () and plain.max_key_age is None


def test_an_unknown_class_names_the_defined_ones(tmp_path: Path) -> None:
    """A certificate naming a class that does not exist gets one line listing the classes there are."""
    problems = _problems(tmp_path, CRITICAL + '[[key_class]]\nname = "bulk"\n' + _cert('key_class = "critcal"\n'))
    assert len(problems) == 1, problems
    assert "certificate[0] (www).key_class: unknown key class 'critcal'; defined key classes: bulk, critical" \
        in problems[0]


def test_an_unknown_class_without_any_classes_says_how_to_define_one(tmp_path: Path) -> None:
    """With no [[key_class]] at all, the problem says to add one."""
    problems = _problems(tmp_path, _cert('key_class = "critical"\n'))
    assert len(problems) == 1 and "no [[key_class]] tables are defined" in problems[0], problems


@pytest.mark.parametrize("body,fragments", [
    ('max_key_age = "30 days"\n', ("key_class[0] (k).max_key_age", "'30 days'", "positive duration")),
    ('destroy_after = "0s"\n', ("key_class[0] (k).destroy_after", "positive duration")),
    ('destroy_after = -5\n', ("destroy_after", "positive duration")),
    ('key_type = "ed25519"\n', ("key_class[0] (k).key_type", "unknown key type 'ed25519'", "ecdsa-p256")),
    ('keep_versions = 1\n', ("key_class[0] (k).keep_versions", "expected 2..100")),
    ('renew_before = "soon"\n', ("key_class[0] (k).renew_before", "\"1/3\"")),
    ('reuse_key = "yes"\n', ("key_class[0] (k).reuse_key", "expected true or false")),
    ('max_age = "1d"\n', ("key_class[0] (k).max_age", "unknown key")),
])
def test_a_bad_class_setting_gives_one_actionable_line(tmp_path: Path, body: str, fragments: tuple[str, ...]) -> None:
    """Each wrong class setting is one problem line naming the class, the key and what is expected."""
    problems = _problems(tmp_path, '[[key_class]]\nname = "k"\n' + body)
    assert len(problems) == 1, problems
    for fragment in fragments:
        assert fragment in problems[0], problems[0]


@pytest.mark.parametrize("text,fragment", [
    ('[[key_class]]\nkey_type = "rsa-2048"\n', "key_class[0].name: required key is missing"),
    ('[[key_class]]\nname = "a"\n[[key_class]]\nname = "a"\n', "duplicate key class 'a'"),
    ('[[key_class]]\nname = "../x"\n', "key_class[0].name: '../x'"),
    (_cert('max_key_age = "forever"\n'), "certificate[0] (www).max_key_age: 'forever'"),
    (_cert('destroy_after = "1x"\n'), "certificate[0] (www).destroy_after: '1x'"),
])
def test_bad_class_tables_and_certificate_durations_are_refused(tmp_path: Path, text: str, fragment: str) -> None:
    """A nameless or duplicate class, and a bad duration on a certificate, are one line each."""
    problems = _problems(tmp_path, text)
    assert len(problems) == 1 and fragment in problems[0], problems


def test_a_certificate_may_set_max_key_age_and_destroy_after_without_a_class(tmp_path: Path) -> None:
    """The class-only settings may be written on the certificate itself (seconds as a number too)."""
    www = _load(tmp_path, _cert('max_key_age = 90\ndestroy_after = "1d"\n')).certificate("www")
    assert (www.max_key_age, www.destroy_after, www.key_class) == (90.0, 86400.0, None)
