"""Content-filter mode: Postfix's after-queue filter (FILTER_README, "advanced content filter").

Postfix hands each queued message here and keeps it until we answer 250. We file the Sent copy
first, then re-inject into Postfix's second smtpd, and answer 250 only when that smtpd said 250.
Anything else is a 4xx (or the re-injection's own refusal), so Postfix keeps the message and
retries: at-least-once. A retry finds the copy filed the first time (same Message-ID, our
signed trace header) and files none again.
"""

from __future__ import annotations

import asyncio
import logging

from aiosmtpd.smtp import Envelope, Session

from sentlink.config.proxy_checks import parse_host_port
from sentlink.proxy import security
from sentlink.proxy.copies import write_copy_once
from sentlink.proxy.deps import ProxyDeps, log_message
from sentlink.proxy.message import message_id_field, message_id_of, read_head, stable_message_id
from sentlink.proxy.relay import Relay, Target
from sentlink.proxy.relaying import RelayingHandler
from sentlink.proxy.session import ProxySMTP
from sentlink.proxy.spool import Spool

log = logging.getLogger(__name__)


class ContentFilterHandler(RelayingHandler):
    def __init__(self, deps: ProxyDeps) -> None:
        self._deps = deps
        host, port = parse_host_port(deps.config.reinject)
        self._target = Target(host, port, "none")

    async def handle_MAIL(
        self,
        server: ProxySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        if not security.is_trusted_client(
            security.peer_address(session.peer), self._deps.config.internal_hosts
        ):
            return security.NOT_AUTHORIZED
        state = server.state
        if state.relay is None or not state.relay.connected:
            if state.relay is not None:
                state.relay.abandon()  # Postfix closed it between two messages
            # Re-injection connections outlive the sessions: Postfix's smtp client opens one
            # session per message unless its connection cache kicks in.
            key = ("reinject", self._target)
            relay = self._deps.pool.take(key)
            if relay is None:
                relay = Relay(self._target, self._deps.hostname)
                reply = await relay.open()
                if not reply.ok:
                    await relay.close()
                    return f"451 {reply.text}" if reply.code >= 500 else reply.line()
            state.relay, state.pool_key = relay, key
        passed = [o for o in options if o.startswith(("BODY=", "SIZE="))]
        reply = await state.relay.mail(address, passed)
        if reply.ok:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
            state.account = self._deps.accounts.by_address(address) if address else None
        return reply.line()

    async def relay_data(self, server: ProxySMTP, session: Session, envelope: Envelope) -> str:
        state = server.state
        relay, spool = state.relay, state.spool
        if relay is None or spool is None:
            return "503 5.5.1 Error: need MAIL command"
        head = read_head(spool)
        headers, body_start = head.fields, head.body_start
        message_id = message_id_of(headers)
        prefix = b""
        if message_id is None:
            message_id = await asyncio.get_running_loop().run_in_executor(
                self._deps.executor,
                stable_message_id,
                envelope.mail_from or "",
                envelope.rcpt_tos,
                spool.chunks(),
                self._deps.hostname,
            )
            prefix = message_id_field(message_id)
            headers = [("Message-ID", message_id), *headers]
        account = state.account
        copy = "none (no account)"
        if account is not None:
            try:
                copy = await self._file_copy(server, session, envelope, headers, spool, body_start)
            except Exception as exc:
                # No copy, no re-injection: Postfix keeps the message and tries again.
                reason = self.capture_failed(server, exc)
                await relay.rset()
                server.release_relay()
                log_message(
                    state.sid,
                    account.name,
                    message_id,
                    len(envelope.rcpt_tos),
                    "not re-injected",
                    f"failed ({reason})",
                )
                return security.COPY_FAILED
        reply = await relay.data(prefix, spool)
        server.release_relay()
        log_message(
            state.sid,
            account.name if account else "-",
            message_id,
            len(envelope.rcpt_tos),
            reply.line().replace("\r\n", " / "),
            copy,
        )
        return reply.line()

    async def _file_copy(
        self,
        server: ProxySMTP,
        session: Session,
        envelope: Envelope,
        headers: list[tuple[str, str]],
        spool: Spool,
        body_start: int,
    ) -> str:
        state = server.state
        account = state.account
        assert account is not None
        deps = self._deps
        message_id = message_id_of(headers) or ""
        mail_envelope = self.mail_envelope(server, session, envelope)
        path = await asyncio.get_running_loop().run_in_executor(
            deps.executor,
            write_copy_once,
            deps.index,
            deps.writer,
            account,
            mail_envelope,
            headers,
            spool,
            body_start,
            message_id,
        )
        if path is None:
            deps.counters.add("skipped", "duplicate")
            return "exists"
        deps.counters.add("captured")
        return path.name
