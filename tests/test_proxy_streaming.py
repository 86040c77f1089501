"""Streamed DATA and pooled upstream connections, on real sockets.

smtp-sink (no CHUNKING) takes the DATA path with dot-stuffing; an aiosmtpd upstream counts the
connections it was opened; the BDAT path is covered against Postfix in test_proxy_submission.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from lab import LOOPBACK, SmtpSink, build_message, free_port, maildir_files, wait_for
from proxy_fixtures import ALICE, ProxyThread, proxy_config, start_proxy
from sentlink.proxy import pool as proxy_pool
from sentlink.proxy import server as proxy_server

pytestmark = pytest.mark.real

OUTSIDE = "dave@remote.test"


@pytest.fixture
def proxies() -> Iterator[Callable[[str], ProxyThread]]:
    started: list[ProxyThread] = []

    def start(text: str) -> ProxyThread:
        proxy = start_proxy(text)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def dotted_body(lines: int) -> str:
    """Lines of which many start with dots, some are a lone dot plus text: stuffing matters."""
    patterns = [".", "..", ".leading dot", "plain text line", "...", ". space"]
    return "".join(f"{patterns[i % len(patterns)]} {i:07d}\n" for i in range(lines))


def test_large_message_with_dot_lines_reaches_upstream_and_the_copy_unchanged(
    lab_tmp_path: Path, proxies: Callable[[str], ProxyThread]
) -> None:
    sink = SmtpSink(lab_tmp_path / "sink")
    sink.start()
    try:
        upstream = f"{{host: {LOOPBACK}, port: {sink.port}, tls: none, auth: none}}"
        maildir = lab_tmp_path / "mail"
        proxy = proxies(
            proxy_config(lab_tmp_path, maildir, upstream=upstream, internal_hosts=["127.0.0.0/8"])
        )
        body = dotted_body(120_000)  # about 2.5 MB: spooled to a file, relayed in chunks
        message_id = f"<{uuid.uuid4().hex}@example.test>"
        with proxy.client() as smtp:
            message = build_message(ALICE, [OUTSIDE], body=body, message_id=message_id)
            assert smtp.sendmail(ALICE, [OUTSIDE], message) == {}
        wait_for(lambda: len(sink.messages()) == 1, 10.0, what="the relayed message")
        assert sink.messages()[0].data.endswith(body.encode())
        copies = maildir_files(maildir, "Sent")
        assert len(copies) == 1
        assert copies[0].read_bytes().endswith(body.encode())
    finally:
        sink.stop()


class CountingUpstream:
    """aiosmtpd handler: counts EHLOs (one per connection) and QUITs, accepts every message."""

    def __init__(self) -> None:
        self.ehlos = 0
        self.quits = 0
        self.messages: list[bytes] = []

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.ehlos += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(bytes(envelope.original_content))
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.quits += 1
        return "221 Bye"


@pytest.fixture
def counting() -> Iterator[tuple[CountingUpstream, int]]:
    """A counting aiosmtpd upstream on loopback: (its handler, its port)."""
    handler = CountingUpstream()
    controller = Controller(handler, hostname=LOOPBACK, port=free_port())
    controller.start()
    yield handler, controller.port
    controller.stop()


def proxy_to(
    port: int, base: Path, proxies: Callable[[str], ProxyThread], limits: str = ""
) -> ProxyThread:
    """A proxy relaying to the loopback upstream on ``port`` without TLS or AUTH."""
    upstream = f"{{host: {LOOPBACK}, port: {port}, tls: none, auth: none}}"
    return proxies(
        proxy_config(
            base,
            base / "mail",
            upstream=upstream,
            internal_hosts=["127.0.0.0/8"],
            limits=limits,
            owner="null",
        )
    )


def test_next_session_reuses_the_idle_upstream_connection(
    lab_tmp_path: Path,
    proxies: Callable[[str], ProxyThread],
    counting: tuple[CountingUpstream, int],
) -> None:
    handler, port = counting
    proxy = proxy_to(port, lab_tmp_path, proxies)
    for _ in range(3):
        with proxy.client() as smtp:
            smtp.sendmail(ALICE, [OUTSIDE], build_message(ALICE, [OUTSIDE]))
    assert len(handler.messages) == 3
    assert handler.ehlos == 1


def test_idle_upstream_connection_is_closed_with_quit_after_the_idle_time(
    lab_tmp_path: Path,
    proxies: Callable[[str], ProxyThread],
    counting: tuple[CountingUpstream, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A lull must not leave pooled connections open until the next hop's own timeout (Postfix
    # would hold an smtpd process for each and log "timeout after ..." when it gives up).
    monkeypatch.setattr(proxy_pool, "IDLE_SECONDS", 1.0)
    monkeypatch.setattr(proxy_server, "SWEEP_SECONDS", 0.2)
    handler, port = counting
    proxy = proxy_to(port, lab_tmp_path, proxies)
    with proxy.client() as smtp:
        smtp.sendmail(ALICE, [OUTSIDE], build_message(ALICE, [OUTSIDE]))
    assert handler.quits == 0  # pooled, open
    wait_for(lambda: handler.quits == 1, 10.0, what="QUIT of the idle upstream connection")
    with proxy.client() as smtp:  # the next session connects anew
        smtp.sendmail(ALICE, [OUTSIDE], build_message(ALICE, [OUTSIDE]))
    assert handler.ehlos == 2
    assert len(handler.messages) == 2


def test_session_ended_mid_transaction_leaves_a_clean_connection_for_the_next(
    lab_tmp_path: Path,
    proxies: Callable[[str], ProxyThread],
    counting: tuple[CountingUpstream, int],
) -> None:
    handler, port = counting
    proxy = proxy_to(port, lab_tmp_path, proxies)
    with proxy.client() as smtp:
        assert smtp.mail(ALICE)[0] == 250
        assert smtp.rcpt(OUTSIDE)[0] == 250
    with proxy.client() as smtp:  # upstream must have had RSET: no nested MAIL error
        assert smtp.sendmail(ALICE, [OUTSIDE], build_message(ALICE, [OUTSIDE])) == {}
    assert len(handler.messages) == 1


def test_message_refused_midway_for_size_leaves_the_session_usable(
    lab_tmp_path: Path,
    proxies: Callable[[str], ProxyThread],
    counting: tuple[CountingUpstream, int],
) -> None:
    handler, port = counting
    proxy = proxy_to(port, lab_tmp_path, proxies, limits="{max_message_bytes: 100000}")
    with proxy.client() as smtp:
        smtp.mail(ALICE)  # no SIZE=: the limit is found while the data streams in
        smtp.rcpt(OUTSIDE)
        code, _ = smtp.data(build_message(ALICE, [OUTSIDE], body=dotted_body(20_000)))
        assert code == 552
        assert smtp.sendmail(ALICE, [OUTSIDE], build_message(ALICE, [OUTSIDE])) == {}
    assert len(handler.messages) == 1
