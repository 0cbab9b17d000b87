"""Where a vault's agents send their data: embedded, or a process server over TLS.

A vault replicates in embedded mode (agent and process server in the worker's process) unless
``<vault>/process-server.json`` exists (written by ``siterecovery appliance use``)::

    {"format": 1,
     "data": "HOST:9443",             the process server's data port
     "control": "HOST:443",           its control port (status and health), optional
     "agent": "NAME",                 the agent identity (common name of its certificate)
     "certs": "agent",                bundle directory (cert.pem, key.pem, ca.pem), relative
                                      to the vault unless absolute
     "bandwidth": "100,08:00-18:00=10" or null (see adapters.transport.bandwidth),
     "flush_timeout_s": 120}

The file is written atomically (temp + fsync + rename).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siterecovery.adapters.transport.bandwidth import BandwidthSchedule
from siterecovery.adapters.transport.tls import DEFAULT_CONTROL_PORT, DEFAULT_DATA_PORT, parse_address
from siterecovery.durable import write_atomic
from siterecovery.errors import InvalidInput, VaultError

CONFIG_NAME = "process-server.json"
CONFIG_FORMAT = 1


@dataclass(frozen=True)
class RemoteSettings:
    data: str
    agent: str
    certs: str
    control: str | None = None
    bandwidth: str | None = None
    flush_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        parse_address(self.data, DEFAULT_DATA_PORT)
        if self.control:
            parse_address(self.control, DEFAULT_CONTROL_PORT)
        if self.bandwidth:
            BandwidthSchedule.parse(self.bandwidth)
        if not 1 <= self.flush_timeout_s <= 600:
            raise InvalidInput(f"flush timeout {self.flush_timeout_s}s is not allowed: use 1..600 seconds.")

    def certs_dir(self, vault_root: Path) -> Path:
        p = Path(self.certs)
        return p if p.is_absolute() else Path(vault_root) / p

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CONFIG_FORMAT,
            "data": self.data,
            "control": self.control,
            "agent": self.agent,
            "certs": self.certs,
            "bandwidth": self.bandwidth,
            "flush_timeout_s": self.flush_timeout_s,
        }


def load_settings(vault_root: Path) -> RemoteSettings | None:
    """The vault's process-server settings, or None in embedded mode."""
    path = Path(vault_root) / CONFIG_NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise VaultError(
            f"{path} is not readable JSON ({err}); fix it or run 'siterecovery appliance use' again."
        ) from err
    if not isinstance(doc, dict) or doc.get("format") != CONFIG_FORMAT:
        raise VaultError(f"{path} is not a format {CONFIG_FORMAT} process-server settings file.")
    try:
        return RemoteSettings(
            data=str(doc["data"]),
            agent=str(doc["agent"]),
            certs=str(doc["certs"]),
            control=doc.get("control"),
            bandwidth=doc.get("bandwidth"),
            flush_timeout_s=float(doc.get("flush_timeout_s", 120.0)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise VaultError(
            f"{path} lacks or has a bad field ({err}); run 'siterecovery appliance use' again."
        ) from err


def save_settings(vault_root: Path, settings: RemoteSettings) -> Path:
    path = Path(vault_root) / CONFIG_NAME
    write_atomic(path, json.dumps(settings.to_json(), indent=1).encode())
    return path


def clear_settings(vault_root: Path) -> bool:
    """Back to embedded mode; True if the vault used a process server."""
    path = Path(vault_root) / CONFIG_NAME
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
