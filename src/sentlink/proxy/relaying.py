"""What both proxy modes do alike once a relay connection is open: RCPT, RSET, QUIT."""

from __future__ import annotations

import logging
import time

from aiosmtpd.smtp import Envelope, Session

from sentlink.errors import CaptureError
from sentlink.model import Envelope as MailEnvelope
from sentlink.proxy import security
from sentlink.proxy.deps import ProxyDeps
from sentlink.proxy.session import ProxySMTP

log = logging.getLogger("sentlink.proxy")


class RelayingHandler:
    """Passes RCPT through to the relay as it comes, so its per-recipient answers reach the
    client unchanged; RSET and QUIT release the relay connection; DATA is timed."""

    _deps: ProxyDeps

    async def relay_data(self, server: ProxySMTP, session: Session, envelope: Envelope) -> str:
        raise NotImplementedError

    @staticmethod
    def mail_envelope(server: ProxySMTP, session: Session, envelope: Envelope) -> MailEnvelope:
        """The SMTP envelope as capture sees it; the session id stands in for a queue id."""
        state = server.state
        return MailEnvelope(
            queue_id=state.sid,
            mail_from=envelope.mail_from or "",
            rcpt_to=tuple(envelope.rcpt_tos),
            client_addr=security.peer_address(session.peer),
            auth_login=state.login,
        )

    def capture_failed(self, server: ProxySMTP, exc: Exception) -> str:
        """Log and count a Sent copy that could not be filed; its short reason."""
        reason = exc.reason if isinstance(exc, CaptureError) else "internal"
        log.warning("session=%s: capture failed: %s: %s", server.state.sid, reason, exc)
        self._deps.counters.add("failed", reason)
        return reason

    async def handle_DATA(self, server: ProxySMTP, session: Session, envelope: Envelope) -> str:
        started = time.monotonic()
        try:
            return await self.relay_data(server, session, envelope)
        finally:
            # From the final dot to our answer: relay (or re-injection) plus the Sent copy.
            self._deps.counters.observe("proxy_message", time.monotonic() - started)

    async def handle_RCPT(
        self,
        server: ProxySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self._deps.config.limits.max_recipients:
            return security.TOO_MANY_RECIPIENTS
        relay = server.state.relay
        if relay is None:
            return "503 5.5.1 Error: need MAIL command"
        reply = await relay.rcpt(address)
        if reply.ok:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return reply.line()

    async def handle_RSET(self, server: ProxySMTP, session: Session, envelope: Envelope) -> str:
        if server.state.pool_key is not None:
            server.release_relay()  # the pool sends RSET before the next use
        elif server.state.relay is not None:
            await server.state.relay.rset()
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: ProxySMTP, session: Session, envelope: Envelope) -> str:
        server.drop_relay()
        return "221 2.0.0 Bye"
