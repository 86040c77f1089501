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
class UpstreamCredentials:
    """Fixed credentials for the upstream server (instead of passing the client's through)."""

    username: str
    password_file: Path


@dataclass(frozen=True)
class UpstreamConfig:
    """The SMTP server the submission proxy relays to."""

    host: str
    port: int = 587
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    auth: Literal["passthrough", "none"] | UpstreamCredentials = "passthrough"


@dataclass(frozen=True)
class AccountConfig:
    name: str
    addresses: tuple[str, ...]
    maildir: Path
    logins: tuple[str, ...] = ()
    sent_folder: str = "Sent"
    owner: str | None = None
    upstream: UpstreamConfig | None = None


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
class ProxyTlsConfig:
    cert: Path | None = None
    key: Path | None = None
    implicit: bool = False


@dataclass(frozen=True)
class ProxyLimits:
    max_message_bytes: int = 52428800
    max_recipients: int = 1000
    max_sessions: int = 200
    idle_timeout: int = 300


@dataclass(frozen=True)
class ProxyConfig:
    listen: str = "127.0.0.1:10025"
    mode: Literal["submission", "content_filter"] = "submission"
    tls: ProxyTlsConfig = field(default_factory=ProxyTlsConfig)
    upstream: UpstreamConfig | None = None
    reinject: str = "127.0.0.1:10026"
    internal_hosts: tuple[str, ...] = ()
    limits: ProxyLimits = field(default_factory=ProxyLimits)


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
    unmatched: Literal["ignore", "review", "create-lead"] = "ignore"


@dataclass(frozen=True)
class RuleCondition:
    """What a watch rule tests: regexes (Python ``re.search``, case-insensitive), all must match.

    ``header`` maps a header name to a regex on its (unfolded) value; ``from``/``to``/``cc``
    match any address of that field, ``any_recipient`` any To/Cc/Bcc address.
    """

    header: dict[str, str] = field(default_factory=dict)
    from_: str | None = field(default=None, metadata={"key": "from"})
    to: str | None = None
    cc: str | None = None
    subject: str | None = None
    any_recipient: str | None = None


@dataclass(frozen=True)
class RuleActions:
    link: bool = True
    move: str | None = None
    flag: tuple[str, ...] = ()


@dataclass(frozen=True)
class WatchRule:
    name: str
    when: RuleCondition = field(default_factory=RuleCondition, metadata={"key": "if"})
    then: RuleActions = field(default_factory=RuleActions)
    continue_: bool = field(default=False, metadata={"key": "continue"})


@dataclass(frozen=True)
class WatchConfig:
    rescan_seconds: int = 300
    folders: tuple[str, ...] = ("INBOX", "Sent")
    rules: tuple[WatchRule, ...] = ()


@dataclass(frozen=True)
class SelfSentConfig:
    require: Literal["none", "trace", "dkim"] = "none"
    dns_servers: tuple[str, ...] = ()
    dkim_max_bytes: int = 10485760


@dataclass(frozen=True)
class DuplicatesConfig:
    keep: Literal["client", "capture"] = "client"


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    syslog: bool = False
    syslog_socket: str = "/dev/log"


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9469"


@dataclass(frozen=True)
class HookConfig:
    """One hook. ``type`` picks the adapter; each adapter reads the keys it documents."""

    name: str
    type: str  # webhook | command | zoho-crm | an entry point of the group sentlink.hooks
    events: tuple[str, ...] = ("message.linked",)
    include_body: bool = False
    timeout: int = 30
    url: str | None = None
    secret_file: Path | None = None
    allow_private: bool = False
    path: Path | None = None
    args: tuple[str, ...] = ()
    api_domain: str | None = None
    accounts_url: str | None = None
    client_id_file: Path | None = None
    client_secret_file: Path | None = None
    refresh_token_file: Path | None = None


@dataclass(frozen=True)
class OutboxConfig:
    backoff_seconds: tuple[int, ...] = (5, 300, 1800, 7200, 18000, 36000, 86400)
    dead_letter_seconds: int = 259200
    lease_seconds: int = 120
    batch: int = 50
    poll_seconds: int = 2


@dataclass(frozen=True)
class Config:
    """The whole file. ``path`` is where it was read from (relative paths resolve against cwd)."""

    site_secret_file: Path = Path("./var/site.secret")
    status_file: Path = Path("./var/status.json")
    store: StoreConfig = field(default_factory=StoreConfig)
    internal_domains: tuple[str, ...] = ()
    accounts: tuple[AccountConfig, ...] = ()
    milter: MilterConfig | None = None
    proxy: ProxyConfig | None = None
    crm: CrmConfig = field(default_factory=CrmConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig | None = None
    hooks: tuple[HookConfig, ...] = ()
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    self_sent: SelfSentConfig = field(default_factory=SelfSentConfig)
    duplicates: DuplicatesConfig = field(default_factory=DuplicatesConfig)
