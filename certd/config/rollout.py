"""``[certificate.rollout]``: how a fleet releases a new version of one certificate
(certd/core/release.py). Only a fleet uses it: on a single host it is accepted and has no effect.

Node names are not checked against any list: nodes come and go, and a named canary that is not
live when a release opens is replaced by another live node (docs/FLEET.md, "Releases").

Mixed into :class:`certd.config.parse.Parser`.
"""

from __future__ import annotations

import re

from certd.config.fields import FieldParser
from certd.config.schema import CertificateConfig
from certd.config.values import Table
from certd.core.release import Rollout

_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class RolloutSection(FieldParser):
    """Parses a certificate's ``rollout`` table."""

    def rollout(self, cert: Table) -> Rollout | None:
        raw = cert.get("rollout", dict, None)
        if raw is None:
            return None
        t = Table(self, cert.key("rollout"), raw)
        canaries = self._canaries(t)
        max_failed = t.get("max_failed_nodes", int, 0)
        if max_failed < 0:
            self.problem(t.key("max_failed_nodes"), f"{max_failed}: expected 0 or more nodes that may fail after "
                                                    "promotion before the whole fleet rolls back")
            max_failed = 0
        timeout = self.duration(t, "fleet_timeout", Rollout.fleet_timeout)
        t.done()
        return Rollout(canaries, max_failed, timeout)

    def check_named_canary(self, i: int, cert: CertificateConfig, node: str | None) -> None:
        """A canary this configuration names as itself must be able to prove the version by
        handshake: without verify endpoints its canary run proves only that the reload ran,
        and the release would be promoted on nothing. (Other nodes' configurations are their
        own check's: each node checks the names that are its own. Picked by count, such a node
        is skipped instead: certd.core.release.pick_canaries.)"""
        want = cert.rollout.canaries if cert.rollout is not None else None
        if node is None or not isinstance(want, tuple) or node not in want or cert.verify:
            return
        self.problem(f"certificate[{i}].rollout.canaries",
                     f"names this node ({node!r}), but {cert.name!r} has no [[certificate.verify]] endpoints here: a "
                     "canary that cannot check the handshake proves nothing; add verify endpoints for it on this "
                     "node, or name another node")

    def _canaries(self, t: Table) -> int | tuple[str, ...]:
        raw = t.get("canaries", (int, list), 1)
        if isinstance(raw, int):
            if raw < 0:
                self.problem(t.key("canaries"), f"{raw}: expected a number of canary nodes (0 or more) or a list "
                                                "of node names, e.g. canaries = 1 or canaries = [\"web-1\"]")
                return 1
            return int(raw)
        bad = [n for n in raw if not isinstance(n, str) or not _NODE_RE.fullmatch(n)]
        if bad or not raw:
            self.problem(t.key("canaries"), f"{bad[0] if bad else raw!r}: expected node names as [cluster] node "
                                            "sets them (letters, digits, '.', '_', '-'), e.g. [\"web-1\"]")
            return 1
        return tuple(dict.fromkeys(raw))
