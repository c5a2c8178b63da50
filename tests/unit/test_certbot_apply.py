"""certd import certbot --write: the configuration is checked before anything is written, names
already taken are refused, and each lineage lands as version 1 with an ``imported`` audit record."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from certd import config as config_mod
from certd.core.errors import ConfigError
from certd.engine import certbot_apply, certbot_import
from certd.store.files import open_file_store

from tests.unit.test_certbot_import import le  # noqa: F401  (the fixture: a certbot dir with fresh keys)

SERVER = "https://acme-v02.api.letsencrypt.org/directory"


def config(tmp_path: Path, extra: str = "") -> config_mod.Config:
    path = tmp_path / "certd.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n\n[acme]\ndirectory = "{SERVER}"\n'
                    f'email = "ops@example.test"\nagree_tos = true\n{extra}')
    return config_mod.load(path)


def test_write_imports_version_1_and_the_account_and_appends_a_config_that_loads(tmp_path: Path, le: Path) -> None:  # noqa: F811
    """Every lineage becomes version 1 (audited), the account is stored under certbot's server, the config loads."""
    cfg = config(tmp_path)
    store = open_file_store(cfg)
    lineages, _ = certbot_import.plan(le)
    lineages = certbot_apply.refuse_taken(cfg, store, lineages, print)
    text = certbot_apply.appended_config(cfg, lineages, le)
    for lin in lineages:
        assert certbot_apply.import_lineage(store, lin, le) == 1
        assert store.load(lin.name, 1).bundle.info.serial == lin.bundle.info.serial
    said: list[str] = []
    certbot_apply.import_accounts(store, lineages, le, SERVER, said.append)
    certbot_apply.write_config(cfg, text)
    names = {c.name for c in config_mod.load(cfg.path).certificates}
    assert names == {"a.example.test", "b-site", "c.example.test"}  # d and e are commented out
    assert store.load_account(SERVER) is not None and len(said) == 1
    imported = [r for r in store.audit.records() if r["event"] == "imported"]
    assert sorted(r["name"] for r in imported) == sorted(lin.name for lin in lineages)
    assert all(r["version"] == 1 and r["reason"] == "imported from certbot" for r in imported)


def test_a_name_already_configured_or_stored_is_refused_with_one_line(tmp_path: Path, le: Path) -> None:  # noqa: F811
    """A configured name and a name holding versions are each refused once; the rest go on."""
    cfg = config(tmp_path, '\n[[certificate]]\nname = "b-site"\ndomains = ["b.example.test"]\nchallenge = "http-01"\n'
                           'http01_listen = "127.0.0.1:5002"\n')
    store = open_file_store(cfg)
    lineages, _ = certbot_import.plan(le)
    certbot_apply.import_lineage(store, [lin for lin in lineages if lin.name == "c.example.test"][0], le)
    said: list[str] = []
    free = certbot_apply.refuse_taken(cfg, store, lineages, said.append)
    assert {lin.name for lin in free} == {"a.example.test", "d.example.test", "e.example.test"}
    assert len(said) == 2


def test_a_table_that_would_break_the_config_changes_nothing(tmp_path: Path, le: Path) -> None:  # noqa: F811
    """When the appended configuration would not load, ConfigError says so and the file is unchanged."""
    cfg = config(tmp_path)
    before = cfg.path.read_text()
    lineages, _ = certbot_import.plan(le)
    lineages[0].toml += 'bogus_key = 1\n'
    with pytest.raises(ConfigError, match="nothing written"):
        certbot_apply.appended_config(cfg, lineages, le)
    assert cfg.path.read_text() == before


def test_an_imported_version_belongs_to_certbots_server_not_whichever_ca_is_first(tmp_path: Path,
                                                                                  le: Path) -> None:  # noqa: F811
    """The version records certbot's server: with that CA configured it is the issuing CA (ARI, replaces); without it, none is (no ARI asked of a CA that never saw it)."""
    cfg = config(tmp_path)
    store = open_file_store(cfg)
    lin = certbot_import.plan(le)[0][0]
    certbot_apply.import_lineage(store, lin, le)
    meta = store.load(lin.name, 1).meta
    assert cfg.issuing_ca(meta) is cfg.acme
    zerossl = replace(cfg.acme, directory="https://acme.zerossl.com/v2/DV90")
    assert replace(cfg, acme=zerossl, cas=(zerossl,)).issuing_ca(meta) is None, meta
