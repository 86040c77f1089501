"""The aiosmtpd protocol object of one client connection, with the proxy's session state.

aiosmtpd parses; the handlers (submission.py, content_filter.py) decide. This subclass adds
only what the protocol engine must do itself: the session limit and the idle timeout answer
421 (RFC 5321 4.2.2, 3.8), state (the upstream connection) is dropped at STARTTLS, as
RFC 3207 4.2 requires for everything learnt before it, and DATA streams into a spool
(spool.py) instead of being held whole in memory.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, syntax

from sentlink.config.models import AccountConfig
from sentlink.proxy.deps import ProxyDeps
from sentlink.proxy.pool import close_all
from sentlink.proxy.relay import Relay
from sentlink.proxy.security import DATA_REFUSALS, IDLE_TIMEOUT, TOO_MANY_SESSIONS
from sentlink.proxy.spool import CHUNK, DataReceiver, Spool, read_data

log = logging.getLogger(__name__)


@dataclass
class SessionState:
    """What the proxy knows about one client session (credentials only for its lifetime)."""

    sid: str = field(default_factory=lambda: secrets.token_hex(4))
    relay: Relay | None = None
    # The key under which ``relay`` goes back to the pool after the session; None: close it.
    pool_key: object | None = None
    login: str | None = None
    credentials: tuple[bytes, bytes] | None = field(default=None, repr=False)
    account: AccountConfig | None = None
    spool: Spool | None = None
    """The message of the DATA command being handled (set only during ``handle_DATA``)."""


class SessionCounter:
    """Open sessions of one listener (the event loop is single-threaded: no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0


class ProxySMTP(SMTP):
    def __init__(
        self, handler: Any, counter: SessionCounter, deps: ProxyDeps, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self.state = SessionState()
        self._counter = counter
        self._deps = deps
        self._counted = False
        self._closers: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:  # STARTTLS done: start over (RFC 3207 4.2)
            self.drop_relay()
            self.state = SessionState(sid=self.state.sid)
        elif self._counter.active >= self._counter.limit:
            log.warning("session limit %d reached: refusing a client", self._counter.limit)
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(TOO_MANY_SESSIONS.encode() + b"\r\n")
            transport.close()
            return
        else:
            self._counter.active += 1
            self._counted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._counted:
            return  # refused at connect: aiosmtpd never set this connection up
        self._counted = False
        self._counter.active -= 1
        self.drop_relay()
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.write(IDLE_TIMEOUT.encode() + b"\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def drop_relay(self) -> None:
        """Give the upstream connection back to the pool or close it, in the background;
        forget the credentials."""
        relay, self.state.relay = self.state.relay, None
        key, self.state.pool_key = self.state.pool_key, None
        self.state.credentials = None
        if relay is None:
            return
        if key is not None and not relay.in_transaction:
            # At once, not in a task: the next session may want it on this loop iteration.
            closing = self._deps.pool.give(key, relay)
            if closing:
                self._in_background(close_all(closing))
        else:
            self._in_background(self._hand_back(key, relay))

    def release_relay(self) -> None:
        """A transaction ended: a pooled connection goes back to the pool now, not at the end
        of the session, so that idle sessions (Postfix caches its connections to a content
        filter) hold no connection to the next hop, whose process limit they would use up."""
        if self.state.pool_key is not None:
            self.drop_relay()

    async def _hand_back(self, key: object | None, relay: Relay) -> None:
        if key is not None and relay.in_transaction:
            await relay.rset()
        await close_all([relay] if key is None else self._deps.pool.give(key, relay))

    def _in_background(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_event_loop().create_task(job)
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    # -- DATA, streamed ------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the message streamed to a spool instead of held in memory.

        The rules are aiosmtpd's (end of data is CRLF.CRLF only, the size limit counts bytes
        as sent, 1001-byte lines) plus ours: a bare CR or LF refuses the message and ends the
        session. Whatever is wrong, the client's data is read to its end first, then refused
        (RFC 5321 4.2.5).
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        spool = Spool()
        receiver = DataReceiver(spool, self.data_size_limit or 0, self.line_length_limit)
        status: Any
        try:
            await self._receive(receiver)
            if receiver.problem is not None:
                status = await self._refuse(receiver.problem)
            else:
                self.state.spool = spool
                status = await self._call_handler_hook("DATA")
        except asyncio.CancelledError:
            self._writer.close()  # the client went away during DATA
            raise
        finally:
            self.state.spool = None
            spool.close()
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)
        if receiver.problem == "bare_line_ending":
            # Like Postfix's smtpd_forbid_bare_newline: whatever the client pipelined behind
            # such a message (a smuggling attempt's second transaction) is never read.
            assert self._handler_coroutine is not None and self.transport is not None
            self._handler_coroutine.cancel()
            self.transport.close()

    async def _refuse(self, problem: str) -> str:
        """Nothing was relayed: end the upstream transaction too, and say why."""
        if self.state.relay is not None:
            await self.state.relay.rset()
            self.release_relay()
        log.warning("session=%s: message refused: %s", self.state.sid, problem)
        self._deps.counters.add("skipped", problem)
        return DATA_REFUSALS[problem]

    async def _receive(self, receiver: DataReceiver) -> None:
        """``read_data`` from the client, with the reader's limit (aiosmtpd's line limit for
        commands) raised to CHUNK for DATA only, so that one read can hold many lines."""
        reader = self._reader
        limit = reader._limit  # type: ignore[attr-defined]
        reader._limit = CHUNK  # type: ignore[attr-defined]
        try:
            await read_data(reader, receiver)
        finally:
            reader._limit = limit  # type: ignore[attr-defined]
