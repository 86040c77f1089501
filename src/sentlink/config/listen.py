"""The milter socket address, in libmilter's syntax (smfi_setconn(3)), and name server
addresses (``self_sent.dns_servers``).

libmilter writes ``inet:PORT@HOST`` where Postfix's ``smtpd_milters`` writes ``inet:HOST:PORT``;
the two are easy to mix up, so the Postfix form is rejected with the translation as a hint.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class MilterSocket:
    """A parsed ``milter.listen`` value."""

    family: Literal["unix", "inet", "inet6", "fd"]
    path: Path | None = None  # unix (also written local:)
    port: int | None = None  # inet, inet6
    host: str | None = None  # inet, inet6
    fd: int | None = None  # fd: an inherited, already listening socket (socket activation)


def parse_listen(spec: str) -> MilterSocket:
    """Parse ``unix:PATH``, ``local:PATH``, ``inet:PORT@HOST``, ``inet6:PORT@HOST`` or ``fd:N``.

    Raises ValueError with a message for the admin (with a hint when the form is a known mix-up).
    """
    family, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError(f"'{spec}' has no socket type; write unix:PATH or inet:PORT@HOST")
    if family in ("unix", "local"):
        if not rest:
            raise ValueError(f"'{spec}' names no socket path")
        return MilterSocket("unix", path=Path(rest))
    if family == "inet":
        return _parse_inet(spec, "inet", rest)
    if family == "inet6":
        return _parse_inet(spec, "inet6", rest)
    if family == "fd":
        if not rest.isdigit():
            raise ValueError(f"'{spec}': fd: takes a file descriptor number")
        return MilterSocket("fd", fd=int(rest))
    raise ValueError(
        f"'{spec}' has unknown socket type '{family}' (use unix:, local:, inet:, inet6: or fd:)"
    )


def _parse_inet(spec: str, family: Literal["inet", "inet6"], rest: str) -> MilterSocket:
    port, at, host = rest.partition("@")
    if not at:
        postfix_host, colon, postfix_port = rest.rpartition(":")
        if colon and postfix_host and _PORT.fullmatch(postfix_port):
            raise ValueError(
                f"'{spec}' is Postfix syntax (inet:HOST:PORT); libmilter wants "
                f"'{family}:{postfix_port}@{postfix_host.strip('[]')}'"
            )
        raise ValueError(
            f"'{spec}' names no address to listen on; write {family}:PORT@HOST, "
            f"e.g. {family}:8891@{'::1' if family == 'inet6' else '127.0.0.1'}"
        )
    if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise ValueError(f"'{spec}': port must be a number from 1 to 65535")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"'{spec}': missing or malformed host after '@'")
    return MilterSocket(family, port=int(port), host=host)


def parse_dns_server(text: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` -> (ip, port); ValueError with the reason."""
    host, port = text.strip(), 53
    if host.startswith("["):
        inner, sep, rest = host[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: write [IPv6]:PORT")
        host = inner
        if rest:
            port = _port(text, rest[1:])
    elif host.count(":") == 1:
        host, _, port_text = host.partition(":")
        port = _port(text, port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: not an IP address (give name servers by address)") from None
    return host, port


def _port(text: str, port: str) -> int:
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: bad port {port!r}")
    return int(port)
