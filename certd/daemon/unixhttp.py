"""HTTP over the control socket with the standard library's http.client: what
:meth:`certd.daemon.control_client.ControlClient.get_text` reads a large answer with (imported
when it is used, as httpx is: a CLI command that only asks whether a daemon answers needs neither).
"""

from __future__ import annotations

import http.client
import socket
from pathlib import Path


class UnixConnection(http.client.HTTPConnection):
    """Connect to the socket at ``path`` within 5 s; then ``timeout`` seconds for the answer."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("certd", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5.0)
            sock.connect(str(self.socket_path))
            sock.settimeout(self.timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
