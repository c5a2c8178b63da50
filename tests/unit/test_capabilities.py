"""Hooks keep only the capabilities they need (certd/core/capabilities.py)."""

from __future__ import annotations

from certd.core import capabilities


def test_hooks_run_through_setpriv_dropping_ambient_and_as_root_bounding_capabilities() -> None:
    """As a service user only ambient capabilities reach a program; as root the bounding set."""
    user = capabilities.limited(["/usr/sbin/nginx", "-t"], capabilities.NGINX, euid=999)
    assert user[1:] == ["--ambient-caps=-all,+dac_read_search,+kill", "--", "/usr/sbin/nginx", "-t"]
    root = capabilities.limited(["/hook"], (), euid=0)
    assert root[1:] == ["--ambient-caps=-all", "--inh-caps=-all", "--bounding-set=-all", "--", "/hook"]
