"""certd: keeps TLS certificates fresh — renews over ACME, deploys atomically,
verifies the live handshake and rolls back by itself."""

__version__ = "0.1.0"
