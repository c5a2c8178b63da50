"""Reload hooks: nginx, HAProxy's runtime API, any command (argv, timeout, captured output)."""
