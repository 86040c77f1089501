"""HTTP for hooks: the address policy, pinned connections and a small keep-alive client.

Every new connection resolves the host and checks each address; loopback, private,
link-local (cloud metadata at 169.254.169.254 included), multicast and other non-global
addresses are refused unless ``allow_private``. The connection is then made to the checked
address, so a second DNS answer cannot redirect it (DNS rebinding). Redirects are never
followed: a request goes where it was configured to go, nowhere else.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from sentlink.errors import HookError

__all__ = [
    "HttpAnswer",
    "HttpClient",
    "PinnedHTTPConnection",
    "PinnedHTTPSConnection",
    "RefusedAddress",
    "check_address",
    "describe_error",
    "retry_after_seconds",
]

MAX_RETRY_AFTER = 7 * 86400
_MAX_RESPONSE = 1024 * 1024


class RefusedAddress(HookError):
    """The URL's host resolves to an address hooks may not reach."""


def check_address(address: str) -> None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_global or ip.is_multicast:
        raise RefusedAddress(f"{ip} is not a public address (set allow_private: true to allow it)")


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A Retry-After value (RFC 9110 section 10.2.3: seconds or an HTTP-date) in seconds."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(min(int(value), MAX_RETRY_AFTER))
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(when - now, 0.0), float(MAX_RETRY_AFTER))


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text[:200]


class PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address checked beforehand, not to whatever ``host`` resolves to now."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PinnedHTTPSConnection(PinnedHTTPConnection):
    default_port = http.client.HTTPS_PORT

    def __init__(
        self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(host, port, address, timeout)
        self._tls = context

    def connect(self) -> None:
        super().connect()
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self.host)


def pinned_connection(
    host: str, port: int, timeout: float, allow_private: bool, context: ssl.SSLContext | None
) -> PinnedHTTPConnection:
    """A connection to ``host`` pinned to its first address, every address checked first."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{host}: no address")
    addresses = [str(info[4][0]) for info in infos]
    if not allow_private:
        for address in addresses:
            check_address(address)  # every answer: any of them could be used next time
    if context is not None:
        return PinnedHTTPSConnection(host, port, addresses[0], timeout, context)
    return PinnedHTTPConnection(host, port, addresses[0], timeout)


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: Mapping[str, str]  # lower-cased names
    body: bytes


class HttpClient:
    """Requests to one origin (``https://host[:port]`` plus a path prefix) over a kept-alive
    connection. Raises RefusedAddress for a forbidden address, OSError or HTTPException when
    the exchange fails (once more on a fresh connection when a kept-alive one was stale)."""

    def __init__(self, base_url: str, timeout: float, allow_private: bool) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HookError(f"{base_url!r} is not an http:// or https:// URL with a host")
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        self._netloc = parts.netloc.rpartition("@")[2]  # never send userinfo as Host
        self._timeout = timeout
        self._allow_private = allow_private
        self._conn: PinnedHTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> HttpAnswer:
        reused = self._conn is not None
        try:
            return self._exchange(method, path, body, headers)
        except RefusedAddress:
            self.close()
            raise
        except (OSError, http.client.HTTPException):
            self.close()
            if not reused:
                raise
        # A kept-alive connection the server had already closed: once more on a new one.
        try:
            return self._exchange(method, path, body, headers)
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def _exchange(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> HttpAnswer:
        if self._conn is None:
            self._conn = pinned_connection(
                self._host, self._port, self._timeout, self._allow_private, self._tls
            )
        conn = self._conn
        conn.request(
            method, self._prefix + path, body=body, headers={"Host": self._netloc, **headers}
        )
        response = conn.getresponse()
        data = response.read(_MAX_RESPONSE)
        if not response.isclosed() or response.will_close:
            self.close()  # a longer body than we read, or the server closes: start afresh
        answer_headers = {k.lower(): v for k, v in response.getheaders()}
        return HttpAnswer(response.status, answer_headers, data)
