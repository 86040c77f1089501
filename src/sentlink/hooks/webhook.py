"""The ``webhook`` hook: POST each event as JSON, signed the Standard Webhooks way.

2xx is done. 410 Gone switches the hook off (the receiver says it will never want more).
429, 5xx, 408, timeouts and connection errors are retried, at the ``Retry-After`` the receiver
gave (RFC 9110 section 10.2.3: seconds or an HTTP-date) when it gave one. Any other answer,
redirects included (they are never followed: a signed event goes where it was configured to go,
nowhere else), fails the event.

The host is resolved for every new connection and each address checked; loopback, private,
link-local (cloud metadata at 169.254.169.254 included), multicast and other non-global
addresses are refused unless ``allow_private``. The connection is made to the checked address,
so a second DNS answer cannot redirect it (DNS rebinding).
"""

from __future__ import annotations

import http.client
import logging
import ssl
import time
from urllib.parse import urlsplit

from sentlink import __version__
from sentlink.config.models import HookConfig
from sentlink.errors import HookError
from sentlink.hooks import Event, Result
from sentlink.hooks.http import (
    PinnedHTTPConnection,
    RefusedAddress,
    check_address,
    describe_error,
    pinned_connection,
    retry_after_seconds,
)
from sentlink.hooks.signing import read_secrets, sign

__all__ = ["RefusedAddress", "WebhookHook", "check_address", "retry_after_seconds"]

log = logging.getLogger("sentlink.hooks.webhook")

_MAX_RESPONSE = 65536  # response bytes read (and dropped) so the connection can be reused
_RETRY_STATUS = frozenset({408, 429})


class WebhookHook:
    def __init__(
        self,
        name: str,
        url: str,
        secrets: list[bytes],
        timeout: float = 30.0,
        allow_private: bool = False,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HookError(f"url must be http:// or https:// with a host, got {parts.scheme}://")
        self._name = name
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._netloc = parts.netloc.rpartition("@")[2]  # never send userinfo as Host
        self._secrets = secrets
        self._timeout = timeout
        self._allow_private = allow_private
        self._conn: PinnedHTTPConnection | None = None
        self._context = ssl.create_default_context() if self._tls else None

    @classmethod
    def from_config(cls, config: HookConfig) -> WebhookHook:
        if config.url is None or config.secret_file is None:
            raise HookError("a webhook hook needs url and secret_file")
        return cls(
            config.name,
            config.url,
            read_secrets(config.secret_file),
            float(config.timeout),
            config.allow_private,
        )

    @property
    def name(self) -> str:
        return self._name

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connect(self) -> PinnedHTTPConnection:
        return pinned_connection(
            self._host, self._port, self._timeout, self._allow_private, self._context
        )

    def deliver(self, event: Event) -> Result:
        timestamp = str(int(time.time()))
        headers = {
            "Host": self._netloc,
            "Content-Type": "application/json",
            "User-Agent": f"sentlink/{__version__}",
            "webhook-id": event.id,
            "webhook-timestamp": timestamp,
            "webhook-signature": sign(self._secrets, event.id, timestamp, event.body),
        }
        reused = self._conn is not None
        try:
            status, retry_after = self._post(event.body, headers)
        except RefusedAddress as exc:
            self.close()
            return Result.failed(str(exc))
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            if not reused:
                return Result.retry(describe_error(exc))
            # A kept-alive connection the server had already closed: once more on a new one.
            try:
                status, retry_after = self._post(event.body, headers)
            except RefusedAddress as exc2:
                self.close()
                return Result.failed(str(exc2))
            except (OSError, http.client.HTTPException) as exc2:
                self.close()
                return Result.retry(describe_error(exc2))
        if 200 <= status < 300:
            return Result.done()
        if status == 410:
            return Result.failed("HTTP 410 Gone: the receiver asked for no more events", True)
        if status in _RETRY_STATUS or status >= 500:
            return Result.retry(f"HTTP {status}", retry_after_seconds(retry_after, time.time()))
        if 300 <= status < 400:
            return Result.failed(f"HTTP {status}: redirects are not followed")
        return Result.failed(f"HTTP {status}")

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, str | None]:
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        conn.request("POST", self._path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(_MAX_RESPONSE)
        if not response.isclosed() or response.will_close:
            self.close()  # a longer body than we read, or the server closes: start afresh
        return response.status, response.getheader("Retry-After")
