"""Idle upstream connections kept for the next session (one connection per session otherwise).

Clients usually send one message per connection (Postfix's smtp client to a content filter,
smtp-source, most mail clients); connecting, EHLO, STARTTLS and AUTH upstream for each would
cost more than relaying the message. A connection goes back to the pool only between
transactions (RSET first when one was open, RFC 5321 4.1.1.5), and only when it was not
authenticated with a client's own credentials: those must be checked upstream per session, and
the connection is closed with the session (see submission.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable

from sentlink.proxy.relay import Relay

log = logging.getLogger(__name__)

# Well below the idle timeouts of the servers we talk to (Postfix smtpd_timeout: 300s).
IDLE_SECONDS = 30.0


class RelayPool:
    """Idle connections by key (upstream target and login). Used from the event loop only."""

    def __init__(self, max_idle: int, idle_seconds: float | None = None) -> None:
        self._max_idle = max_idle
        self._idle_seconds = IDLE_SECONDS if idle_seconds is None else idle_seconds
        self._idle: dict[Hashable, list[tuple[float, Relay]]] = {}

    def take(self, key: Hashable) -> Relay | None:
        """An idle connection for ``key`` that is still open, or None."""
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            since, relay = idle.pop()
            if relay.connected and now - since < self._idle_seconds:
                return relay
            relay.abandon()
        return None

    def give(self, key: Hashable, relay: Relay) -> list[Relay]:
        """Keep ``relay`` (open, between transactions) for a later session when there is room;
        the connections the caller must close (expired ones, or ``relay`` itself)."""
        idle = self._idle.setdefault(key, [])
        now = time.monotonic()
        drop = [r for since, r in idle if now - since >= self._idle_seconds]
        idle[:] = [(since, r) for since, r in idle if now - since < self._idle_seconds]
        if relay.connected and not relay.in_transaction and len(idle) < self._max_idle:
            idle.append((now, relay))
        else:
            drop.append(relay)
        return drop

    def expired(self) -> list[Relay]:
        """Take out the connections idle for ``idle_seconds`` or more, for the caller to close:
        called every few seconds, so a lull does not leave them open until the next hop's own
        timeout closes them (Postfix logs each of those as "timeout after ...")."""
        now = time.monotonic()
        drop: list[Relay] = []
        for key, idle in list(self._idle.items()):
            drop += [r for since, r in idle if now - since >= self._idle_seconds]
            idle[:] = [(since, r) for since, r in idle if now - since < self._idle_seconds]
            if not idle:
                del self._idle[key]
        return drop

    async def close(self) -> None:
        idle, self._idle = self._idle, {}
        for relays in idle.values():
            for _, relay in relays:
                await relay.close()


async def close_all(relays: list[Relay]) -> None:
    """Close each connection politely (QUIT), one after the other."""
    for relay in relays:
        await relay.close()
