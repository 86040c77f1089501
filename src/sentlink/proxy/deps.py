"""What every proxy session needs; built once (cli/serve) and shared by all sessions."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sentlink.accounts import Accounts
from sentlink.capture import Counters, SentCopyWriter
from sentlink.config.models import AccountConfig, ProxyConfig, UpstreamConfig
from sentlink.proxy.copies import CopyIndex
from sentlink.proxy.pool import RelayPool
from sentlink.proxy.relay import Target

log = logging.getLogger("sentlink.proxy")


@dataclass(frozen=True)
class ProxyDeps:
    config: ProxyConfig
    accounts: Accounts
    writer: SentCopyWriter
    counters: Counters
    index: CopyIndex
    hostname: str
    # Copies are written (and fsynced) here, never on the event loop.
    executor: ThreadPoolExecutor
    # Idle upstream / re-injection connections shared by the sessions (event loop only).
    pool: RelayPool

    def upstream_for(self, account: AccountConfig | None) -> UpstreamConfig | None:
        if account is not None and account.upstream is not None:
            return account.upstream
        return self.config.upstream


def target_of(upstream: UpstreamConfig) -> Target:
    return Target(upstream.host, upstream.port, upstream.tls)


def log_message(
    sid: str, account: str, message_id: str, rcpts: int, upstream: str, copy: str
) -> None:
    """The one line per message (never a body, never credentials)."""
    log.info(
        "session=%s account=%s message_id=%s rcpts=%d upstream=%r copy=%s",
        sid,
        account,
        message_id,
        rcpts,
        upstream,
        copy,
    )
