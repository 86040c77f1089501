"""The watcher's settings, checked once at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from sentlink.config.models import Config
from sentlink.headers import DEFAULT_MAX_HEADER_BYTES
from sentlink.watch.dkim_proof import DEFAULT_MAX_BYTES
from sentlink.watch.duplicates import KeepPolicy
from sentlink.watch.rules import RuleSet


@dataclass(frozen=True)
class WatchPolicy:
    """The watcher's settings, checked once at start."""

    rules: RuleSet = field(default_factory=RuleSet)
    self_sent_require: str = "none"
    keep: KeepPolicy = "client"
    secret: bytes | None = None
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    dns_servers: tuple[str, ...] = ()
    dkim_max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def from_config(cls, config: Config, secret: bytes | None) -> WatchPolicy:
        # self_sent.dns_servers was checked when the file was loaded (config/checks.py).
        return cls(
            rules=RuleSet.compile(config.watch.rules),
            self_sent_require=config.self_sent.require,
            keep=config.duplicates.keep,
            secret=secret,
            max_header_bytes=(
                config.milter.max_header_bytes if config.milter else DEFAULT_MAX_HEADER_BYTES
            ),
            dns_servers=config.self_sent.dns_servers,
            dkim_max_bytes=config.self_sent.dkim_max_bytes,
        )
