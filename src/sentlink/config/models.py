"""Frozen configuration models: the validated form of sentlink.yaml.

Every field here is a config key (the names are a contract, see config/sentlink.yaml). The loader
in ``sentlink.config.loader`` builds these from YAML generically from the type hints, so adding a
key means adding a field with a default here and a commented line in the reference file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class StoreConfig:
    url: str = "sqlite:///./var/sentlink.db"


@dataclass(frozen=True)
class AccountConfig:
    name: str
    addresses: tuple[str, ...]
    maildir: Path
    logins: tuple[str, ...] = ()
    sent_folder: str = "Sent"
    owner: str | None = None


@dataclass(frozen=True)
class OutboundConfig:
    auth: bool = True
    daemon_name: tuple[str, ...] = ("ORIGINATING",)
    internal_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class MilterConfig:
    listen: str = "unix:./var/milter.sock"
    socket_mode: str = "0660"
    socket_group: str | None = None
    timeout: int = 600
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    max_header_bytes: int = 1048576


@dataclass(frozen=True)
class PrivateConfig:
    header: str = "X-CRM-Private"
    subject_tag: str = "[private]"


@dataclass(frozen=True)
class CrmConfig:
    never_log: tuple[str, ...] = ()
    private: PrivateConfig = field(default_factory=PrivateConfig)
    multiple_match: Literal["all", "contact-first"] = "all"
    strip_plus_tags: bool = False


@dataclass(frozen=True)
class WatchConfig:
    rescan_seconds: int = 300


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class Config:
    """The whole file. ``path`` is where it was read from (relative paths resolve against cwd)."""

    site_secret_file: Path = Path("./var/site.secret")
    store: StoreConfig = field(default_factory=StoreConfig)
    internal_domains: tuple[str, ...] = ()
    accounts: tuple[AccountConfig, ...] = ()
    milter: MilterConfig | None = None
    crm: CrmConfig = field(default_factory=CrmConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    log: LogConfig = field(default_factory=LogConfig)
