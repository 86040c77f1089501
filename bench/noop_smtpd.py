"""An SMTP server that keeps nothing: the cost of receiving with aiosmtpd, the limit for any
aiosmtpd-based proxy.

aiosmtpd's own protocol class (the version the project pins), on the event loop ``sentlink
proxy`` runs (``asyncio.run``, the default policy: no uvloop), with a handler that answers 250
and drops the message. A proxy must at least receive every message like this before it can do
anything with it. DATA is read the cheapest way there is, with none of the checks a real server
needs: many lines per read up to the end-of-data line (``sentlink.proxy.spool.read_data``, the
proxy's own reader), the bytes thrown away as they come (stock aiosmtpd reads one line per
read, which costs more than the rest of the message's handling). So the figure is a generous
ceiling.

Usage: ``python bench/noop_smtpd.py HOST:PORT``; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session

from sentlink.proxy.spool import CHUNK, read_data


class NoopHandler:
    """Accepts every message and keeps nothing of it."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


class _Discard:
    """What ``read_data`` feeds: drops every piece."""

    def feed(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        pass


class FastDataSMTP(SMTP):
    """aiosmtpd with DATA read many lines at a time and thrown away."""

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reader = self._reader
        limit = reader._limit
        reader._limit = CHUNK
        try:
            await read_data(reader, _Discard())  # type: ignore[arg-type]
        finally:
            reader._limit = limit
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)


async def serve(host: str, port: int) -> None:
    """Serve on ``host:port`` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # As in the proxy: aiosmtpd would log every command line at INFO.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    handler = NoopHandler()

    def factory() -> FastDataSMTP:
        # A fixed hostname: without one aiosmtpd calls socket.getfqdn() for every connection.
        return FastDataSMTP(handler, hostname="noop.test", ident="bench-noop", loop=loop)

    server = await loop.create_server(factory, host, port, reuse_address=True)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or ":" not in argv[1]:
        print(f"usage: {argv[0]} HOST:PORT", file=sys.stderr)
        return 64
    host, _, port = argv[1].rpartition(":")
    asyncio.run(serve(host, int(port)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
