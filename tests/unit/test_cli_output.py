"""The CLI's output helpers: the DOMAINS cell, and which BrokenPipeError means "the reader left"."""

from __future__ import annotations

import argparse

import pytest

from certd import cli, cli_output


def test_domains_cell_shows_three_names_and_a_count() -> None:
    """Long SAN lists do not make 1,900-character rows; --wide and short lists show everything."""
    names = [f"h{i}.example.test" for i in range(5)]
    assert cli_output.status_domains(names, wide=False) == "h0.example.test,h1.example.test,h2.example.test (+2 more)"
    assert cli_output.status_domains(names, wide=True) == names
    assert cli_output.status_domains(names[:3], wide=False) == names[:3]
    assert cli_output.status_domains(None, wide=False) is None


def test_a_broken_pipe_that_is_not_stdout_is_still_an_internal_error(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Only a reader of stdout leaving is quiet; a hook's pipe breaking is reported."""
    def broken(args: argparse.Namespace) -> int:
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setitem(cli.COMMANDS, "status", broken)
    assert cli.main(["--config", "/nonexistent.toml", "status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("certd: internal error: BrokenPipeError") and err.count("\n") == 1


def test_status_shows_key_class_columns_only_when_a_class_is_used() -> None:
    """KEY CLASS and KEY AGE appear before DOMAINS once a certificate names a class; else the table is as before."""
    plain = [{"name": "www", "key_class": None, "key_age_days": 3.2}]
    assert cli_output.status_columns(plain) == cli_output.STATUS_COLUMNS
    rows = [{"name": "www", "key_class": "critical", "key_age_days": 3.2}, {"name": "api", "key_age_days": None}]
    cols = cli_output.status_columns(rows)
    assert [h for h, _ in cols][-3:] == ["KEY CLASS", "KEY AGE", "DOMAINS"]
    assert (rows[0]["key_age"], rows[1]["key_age"]) == ("3.2d", None)


def test_history_names_a_destroyed_key_by_its_spki_hash() -> None:
    """A key_destroyed row shows the serial and the key's SPKI SHA-256; other rows only serials."""
    spki = "ab" * 32
    assert cli_output.history_serials({"event": "key_destroyed", "old_serial": "0a", "spki_sha256": spki}) == \
        f"0a spki_sha256:{spki}"
    assert cli_output.history_serials({"event": "renewed", "old_serial": "0a", "new_serial": "0b",
                                       "spki_sha256": spki}) == "0a -> 0b"
    assert cli_output.history_serials({"event": "forced"}) is None
