"""Connection settings, resolved as `ntctl` resolves them: arguments win
over the environment (`NT_ENDPOINT`, `NT_TOKEN`, `NT_TLS_CA`,
`NT_TLS_DOMAIN`), which wins over the config file (`$NT_CONFIG`, else
`$XDG_CONFIG_HOME/nt/ntctl.yaml`, else `~/.config/nt/ntctl.yaml`):

    endpoint: https://nt.example.com:7070
    token: s3cret
    tls_ca: /etc/nt/ca.pem
    tls_domain: nt.example.com
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

DEFAULT_ENDPOINT = "http://127.0.0.1:7070"
KEYS = {"endpoint": "NT_ENDPOINT", "token": "NT_TOKEN", "tls_ca": "NT_TLS_CA", "tls_domain": "NT_TLS_DOMAIN"}


class ConfigError(ValueError):
    """The config file cannot be read, or holds something it should not."""


@dataclass(frozen=True)
class Settings:
    """Where and how to connect."""

    endpoint: str = DEFAULT_ENDPOINT
    token: str = ""
    tls_ca: Optional[str] = None
    tls_domain: Optional[str] = None

    @property
    def tls(self) -> bool:
        return self.endpoint.startswith("https://")

    @property
    def target(self) -> str:
        """The `host:port` gRPC dials."""
        for scheme in ("https://", "http://"):
            if self.endpoint.startswith(scheme):
                return self.endpoint[len(scheme) :].rstrip("/")
        return self.endpoint


def config_path(environ: Mapping[str, str] = os.environ) -> Optional[Path]:
    """Where the config file is looked for (it need not exist)."""
    if environ.get("NT_CONFIG"):
        return Path(environ["NT_CONFIG"])
    base = environ.get("XDG_CONFIG_HOME") or (
        os.path.join(environ["HOME"], ".config") if environ.get("HOME") else None
    )
    return Path(base, "nt", "ntctl.yaml") if base else None


def read_config(path: Optional[Path], required: bool = False) -> dict:
    """The config file's settings; `{}` when it does not exist (an error
    when `required`, as for an explicit `NT_CONFIG`)."""
    if path is None:
        return {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except OSError as e:
        raise ConfigError(f"reading the config file {path}: {e}") from None
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown field `{unknown[0]}` (known: {', '.join(KEYS)})")
    return {k: str(v) for k, v in data.items() if v is not None}


def resolve(
    endpoint: Optional[str] = None,
    token: Optional[str] = None,
    tls_ca: Optional[str] = None,
    tls_domain: Optional[str] = None,
    environ: Mapping[str, str] = os.environ,
) -> Settings:
    """Arguments, then the environment, then the config file."""
    path = config_path(environ)
    file = read_config(path, required=bool(environ.get("NT_CONFIG")))
    given = {"endpoint": endpoint, "token": token, "tls_ca": tls_ca, "tls_domain": tls_domain}
    values = {}
    for key, var in KEYS.items():
        if given[key] is not None:
            values[key] = given[key]
        elif environ.get(var):
            values[key] = environ[var]
        elif key in file:
            values[key] = file[key]
    return Settings(**values)
