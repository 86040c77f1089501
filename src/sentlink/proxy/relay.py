"""One SMTP client connection to the upstream server (submission) or to Postfix (re-injection).

Built on aiosmtplib, so relaying never blocks the event loop. Every command returns a Reply:
upstream's own code and text when it answered, a 4xx of ours when it could not be reached, so
the session can pass the answer on unchanged in meaning (RFC 5321 4.2.5: a relay reports the
next hop's reply, and a failure to reach it is temporary).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol
from aiosmtplib.response import SMTPResponse

from sentlink.proxy.spool import CHUNK, Spool, dot_stuffed

log = logging.getLogger(__name__)

UNAVAILABLE = "4.4.1 Upstream server unavailable, try again later"
LOST = "4.4.2 Connection to the upstream server lost, try again later"


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def line(self) -> str:
        """The reply as the client gets it (multi-line replies keep their lines, RFC 5321 4.2.1).

        421 becomes 451: upstream closing its connection must not close the client's session
        (the next message gets a new upstream connection).
        """
        code = 451 if self.code == 421 else self.code
        lines = [part.strip("\r") for part in self.text.split("\n")] or [""]
        head = [f"{code}-{part}" for part in lines[:-1]]
        return "\r\n".join([*head, f"{code} {lines[-1]}"])


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    tls: Literal["starttls", "implicit", "none"] = "none"


class Relay:
    """A client connection; ``open()`` connects, says EHLO and starts TLS as configured."""

    def __init__(self, target: Target, local_hostname: str, timeout: float = 60.0) -> None:
        self.target = target
        self.in_transaction = False
        """MAIL was accepted and neither DATA's reply nor RSET has ended the transaction."""
        self._timeout = timeout
        self._smtp = aiosmtplib.SMTP(
            hostname=target.host,
            port=target.port,
            local_hostname=local_hostname,
            timeout=timeout,
            use_tls=target.tls == "implicit",
            start_tls=target.tls == "starttls",
        )

    @property
    def connected(self) -> bool:
        return self._smtp.is_connected

    async def open(self) -> Reply:
        try:
            response = await self._smtp.connect()
            if self._smtp.is_ehlo_or_helo_needed:
                await self._smtp.ehlo()
        except aiosmtplib.SMTPResponseException as exc:
            return Reply(exc.code, exc.message)
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            log.warning("upstream %s:%d: %s", self.target.host, self.target.port, exc)
            return Reply(451, UNAVAILABLE)
        return Reply(response.code, response.message)

    async def login(self, username: bytes, password: bytes) -> Reply:
        try:
            response = await self._smtp.login(username, password)
        except aiosmtplib.SMTPResponseException as exc:
            return Reply(exc.code, exc.message)
        except aiosmtplib.SMTPServerDisconnected:
            return Reply(451, LOST)
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            # e.g. upstream offers no AUTH: the credentials cannot be checked.
            log.warning("upstream %s: AUTH impossible: %s", self.target.host, exc)
            return Reply(454, "4.7.0 Temporary authentication failure")
        return Reply(response.code, response.message)

    async def _command(self, *args: bytes) -> Reply:
        try:
            response = await self._smtp.execute_command(*args)
        except aiosmtplib.SMTPServerDisconnected:
            return Reply(451, LOST)
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            log.warning("upstream %s: %s", self.target.host, exc)
            self._smtp.close()
            return Reply(451, LOST)
        if response.code == 421:
            self._smtp.close()
        return Reply(response.code, response.message)

    async def mail(self, sender: str, options: Sequence[str] = ()) -> Reply:
        reply = await self._command(
            b"MAIL", b"FROM:<" + sender.encode("utf-8") + b">", *(o.encode() for o in options)
        )
        self.in_transaction = reply.ok
        return reply

    async def rcpt(self, recipient: str) -> Reply:
        return await self._command(b"RCPT", b"TO:<" + recipient.encode("utf-8") + b">")

    async def data(self, prefix: bytes, spool: Spool) -> Reply:
        """Send ``prefix`` + the spooled message: BDAT where upstream offers CHUNKING (RFC 3030:
        one round trip, no dot-stuffing), DATA otherwise. Written chunk by chunk with flow
        control, so a large message is never in memory whole (aiosmtplib's own data() takes
        the message as one bytes)."""
        protocol = self._smtp.protocol
        try:
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
            if self.supports("chunking"):
                response = await self._bdat(protocol, prefix, spool)
            else:
                response = await protocol.execute_command(b"DATA", timeout=self._timeout)
                if response.code == 354:
                    await self._write_all(protocol, dot_stuffed(prefix, spool))
                    response = await protocol.read_response(timeout=self._timeout)
        except aiosmtplib.SMTPServerDisconnected:
            self._smtp.close()
            return Reply(451, LOST)
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            log.warning("upstream %s: %s", self.target.host, exc)
            self._smtp.close()
            return Reply(451, LOST)
        finally:
            self.in_transaction = False
        if response.code == 421:
            self._smtp.close()
        return Reply(response.code, response.message)

    async def _bdat(self, protocol: SMTPProtocol, prefix: bytes, spool: Spool) -> SMTPResponse:
        chunks = iter(spool.chunks())
        pending = prefix + next(chunks, b"")
        while True:
            following = next(chunks, None)
            last = b" LAST" if following is None else b""
            await self._write_all(protocol, [b"BDAT %d%s\r\n" % (len(pending), last), pending])
            response = await protocol.read_response(timeout=self._timeout)
            if following is None or response.code != 250:
                return response
            pending = following

    @staticmethod
    async def _write_all(protocol: SMTPProtocol, chunks: Iterable[bytes]) -> None:
        """Write ``chunks`` joined into writes of about CHUNK bytes (one send each)."""
        buffer = bytearray()
        for chunk in chunks:
            buffer += chunk
            if len(buffer) >= CHUNK:
                protocol.write(bytes(buffer))
                buffer.clear()
                # aiosmtplib's StreamWriter.drain(): waits while the transport is paused.
                await protocol._drain_helper()
        if buffer:
            protocol.write(bytes(buffer))
            await protocol._drain_helper()

    async def rset(self) -> None:
        if self.connected:
            reply = await self._command(b"RSET")
            self.in_transaction = self.in_transaction and not reply.ok

    def supports(self, extension: str) -> bool:
        return self._smtp.supports_extension(extension)

    async def close(self) -> None:
        """QUIT politely; never raises."""
        if not self.connected:
            return
        try:
            await asyncio.wait_for(self._smtp.quit(), 5.0)
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            self._smtp.close()

    def abandon(self) -> None:
        """Close without QUIT (a connection found stale in the pool)."""
        self._smtp.close()
