"""The sweep of what SIGKILLed writers leave: stale temporaries go (keys zeroed), a temporary
being written (flock()ed) stays, and a symlink planted among them is never followed."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from certd import config
from certd.store import housekeeping

KEY = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI...\n-----END PRIVATE KEY-----\n"


def make_config(tmp_path: Path) -> config.Config:
    path = tmp_path / "certd.toml"
    path.write_text('[daemon]\nstate_dir = "state"\ncontrol_socket = "control.sock"\n'
                    '[acme]\ndirectory = "https://127.0.0.1:14000/dir"\n'
                    '[[certificate]]\nname = "www"\ndomains = ["www.example.test"]\nhttp01_listen = "127.0.0.1:5002"\n'
                    '[certificate.deploy]\nlive_dir = "live/www"\n')
    return config.load(path)


def leftovers(tmp_path: Path) -> dict[str, Path]:
    state, certdir, versions = tmp_path / "state", tmp_path / "state/certs/www", tmp_path / "live/.www.versions"
    nodedir = certdir / "nodes/host1"
    for d in (certdir, versions, nodedir):
        d.mkdir(parents=True)
    paths = {
        "journal": certdir / ".journal.json.tmp-a1b2c3",
        "state": certdir / ".state.json.tmp-d4e5f6",
        "head": state / ".audit.head.tmp-0718ab",
        "staging": versions / ".0011.tmp-9f8e7d",
        "node_journal": nodedir / ".journal.json.tmp-112233",
        "order_key": certdir / ".order.key.tmp-445566",
    }
    for key in ("journal", "state", "head", "node_journal", "order_key"):
        paths[key].write_bytes(b"{}")
    paths["staging"].mkdir()
    (paths["staging"] / "privkey.pem").write_bytes(KEY)
    (paths["staging"] / "cert.pem").write_bytes(b"cert")
    return paths


def test_stale_temporaries_are_removed_and_what_else_is_there_stays(tmp_path: Path) -> None:
    """Journal (old and per-node), state, order-key, audit-head temporaries and a staging dir go;
    live files stay."""
    cfg = make_config(tmp_path)
    paths = leftovers(tmp_path)
    keep = [tmp_path / "state/certs/www/journal.json", tmp_path / "state/audit.jsonl",
            tmp_path / "live/.www.versions/0001"]
    keep[0].write_text("{}")
    keep[1].write_text("")
    keep[2].mkdir()
    removed = housekeeping.sweep(cfg)
    assert sorted(removed) == sorted(str(p) for p in paths.values())
    assert not any(os.path.lexists(p) for p in paths.values())
    assert all(p.exists() for p in keep)


def test_a_staged_key_is_zeroed_before_it_is_unlinked(tmp_path: Path) -> None:
    """A since-pruned version's key does not linger in freed blocks."""
    cfg = make_config(tmp_path)
    paths = leftovers(tmp_path)
    key = paths["staging"] / "privkey.pem"
    fd = os.open(key, os.O_RDONLY)  # see the inode's bytes after the name is gone
    try:
        housekeeping.sweep(cfg)
        assert not key.exists()
        assert os.pread(fd, 4096, 0) == b"\0" * len(KEY)
    finally:
        os.close(fd)


def test_a_temporary_being_written_is_left_alone(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    paths = leftovers(tmp_path)
    fd = os.open(paths["journal"], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what fsutil's writer holds until its rename
    try:
        removed = housekeeping.sweep(cfg)
    finally:
        os.close(fd)
    assert paths["journal"].exists() and str(paths["journal"]) not in removed
    assert not paths["state"].exists()


def test_a_symlink_among_the_temporaries_is_removed_not_followed(tmp_path: Path) -> None:
    """A planted link is unlinked; what it points at is untouched."""
    cfg = make_config(tmp_path)
    leftovers(tmp_path)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data").write_bytes(b"keep me")
    planted = tmp_path / "live/.www.versions/.0012.tmp-evil"
    planted.symlink_to(outside)
    housekeeping.sweep(cfg)
    assert not os.path.lexists(planted)
    assert (outside / "data").read_bytes() == b"keep me"


def test_after_one_rotation_only_that_certificates_leftovers_are_swept(tmp_path: Path) -> None:
    """After a rotation only that certificate's directories are read (10,000 certificates)."""
    cfg = make_config(tmp_path)
    paths = leftovers(tmp_path)
    other = tmp_path / "state/certs/api/.journal.json.tmp-112233"
    other.parent.mkdir(parents=True)
    other.write_text("{}")
    housekeeping.sweep(cfg, ["www"])
    assert not paths["journal"].exists() and not paths["staging"].exists()
    assert other.exists()
    housekeeping.sweep(cfg)
    assert not other.exists()


def test_a_loose_state_dir_is_tightened_to_0700(tmp_path: Path) -> None:
    """0755 (a packaging default) and 1777 (a fresh tmpfs) become 0700; the old mode is returned."""
    for loose in (0o755, 0o1777, 0o750, 0o701):
        state = tmp_path / f"state-{loose:o}"
        state.mkdir()
        os.chmod(state, loose)
        assert housekeeping.secure_state_dir(state) == loose
        assert os.stat(state).st_mode & 0o7777 == 0o700


def test_a_private_or_absent_state_dir_is_left_as_it_is(tmp_path: Path) -> None:
    """0700, 0500 and a missing dir are not touched."""
    state = tmp_path / "state"
    assert housekeeping.secure_state_dir(state) is None and not state.exists()
    state.mkdir(mode=0o700)
    assert housekeeping.secure_state_dir(state) is None
    os.chmod(state, 0o500)
    assert housekeeping.secure_state_dir(state) is None and os.stat(state).st_mode & 0o777 == 0o500


def test_a_sweep_asked_to_stop_leaves_the_certificates_for_the_next_start(tmp_path: Path) -> None:
    """The daemon's start-up sweep ends once it is stopping (SIGTERM waited minutes for it at
    100,000 certificates); the state dir's own temporaries go, the rest stays for next time."""
    import threading
    cfg = make_config(tmp_path)
    paths = leftovers(tmp_path)
    stop = threading.Event()
    stop.set()
    removed = housekeeping.sweep(cfg, stop=stop)
    assert removed == [str(paths["head"])]
    assert paths["journal"].exists() and paths["staging"].exists()
    housekeeping.sweep(cfg)
    assert not paths["journal"].exists() and not paths["staging"].exists()
