"""``certd status`` without a daemon through the status index and the parsed-config cache
(issue 20): the same output as without them, never a stale row, and nothing trusted that
another user, another certd or a torn write left (no CA needed: versions written by FileStore)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from certd.config.cache import CACHE_NAME
from certd.engine.statusindex import INDEX_NAME
from certd.store.files import FileStore
from tests.support.certd_env import to_toml
from tests.support.certs import make_bundle

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("alpha", "beta", "gamma", "delta")


def _world(tmp_path: Path, **cert_extra: Any) -> Path:
    """A state directory with one version of each of NAMES (delta: none) and its config."""
    state = tmp_path / "state"
    store = FileStore(state)
    for name in NAMES[:-1]:
        with store.lock(name):
            store.set_current(name, store.add_version(name, make_bundle((f"{name}.example.test",)), {"reason": "t"}))
    certs = [{"name": n, "domains": [f"{n}.example.test"], "challenge": "http-01",
              "http01_listen": "127.0.0.1:5002", **cert_extra} for n in NAMES]
    config = tmp_path / "certd.toml"
    config.write_text(to_toml({"state_dir": str(state), "control_socket": str(tmp_path / "control.sock")},
                              {"directory": "https://127.0.0.1:14000/dir", "email": "ops@example.test",
                               "agree_tos": True}, certs))
    config.chmod(0o600)
    return config


def _certd(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "certd.cli", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=ROOT, check=check, timeout=60)


def _rows(text: str) -> dict[str, dict[str, Any]]:
    """The rows by name, but for what each call works out from its own clock: key_age_days
    (to 0.1 day) and a renewal due now (its next_renewal is that call's now)."""
    rows = {r["name"]: r for r in json.loads(text)["certificates"]}
    soon = datetime.now(timezone.utc) + timedelta(minutes=1)
    for r in rows.values():
        r.pop("key_age_days")
        if r["next_renewal"] and datetime.fromisoformat(r["next_renewal"].replace("Z", "+00:00")) < soon:
            r["next_renewal"] = "due now"
    return rows


def _fresh(config: Path) -> dict[str, dict[str, Any]]:
    """Status with neither the index nor the config cache: what the store and file say."""
    for name in (INDEX_NAME, CACHE_NAME):
        (config.parent / "state" / name).unlink(missing_ok=True)
    out = _rows(_certd(config, "status", "--json").stdout)
    for name in (INDEX_NAME, CACHE_NAME):
        (config.parent / "state" / name).unlink(missing_ok=True)
    return out


def _write_elsewhere(state: Path) -> None:
    """Store writes by another process: a new version of alpha, a failure of beta, a first version of delta."""
    script = textwrap.dedent(f"""
        from certd.store.files import FileStore
        from tests.support.certs import make_bundle
        store = FileStore({str(state)!r})
        for name in ("alpha", "delta"):
            with store.lock(name):
                store.set_current(name, store.add_version(name, make_bundle((name + ".example.test",)), {{}}))
        with store.lock("beta"):
            store.save_state("beta", {{"failures": 2, "last_result": "failed", "last_error": "CA said no",
                                       "last_failure": {datetime.now(timezone.utc).isoformat()!r}}})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=60)


def test_status_reads_the_same_rows_through_the_index_and_sees_every_write_it_missed(tmp_path: Path) -> None:
    """Status through the index prints what the store says, also after another process wrote to it."""
    config = _world(tmp_path)
    state = config.parent / "state"
    first = _rows(_certd(config, "status", "--json").stdout)  # builds the index and the config cache
    for name in (INDEX_NAME, CACHE_NAME):
        st = os.stat(state / name)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert _rows(_certd(config, "status", "--json").stdout) == first  # from the index this time
    assert first == _fresh(config)
    _certd(config, "status", "--json")  # the index again, then writes it has not seen
    _write_elsewhere(state)
    after = _rows(_certd(config, "status", "--json").stdout)
    assert after == _fresh(config)
    assert after["alpha"]["version"] == 2 and after["alpha"]["serial"] != first["alpha"]["serial"]
    assert after["beta"]["failures"] == 2 and after["beta"]["last_error"] == "CA said no"
    assert after["delta"]["version"] == 1 and first["delta"]["version"] is None
    assert after["gamma"] == first["gamma"]
    table = _certd(config, "status").stdout  # the table goes through the same rows
    assert "alpha" in table and "CA said no" not in table.splitlines()[0]


def test_the_index_is_trusted_only_while_each_rows_change_token_holds(tmp_path: Path) -> None:
    """A row altered in the index shows while the store is untouched and goes once it is written."""
    config = _world(tmp_path)
    state = config.parent / "state"
    _certd(config, "status", "--json")
    forged = _forge(state / INDEX_NAME, "gamma", '"last_error": null', '"last_error": "from the index"')
    assert forged
    assert _rows(_certd(config, "status", "--json").stdout)["gamma"]["last_error"] == "from the index"
    with FileStore(state).lock("gamma"):
        FileStore(state).save_state("gamma", {"last_result": "ok"})
    assert _rows(_certd(config, "status", "--json").stdout)["gamma"]["last_error"] is None


def _forge(index: Path, name: str, old: str, new: str) -> bool:
    """Rewrite ``name``'s row text in ``index`` as certd would have written it (a valid frame)."""
    import marshal
    from certd.config.cache import read_private, seal, unseal, write_private
    payload = unseal(read_private(index))
    assert payload is not None
    key, entries = marshal.loads(payload)
    token, until, row_json, shown = entries[name]
    entries[name] = (token, until, row_json.replace(old, new), shown)
    return write_private(index, seal(marshal.dumps((key, entries)))) and old in row_json


def test_a_torn_foreign_or_other_version_index_is_ignored(tmp_path: Path) -> None:
    """Status prints the store's rows whatever is in an index it cannot trust."""
    config = _world(tmp_path)
    index = config.parent / "state" / INDEX_NAME
    expected = _fresh(config)
    _certd(config, "status", "--json")
    _forge(index, "gamma", '"last_error": null', '"last_error": "from the index"')
    whole = index.read_bytes()
    index.write_bytes(whole[: len(whole) // 2])  # torn
    assert _rows(_certd(config, "status", "--json").stdout) == expected
    _forge(index, "gamma", '"last_error": null', '"last_error": "from the index"')
    index.chmod(0o640)  # group may read it: not certd's own
    assert _rows(_certd(config, "status", "--json").stdout) == expected
    _forge(index, "gamma", '"last_error": null', '"last_error": "from the index"')
    os.utime(config, ns=(0, 0))  # another version of the config file: every entry is another's
    assert _rows(_certd(config, "status", "--json").stdout) == expected
    assert stat.S_IMODE(index.stat().st_mode) == 0o600


def test_a_renewal_time_passing_is_not_hidden_by_the_index(tmp_path: Path) -> None:
    """A row whose renewal time came is worked out afresh, not read from the index."""
    config = _world(tmp_path)
    state = config.parent / "state"
    _certd(config, "status", "--json")
    past = (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat()
    import marshal
    from certd.config.cache import read_private, seal, unseal, write_private
    payload = unseal(read_private(state / INDEX_NAME))
    assert payload is not None
    key, entries = marshal.loads(payload)
    token, _, row_json, shown = entries["gamma"]
    entries["gamma"] = (token, past, row_json.replace('"last_error": null', '"last_error": "from the index"'), shown)
    assert write_private(state / INDEX_NAME, seal(marshal.dumps((key, entries))))
    assert _rows(_certd(config, "status", "--json").stdout)["gamma"]["last_error"] is None


def test_check_config_and_run_still_report_what_the_cached_parse_does_not_recheck(tmp_path: Path) -> None:
    """A hook removed after status cached the config: check-config and run still name it."""
    hook = tmp_path / "reload.sh"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    config = _world(tmp_path, reload=[{"command": [str(hook)]}])
    assert _certd(config, "status", "--json").returncode == 0
    assert (config.parent / "state" / CACHE_NAME).exists()
    hook.unlink()
    for args in (("check-config",), ("run",)):
        proc = _certd(config, *args, check=False)
        assert proc.returncode != 0 and str(hook) in proc.stderr, (args, proc.stderr)


def test_an_edited_config_is_read_afresh_and_a_secret_is_never_cached(tmp_path: Path) -> None:
    """Status follows an edit of the config at once, and a config holding a secret is not copied."""
    config = _world(tmp_path)
    _certd(config, "status", "--json")
    config.write_text(config.read_text().replace('"gamma.example.test"', '"gamma2.example.test"'))
    rows = _rows(_certd(config, "status", "--json").stdout)
    assert rows["gamma"]["domains"] == ["gamma2.example.test"]
    assert rows["gamma"]["renewal_reason"].startswith("configured names")
    cache = config.parent / "state" / CACHE_NAME
    cache.unlink()
    config.write_text(config.read_text().replace('agree_tos = true', 'agree_tos = true\neab_kid = "kid"\n'
                                                 'eab_hmac_key = "c2VjcmV0LXNlY3JldC1zZWNyZXQ"'))
    _certd(config, "status", "--json")
    assert not cache.exists()
