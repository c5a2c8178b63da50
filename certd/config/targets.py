"""A certificate's deploy targets, reload hooks and verify endpoints (``[certificate.deploy]``,
``[[certificate.reload]]``, ``[[certificate.verify]]``). Mixed into
:class:`certd.config.parse.Parser`."""

from __future__ import annotations

import ipaddress

import pwd
import re

from certd.config.schema import (FILE_CONTENTS, HOOK_KINDS, DeployConfig, FileTarget, ReloadHook, VerifyEndpoint)
from certd.core import capabilities
from certd.config.values import Table, normalize_domain, parse_listen

from certd.config.fields import FieldParser



class TargetSections(FieldParser):
    """The sections that say where a certificate goes and how its use is proven."""

    def deploy(self, t: Table) -> DeployConfig:
        live_dir = self.path_value(t, "live_dir")
        combined = self.path_value(t, "combined")
        group = t.get("group", str)
        if group is not None:
            self.check_group(t.key("group"), group)
        repair_drift = t.get("repair_drift", bool)
        files: list[FileTarget] = []
        for j, raw in enumerate(t.get("files", list, [])):
            ft = Table(self, t.key(f"files[{j}]"), raw)
            path = self.path_value(ft, "path")
            if path is None and "path" not in ft.data:
                self.problem(ft.key("path"), "required key is missing")
            content = ft.get("content", str, required=True)
            if content is not None and content not in FILE_CONTENTS:
                self.problem(ft.key("content"), f"unknown content {content!r}; expected one of {', '.join(FILE_CONTENTS)}")
            owner = ft.get("owner", str)
            if owner is not None:
                try:
                    pwd.getpwnam(owner)
                except KeyError:
                    self.problem(ft.key("owner"), f"no such user {owner!r}")
            fgroup = ft.get("group", str)
            if fgroup is not None:
                self.check_group(ft.key("group"), fgroup)
            mode = ft.get("mode", str)
            mode_int = None
            if mode is not None:
                if not re.match(r"^0?[0-7]{3}$", mode):
                    self.problem(ft.key("mode"), f"{mode!r}: expected an octal mode such as \"0640\"")
                else:
                    mode_int = int(mode, 8)
                    if content in ("privkey", "combined") and mode_int & 0o007:
                        self.problem(ft.key("mode"), f"{mode}: a file holding a private key must not be readable by others")
            ft.done()
            if path is not None and content in FILE_CONTENTS:
                files.append(FileTarget(path, content, owner, fgroup, mode_int))
        t.done()
        targets = [p for p in [live_dir, combined, *(f.path for f in files)] if p is not None]
        if len(set(targets)) != len(targets):
            self.problem(t.where, "two deploy targets name the same path")
        return DeployConfig(live_dir, combined, group, tuple(files), repair_drift)

    def reload(self, t: Table, deploy: DeployConfig) -> ReloadHook | None:
        kind = t.get("hook", str)
        command = self.argv(t, "command")
        timeout = self.duration(t, "timeout", 30.0)
        if ("hook" in t.data) == ("command" in t.data):
            self.problem(t.where, "a reload entry needs exactly one of hook = \"nginx\"|\"haproxy\" or command = [\"/abs/path\", ...]")
            t.done()
            return None
        if kind is not None and kind not in HOOK_KINDS:
            self.problem(t.key("hook"), f"unknown built-in hook {kind!r}; expected one of {', '.join(HOOK_KINDS)}, or use command = [...]")
            t.done()
            return None
        if kind == "nginx":
            config = self.path_value(t, "config", must_exist=True)
            binary = self.nginx_binary(t)
            t.done()
            return ReloadHook("nginx", timeout, config=config, binary=binary)
        if kind == "haproxy":
            sock = self.path_value(t, "socket")
            if sock is None and "socket" not in t.data:
                self.problem(t.key("socket"), "the haproxy hook needs socket = \"/run/haproxy/admin.sock\" (stats socket ... level admin)")
            crt_path = self.path_value(t, "crt")  # relative: against the config's directory, like socket
            crt = None if crt_path is None else str(crt_path)
            if crt is None and "crt" not in t.data:
                if deploy.combined is None:
                    self.problem(t.key("crt"), "the haproxy hook needs crt = \"<path as in haproxy.cfg>\" or [certificate.deploy] combined = ...")
                else:
                    crt = str(deploy.combined)
            t.done()
            return ReloadHook("haproxy", timeout, socket=sock, crt=crt)
        caps = t.get("capabilities", list, [])
        bad = [c for c in caps if not isinstance(c, str)] or capabilities.unknown(caps)
        if bad:
            self.problem(t.key("capabilities"), f"{', '.join(map(str, bad))}: not a capability; expected names such "
                                                "as \"CAP_KILL\" (see capabilities(7)), or leave it out for none")
            caps = []
        t.done()
        return ReloadHook("command", timeout, command=command,
                          capabilities=tuple(c.upper() for c in caps)) if command else None

    def verify(self, t: Table, default_sni: str) -> VerifyEndpoint | None:
        raw = t.get("endpoint", str, required=True)
        sni = t.get("sni", str, default_sni)
        if sni != default_sni and not _is_ip(sni):
            norm, why = normalize_domain(sni)
            if why or norm.startswith("*."):
                self.problem(t.key("sni"), why or "SNI cannot be a wildcard; name one host the endpoint serves")
            sni = norm
        ca = self.path_value(t, "ca_bundle", must_exist=True)
        t.done()
        if raw is None:
            return None
        listen = parse_listen(raw)
        if isinstance(listen, str):
            self.problem(t.key("endpoint"), listen)
            return None
        return VerifyEndpoint(listen.host, listen.port, sni, ca)


def _is_ip(name: str) -> bool:
    """An IP address as the name to check: the handshake then sends no SNI (RFC 6066 §3) and
    the certificate must hold it as an iPAddress SAN."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
