"""The configuration: TOML -> frozen dataclasses, validated once (see :mod:`certd.config.schema`).

``from certd.config import CertificateConfig, load`` is the way in for everything above this
package; inside it, modules import :mod:`~certd.config.schema` directly.
"""

from certd.config.loading import load, parse, peek_control_socket, resolve_path
from certd.config.schema import (CHALLENGES, DEFAULT_EXEC_PATH, DEFAULT_PATH, FILE_CONTENTS, HOOK_KINDS, KEY_TYPES,
                                 AcmeConfig, AlertsConfig, CertificateConfig, Challenge, Config, DaemonConfig,
                                 ClusterConfig, DeployConfig, FileTarget, KeyClassConfig, KeysConfig, KeyType, Listen,
                                 ReloadHook, RenewBefore, VerifyEndpoint)

__all__ = ["CHALLENGES", "DEFAULT_EXEC_PATH", "DEFAULT_PATH", "FILE_CONTENTS", "HOOK_KINDS", "KEY_TYPES",
           "AcmeConfig", "AlertsConfig", "CertificateConfig", "Challenge", "Config", "DaemonConfig", "DeployConfig",
           "ClusterConfig", "FileTarget", "KeyClassConfig", "KeysConfig", "KeyType", "Listen", "ReloadHook",
           "RenewBefore", "VerifyEndpoint",
           "load", "parse", "peek_control_socket", "resolve_path"]
