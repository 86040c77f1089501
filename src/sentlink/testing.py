"""Helpers for testing hooks: sample events, a real webhook receiver, signature checks.

For authors of hook adapters (entry-point group ``sentlink.hooks``) and for sentlink's own tests::

    from sentlink.testing import WebhookReceiver, make_event

    with WebhookReceiver() as receiver:
        hook = MyHook(url=receiver.url)
        assert hook.deliver(make_event()).outcome == "done"
        assert receiver.requests[0].json()["type"] == "message.linked"

The receiver is a real HTTP server on loopback in a thread: no mocks between a hook and the
socket. ``responder`` decides each answer; ``down()``/``up()`` simulate an outage.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from sentlink.hooks import Event
from sentlink.hooks.signing import verify

__all__ = [
    "ReceivedRequest",
    "Response",
    "WebhookReceiver",
    "make_event",
    "sample_message_linked_data",
    "signature_valid",
]


def sample_message_linked_data(**changes: Any) -> dict[str, Any]:
    """The ``data`` of a typical ``message.linked`` event (members as sentlink sends them)."""
    data: dict[str, Any] = {
        "account": "alice",
        "direction": "sent",
        "message_id": "20240501.1234@example.test",
        "subject": "Quote for 20 units",
        "date": "2024-05-01T10:00:00+00:00",
        "from": {"email": "alice@example.test", "name": "Alice Seller"},
        "participants": [{"email": "bob@customer.test", "role": "to", "name": "Bob Buyer"}],
        "records": [
            {
                "kind": "contact",
                "id": "c1",
                "name": "Bob Buyer",
                "email": "bob@customer.test",
                "role": "to",
                "via": "address",
            }
        ],
        "size": 2048,
        "attachments": ["quote.pdf"],
        "folder": "Sent",
        "file": ".Sent/cur/1714557600.M1P2.host,S=2048:2,S",
        "uniq": "1714557600.M1P2.host,S=2048",
    }
    data.update(changes)
    return data


def make_event(
    type: str = "message.linked",
    data: Mapping[str, Any] | None = None,
    id: str = "msg_0123456789abcdef0123456789abcdef",
    timestamp: str = "2024-05-01T10:00:01.000+00:00",
) -> Event:
    """An event exactly as a hook receives it."""
    body_data = dict(data) if data is not None else sample_message_linked_data()
    body = {"id": id, "type": type, "timestamp": timestamp, "data": body_data}
    return Event(id, type, json.dumps(body, separators=(",", ":")).encode(), body_data)


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # lower-cased names
    body: bytes
    received_at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Response:
    status: int = 204
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


Responder = Callable[[ReceivedRequest], Response]


def signature_valid(
    secrets: Sequence[bytes], request: ReceivedRequest, now: float | None = None
) -> bool:
    """Whether ``request`` carries a valid, fresh Standard Webhooks signature."""
    when = time.time() if now is None else now
    return verify(secrets, request.headers, request.body, when)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], receiver: WebhookReceiver) -> None:
        self.receiver = receiver
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        with self.lock:
            self.connections.add(conn)
        return conn, addr

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self.lock:
            connections = list(self.connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real receivers
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if len(body) < length:  # the client went away mid-request: nothing was received
            self.close_connection = True
            return
        request = ReceivedRequest(
            "POST",
            self.path,
            {k.lower(): v for k, v in self.headers.items()},
            body,
            time.time(),
        )
        response = self.server.receiver.handle(request)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    do_PUT = do_POST


class WebhookReceiver:
    """A webhook receiver on 127.0.0.1 recording every request (also those it answered 5xx)."""

    def __init__(self, responder: Responder | None = None, port: int = 0) -> None:
        self._responder = responder or (lambda _request: Response())
        self._lock = threading.Lock()
        self.requests: list[ReceivedRequest] = []
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/hook"

    def handle(self, request: ReceivedRequest) -> Response:
        response = self._responder(request)
        with self._lock:
            self.requests.append(request)
        return response

    def received(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self.requests)

    def up(self) -> None:
        """Start listening (again, on the same port)."""
        if self._server is not None:
            return
        self._server = _Server(("127.0.0.1", self._port), self)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="receiver"
        )
        self._thread.start()

    def down(self) -> None:
        """Stop listening and cut open connections: clients see connection refused/reset."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.drop_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()
