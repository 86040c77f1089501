"""Submission mode: mail clients submit here; AUTH, MAIL, RCPT and DATA go through to upstream.

The proxy never answers 250 before upstream did (docs/design.md): every command is relayed at
once and upstream's reply is passed back, so a refused recipient is refused to the client and
the client's own retry logic stays in charge. The Sent copy is filed only after upstream's 250
to DATA, for the recipients upstream accepted.
"""

from __future__ import annotations

import asyncio
import logging
from base64 import b64decode
from pathlib import Path

from aiosmtpd.smtp import MISSING, AuthResult, Envelope, Session

from sentlink.config.models import UpstreamConfig
from sentlink.proxy import security
from sentlink.proxy.copies import write_copy
from sentlink.proxy.deps import ProxyDeps, log_message, target_of
from sentlink.proxy.message import message_id_field, message_id_of, read_head
from sentlink.proxy.relay import Relay, Reply, Target
from sentlink.proxy.relaying import RelayingHandler
from sentlink.proxy.session import ProxySMTP
from sentlink.proxy.spool import Spool

log = logging.getLogger(__name__)


class SubmissionHandler(RelayingHandler):
    def __init__(self, deps: ProxyDeps) -> None:
        self._deps = deps

    # -- AUTH (RFC 4954): the client's credentials are checked by upstream, nowhere else ------

    async def auth_PLAIN(self, server: ProxySMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await server.challenge_auth("", encode_to_b64=False)
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except ValueError:
                return AuthResult(success=False, handled=False, message="501 5.5.2 Bad base64")
        parts = bytes(blob).split(b"\0")
        if len(parts) != 3:
            return AuthResult(success=False, handled=False, message="501 5.5.2 Bad PLAIN data")
        return await self._authenticate(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: ProxySMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth("Username:")
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except ValueError:
                return AuthResult(success=False, handled=False, message="501 5.5.2 Bad base64")
        password = await server.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._authenticate(server, bytes(login), bytes(password))

    async def _authenticate(self, server: ProxySMTP, login: bytes, password: bytes) -> AuthResult:
        state = server.state
        name = login.decode("utf-8", "replace")
        account = self._deps.accounts.by_login(name)
        upstream = self._deps.upstream_for(account)
        if upstream is None or upstream.auth != "passthrough":
            return AuthResult(success=False, handled=False, message=security.AUTH_NOT_OFFERED)
        relay = Relay(target_of(upstream), self._deps.hostname)
        reply = await relay.open()
        if reply.ok:
            reply = await relay.login(login, password)
        if not reply.ok:
            await relay.close()
            log.info("session=%s login=%s auth refused upstream: %d", state.sid, name, reply.code)
            if reply.code >= 500 or reply.code == 454:
                return AuthResult(success=False, handled=False, message=reply.line())
            return AuthResult(success=False, handled=False, message=security.AUTH_UNAVAILABLE)
        server.drop_relay()
        state.relay, state.login, state.account = relay, name, account
        state.credentials = (login, password)
        return AuthResult(success=True, auth_data=name)

    # -- the transaction -------------------------------------------------------------------

    async def handle_MAIL(
        self,
        server: ProxySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        state = server.state
        accounts = self._deps.accounts
        if session.authenticated:
            if state.account is not None and not accounts.owns(state.account, address):
                log.warning(
                    "session=%s login=%s MAIL FROM %s refused", state.sid, state.login, address
                )
                return security.SENDER_NOT_OWNED
        elif security.is_trusted_client(
            security.peer_address(session.peer), self._deps.config.internal_hosts, loopback=False
        ):
            state.account = accounts.by_address(address)
        else:
            return security.AUTH_REQUIRED
        reply = await self._ensure_relay(server)
        if reply is not None:
            return reply.line()
        assert state.relay is not None
        passed = [o for o in options if o.startswith("BODY=") and state.relay.supports("8bitmime")]
        reply = await state.relay.mail(address, passed)
        if reply.ok:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return reply.line()

    async def _ensure_relay(self, server: ProxySMTP) -> Reply | None:
        """An open upstream connection (reconnected with the session's credentials if upstream
        dropped it between messages, or an idle one from the pool when the session's own
        credentials play no part); a Reply when there is none."""
        state = server.state
        if state.relay is not None and state.relay.connected:
            return None
        upstream = self._deps.upstream_for(state.account)
        if upstream is None:
            return Reply(451, "4.3.5 No upstream server configured for this sender")
        target = target_of(upstream)
        key: tuple[Target, str | None] | None = None
        if upstream.auth == "none":
            key = (target, None)
        elif upstream.auth != "passthrough":
            key = (target, upstream.auth.username)
        if state.relay is not None:
            state.relay.abandon()  # upstream closed it between two messages
        relay = self._deps.pool.take(key) if key is not None else None
        if relay is None:
            relay = Relay(target, self._deps.hostname)
            reply = await relay.open()
            if reply.ok:
                reply = await self._upstream_login(relay, upstream, state.credentials)
            if not reply.ok:
                await relay.close()
                return Reply(451, reply.text) if reply.code >= 500 else reply
        state.relay, state.pool_key = relay, key
        return None

    async def _upstream_login(
        self, relay: Relay, upstream: UpstreamConfig, credentials: tuple[bytes, bytes] | None
    ) -> Reply:
        auth = upstream.auth
        if auth == "none":
            return Reply(250, "no AUTH")
        if auth == "passthrough":
            if credentials is None:
                return Reply(530, "5.7.0 Authentication required")
            return await relay.login(*credentials)
        try:
            secret = await asyncio.to_thread(Path(auth.password_file).read_bytes)
        except OSError as exc:
            log.error("upstream password_file %s: %s", auth.password_file, exc.strerror)
            return Reply(454, "4.7.0 Temporary authentication failure")
        return await relay.login(auth.username.encode(), secret.rstrip(b"\r\n"))

    async def relay_data(self, server: ProxySMTP, session: Session, envelope: Envelope) -> str:
        state = server.state
        relay, spool = state.relay, state.spool
        if relay is None or spool is None:
            return "503 5.5.1 Error: need MAIL command"
        head = read_head(spool)
        headers = head.fields
        message_id = message_id_of(headers)
        prefix = b""
        if message_id is None:
            # The copy and the relayed message must share one id (docs/design.md).
            message_id = self._deps.writer.new_message_id()
            prefix = message_id_field(message_id)
            headers = [("Message-ID", message_id), *headers]
        reply = await relay.data(prefix, spool)
        server.release_relay()
        account = state.account
        if not reply.ok:
            copy = "none (upstream refused)"
        elif account is None:
            copy = "none (no account)"
        elif head.problem:
            copy = f"failed ({head.problem})"
        else:
            copy = await self._file_copy(server, session, envelope, headers, spool, head.body_start)
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
        assert state.account is not None
        mail_envelope = self.mail_envelope(server, session, envelope)
        loop = asyncio.get_running_loop()
        try:
            path = await loop.run_in_executor(
                self._deps.executor,
                write_copy,
                self._deps.writer,
                state.account,
                mail_envelope,
                headers,
                spool,
                body_start,
                None,
            )
        except Exception as exc:  # the message is sent: never fail the client for the copy
            reason = self.capture_failed(server, exc)
            return f"failed ({reason})"
        self._deps.counters.add("captured")
        return path.name
