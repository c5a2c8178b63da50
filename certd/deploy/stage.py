"""Putting a stored version where TLS servers read it: stage beside the live files, then switch.

``stage`` writes everything for version N under hidden names next to the live files; nothing a
reader opens changes, and running it again is harmless. ``switch`` makes N live with one
``rename()`` per target, after checking that every target is staged, so a crash or a full disk
leaves each target on the old version or the new one, complete. A failure partway through the
targets leaves the earlier ones on N: the rotation then switches back to the previous version
(stage and switch are idempotent, a switch to the live version is a no-op).

Targets (docs/ARCHITECTURE.md):

- ``live_dir = /x/www`` is a symlink to ``.www.versions/NNNN`` holding cert.pem chain.pem
  fullchain.pem privkey.pem. The switch renames a fresh symlink over it, so a reader that
  resolves the directory once (opens it, then reads cert and key) always gets a matching pair.
  A real directory there (certbot's, a manual setup) is refused, never clobbered.
- ``combined = /x/www.pem`` (fullchain + key, as HAProxy reads it) and plain ``files``: the
  version is staged as ``.www.pem.certd-NNNN`` (a dot-file: HAProxy's crt directories skip
  them). The switch hard-links it to a temporary name and renames that over ``www.pem``, so the
  live file and its staged name share an inode: that is how :func:`deployed_version` knows N,
  and why switching back to a staged version rewrites nothing. The replaced file is kept as
  ``.www.pem.certd-prev`` (a hard link made before the rename).

Separate plain files for cert and key are each replaced atomically, not together; prefer
``live_dir`` or ``combined`` when a reader may load them while a switch happens.
Private keys are 0600, or 0640 owned by the configured group, from their first byte.
Every operation in a deploy directory goes through a descriptor of it (:mod:`certd.deploy.files`).
"""

from __future__ import annotations

import grp
import pwd
from collections.abc import Collection
from pathlib import Path

from certd.deploy import strictmodes
from certd.config import CertificateConfig
from certd.deploy.files import KEY_CONTENTS, KeyMatch, Target
from certd.deploy.livedir import LiveDir
from certd.deploy.plainfile import PlainFile
from certd.core.errors import ConfigError, StoreError
from certd.core.model import Bundle


def stage(cert: CertificateConfig, version: int, bundle: Bundle, *, repair: bool = False) -> None:
    """Write everything for ``version`` beside the live files; nothing readers see changes.

    A live ``version`` whose files were edited out of band is refused (StoreError), unless
    ``repair``: then the edited files are rewritten (drift repair; each file atomically, and all
    of them belong to ``version``, so a reader never pairs a certificate with another key)."""
    strictmodes.require_safe(cert)
    for target in _targets(cert):
        target.stage(version, bundle, repair)


def switch(cert: CertificateConfig, version: int) -> None:
    """Make ``version`` live on every target, one rename() each; StoreError if not staged."""
    strictmodes.require_safe(cert)
    targets = _targets(cert)
    missing = [t.describe() for t in targets if not t.is_staged(version)]
    if missing:
        raise StoreError(f"{cert.name}: version {version} is not staged for {', '.join(missing)}; stage it first")
    for target in targets:
        target.switch(version)


def deployed_version(cert: CertificateConfig) -> int | None:
    """The version live_dir (or else the first target) serves now; None if none of ours."""
    targets = _targets(cert)
    return targets[0].live_version() if targets else None


def prune(cert: CertificateConfig, keep_versions: Collection[int]) -> None:
    """Remove staged and old versions not in ``keep_versions`` (never the live one; keys zeroed)
    and leftovers of interrupted writes."""
    for target in _targets(cert):
        target.prune(set(keep_versions))


def destroy_keys(cert: CertificateConfig, keys: Collection[bytes], *, spkis: Collection[str] = ()) -> list[Path]:
    """Zero and remove every staged, old or backup copy (``.certd-prev``) of these private keys in
    ``cert``'s targets (after keyCompromise), matched by their PEM bytes or (``spkis``) by the
    SHA-256 of their public key's SPKI (:class:`~certd.deploy.files.KeyMatch`: a fleet node whose
    store copy is already gone). What is live is never touched: switch away first. Symlinks are
    never followed. Returns the paths removed; a version directory counts as one."""
    match = KeyMatch.of(keys, spkis)
    removed: list[Path] = []
    if match:
        for target in _targets(cert):
            removed.extend(target.destroy_keys(match))
    return removed


def check(cert: CertificateConfig, version: int, bundle: Bundle) -> list[str]:
    """What on disk differs from ``version`` (pointer, content, owner, mode); empty if all is well.
    Lines name paths, never key material."""
    problems: list[str] = []
    for target in _targets(cert):
        problems.extend(target.check(version, bundle))
    return problems


def _targets(cert: CertificateConfig) -> list[Target]:
    d = cert.deploy
    gid = _gid(d.group, cert.name, "deploy.group")
    key_mode = 0o600 if gid == -1 else 0o640
    targets: list[Target] = []
    if d.live_dir is not None:
        targets.append(LiveDir(d.live_dir, gid))
    if d.combined is not None:
        targets.append(PlainFile(d.combined, "combined", key_mode, -1, gid))
    for i, f in enumerate(d.files):
        is_key = f.content in KEY_CONTENTS
        fgid = _gid(f.group, cert.name, f"deploy.files[{i}].group") if f.group else (gid if is_key else -1)
        mode = f.mode if f.mode is not None else (0o644 if not is_key else 0o600 if fgid == -1 else 0o640)
        targets.append(PlainFile(f.path, f.content, mode, _uid(f.owner, cert.name, i), fgid))
    return targets


def _gid(group: str | None, name: str, key: str) -> int:
    if group is None:
        return -1
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"certificate {name}: {key}: no such group {group!r}; "
                          "create it or change the configuration") from None


def _uid(owner: str | None, name: str, index: int) -> int:
    if owner is None:
        return -1
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise ConfigError(f"certificate {name}: deploy.files[{index}].owner: no such user {owner!r}; "
                          "create it or change the configuration") from None
