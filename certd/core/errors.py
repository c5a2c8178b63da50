"""The error tree: whose fault it is decides the type, never the message text.

- :class:`ConfigError` / :class:`UsageError` — the operator must fix something (exit 2).
- :class:`OperationFailed` and subclasses — an operation failed (exit 1). Each says whether it
  is *transient* (retry later with backoff) or not.

Every ``str(error)`` is one line an operator can act on. Messages never contain key material.
"""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` with every control character (newline, escape, ...) shown as its escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class CertdError(Exception):
    """Base of every error certd reports to a user."""

    exit_code = 1
    transient = False

    def __str__(self) -> str:
        # A message may quote what a user typed (a name, a path): keep it one line regardless.
        return one_line(super().__str__())


class ConfigError(CertdError):
    """The configuration is invalid. ``problems`` holds one line per problem."""

    exit_code = 2

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.problems[0] if len(self.problems) == 1 else
                         f"{len(self.problems)} configuration problems: " + "; ".join(self.problems))


class UsageError(CertdError):
    """The command line is wrong."""

    exit_code = 2


class OperationFailed(CertdError):
    """Something certd tried did not work; what was working is untouched."""


class LockBusy(OperationFailed):
    """Another process holds the per-certificate lock."""

    transient = True


class StoreError(OperationFailed):
    """The state directory could not be read or written (disk full, permissions...)."""

    transient = True


class StoreUnreachable(StoreError):
    """A fleet's database could not be reached at all (no connection, or the connection was lost):
    nothing about the certificates is known, so nothing may be concluded from it (no drift)."""


class AcmeError(OperationFailed):
    """The CA said no, or could not be reached.

    ``problem_type`` is the RFC 8555 problem type URN (e.g.
    ``urn:ietf:params:acme:error:rateLimited``) when the CA sent one; ``where`` the step of the
    order it answered (``newOrder``, ``challenge``, ``finalize``, ``replaces``: see certd.core.retry).
    """

    def __init__(self, message: str, *, problem_type: str | None = None,
                 detail: str | None = None, transient: bool = False,
                 retry_after: float | None = None, where: str | None = None) -> None:
        super().__init__(message)
        self.problem_type = problem_type
        self.detail = detail
        self.transient = transient
        self.retry_after = retry_after
        self.where = where


class CANotReachable(AcmeError):
    """The ACME server did not answer (connection refused, timeout, TLS failure)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


class ChallengeFailed(AcmeError):
    """The CA could not validate a challenge (wrong responder, DNS, firewall)."""


class CertificateRejected(OperationFailed):
    """A certificate from the CA failed certd's checks and was not stored."""


class HookFailed(OperationFailed):
    """A reload hook exited non-zero, timed out or could not be started."""

    transient = True


class VerificationFailed(OperationFailed):
    """The live endpoints do not serve the expected certificate."""

    transient = True


class RolledBack(OperationFailed):
    """A rotation failed after the switch and the previous version is served again."""

    transient = True


class RollbackFailed(OperationFailed):
    """Rolling back did not restore a verified served certificate: page someone."""
