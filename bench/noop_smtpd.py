"""An SMTP server that keeps nothing: the cost of receiving with aiosmtpd, the limit for any
aiosmtpd-based proxy.

aiosmtpd's own protocol class (the version the project pins), on the event loop ``sentlink
proxy`` runs (``asyncio.run``, the default policy: no uvloop), with a handler whose only hook,
``handle_DATA``, answers 250 and drops the message. A proxy must at least receive every message
like this before it can do anything with it. Note that stock aiosmtpd reads DATA line by line,
where the sentlink proxy's own DATA (``ProxySMTP.smtp_DATA``) reads up to CRLF.CRLF in bigger
pieces: for multi-line messages this server's receiving is not the cheapest possible.

Usage: ``python bench/noop_smtpd.py HOST:PORT``; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session


class NoopHandler:
    """Accepts every message and keeps nothing of it."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


async def serve(host: str, port: int) -> None:
    """Serve on ``host:port`` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # As in the proxy: aiosmtpd would log every command line at INFO.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    handler = NoopHandler()

    def factory() -> SMTP:
        # A fixed hostname: without one aiosmtpd calls socket.getfqdn() for every connection.
        return SMTP(handler, hostname="noop.test", ident="bench-noop", loop=loop)

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
