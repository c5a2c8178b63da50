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
