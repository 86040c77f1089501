"""Rules the proxy enforces before anything parses or relays a message.

SMTP smuggling (CVE-2023-51764/-51765/-51766, CVE-2024-27305 in aiosmtpd): when two servers on a
path disagree about where DATA ends (``<LF>.<LF>``, ``<CR>.<CR>``, ``<LF>.<CR><LF>`` ...), a
second message can ride inside the first. RFC 5321 2.3.8 allows CR and LF only together as
CRLF, so a message containing either alone is refused whole: nothing downstream ever sees a
line ending it could read differently.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

# Replies (RFC 5321 4.2, enhanced codes RFC 3463 / IANA registry).
AUTH_REQUIRED = "530 5.7.0 Authentication required"
NOT_AUTHORIZED = "554 5.7.1 Client host not authorized to use this service"
SENDER_NOT_OWNED = "553 5.7.1 Sender address not owned by the authenticated user"
BARE_LINE_ENDING = "550 5.6.11 Bare CR or LF in message data is not allowed (RFC 5321 2.3.8)"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TOO_MANY_SESSIONS = "421 4.7.0 Too many sessions, try again later"
IDLE_TIMEOUT = "421 4.4.2 Idle timeout, closing connection"
COPY_FAILED = "451 4.3.0 Could not file the Sent copy, try again later"
AUTH_UNAVAILABLE = "454 4.7.0 Temporary authentication failure"
AUTH_NOT_OFFERED = "504 5.5.4 Authentication is not offered here"

# Why spool.DataReceiver refused a message -> the reply.
DATA_REFUSALS = {
    "bare_line_ending": BARE_LINE_ENDING,
    "too_big": TOO_BIG,
    "line_too_long": LINE_TOO_LONG,
}


def peer_address(peer: object) -> str:
    """The IP address of an asyncio peername (a tuple for inet sockets)."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""


def is_trusted_client(address: str, networks: Sequence[str], loopback: bool = True) -> bool:
    """Whether ``address`` is loopback (when allowed) or inside one of ``networks``."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if loopback and ip.is_loopback:
        return True
    return any(ip in ipaddress.ip_network(net, strict=False) for net in networks)
