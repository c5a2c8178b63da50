"""Shared fixtures: real Pebble + challtestsrv, nginx, HAProxy, a webroot HTTP server, SoftHSM2 tokens, a private PostgreSQL cluster.

Process fixtures live in tests/support/ and are registered here as plugins.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest_plugins = [
    "tests.support.pebble_fixtures",
    "tests.support.server_fixtures",
    "tests.support.certd_env",
    "tests.support.softhsm",
    "tests.support.postgres",
]
