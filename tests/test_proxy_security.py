"""Proxy security rules on real sockets: TLS before AUTH, STARTTLS injection, smuggling, limits."""

from __future__ import annotations

import smtplib
import socket
import ssl
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab import LOOPBACK, MailLab, SmtpSink, build_message, maildir_files, wait_for
from proxy_fixtures import (
    ALICE,
    ProxyThread,
    proxy_config,
    raw_reply,
    self_signed_cert,
    start_proxy,
)

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


@pytest.fixture
def sink(lab_tmp_path: Path) -> Iterator[SmtpSink]:
    sink = SmtpSink(lab_tmp_path / "sink")
    sink.start()
    yield sink
    sink.stop()


def relay_config(workdir: Path, sink: SmtpSink, **kwargs: object) -> str:
    """Internal-host relaying to the sink (no AUTH involved)."""
    upstream = f"{{host: {LOOPBACK}, port: {sink.port}, tls: none, auth: none}}"
    return proxy_config(
        workdir,
        workdir / "mail",
        upstream=upstream,
        internal_hosts=["127.0.0.0/8"],
        owner="null",
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
def tls_proxy(
    lab_tmp_path: Path, mail_lab: MailLab, proxies: Callable[[str], ProxyThread]
) -> ProxyThread:
    cert, key = self_signed_cert(lab_tmp_path)
    upstream = f"{{host: {LOOPBACK}, port: {mail_lab.postfix.submission_port}, tls: none}}"
    text = proxy_config(
        lab_tmp_path,
        mail_lab.postfix.mailbox("alice"),
        upstream=upstream,
        tls=f"{{cert: {cert}, key: {key}}}",
    )
    return proxies(text)


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test's throwaway self-signed certificate
    return context


def test_auth_before_starttls_is_refused_and_allowed_after_it(
    tls_proxy: ProxyThread, mail_lab: MailLab
) -> None:
    password = next(u.password for u in mail_lab.users if u.address == ALICE)
    with tls_proxy.client() as smtp:
        assert not smtp.has_extn("auth")  # not even offered in clear
        code, _ = smtp.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABwdw==")
        assert code == 538
        smtp.starttls(context=client_context())
        smtp.ehlo()
        assert smtp.has_extn("auth")
        code, _ = smtp.login(ALICE, password)
        assert code == 235


def test_commands_pipelined_behind_starttls_are_discarded(tls_proxy: ProxyThread) -> None:
    # CVE-2024-34083 class: plaintext sent after STARTTLS must not run inside the TLS session.
    with socket.create_connection((LOOPBACK, tls_proxy.port), timeout=10) as raw:
        raw_reply(raw)
        raw.sendall(b"EHLO client.test\r\n")
        raw_reply(raw)
        raw.sendall(b"STARTTLS\r\nVRFY injected\r\n")
        assert raw_reply(raw).startswith(b"220")
        with client_context().wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"NOOP\r\n")
            first = raw_reply(tls)  # type: ignore[arg-type]
            assert first.startswith(b"250"), first
            tls.sendall(b"QUIT\r\n")
            assert raw_reply(tls).startswith(b"221")  # type: ignore[arg-type]


# The end-of-data variants of SMTP smuggling research (SEC Consult, 2023) and bare CR/LF; each
# is followed by a second, smuggled transaction that must never reach upstream.
ENDINGS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n.\n",
    b"\r.\n",
    b"\n.\r",
    b"\r.\r",
    b"\r\r\n.\r\n",
    b"\r\n.\n\r\n",
]


@pytest.mark.parametrize("ending", ENDINGS, ids=[repr(e)[2:-1] for e in ENDINGS])
def test_smuggled_end_of_data_is_rejected_and_nothing_is_relayed(
    lab_tmp_path: Path,
    sink: SmtpSink,
    proxies: Callable[[str], ProxyThread],
    ending: bytes,
) -> None:
    proxy = proxies(relay_config(lab_tmp_path, sink))
    smuggled = (
        b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<victim@remote.test>\r\nDATA\r\n"
        b"From: admin@example.test\r\nSubject: smuggled\r\n\r\nfake\r\n"
    )
    body = build_message(ALICE, [OUTSIDE]) + ending + smuggled
    with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as raw:
        raw_reply(raw)
        for command in (
            b"EHLO client.test",
            f"MAIL FROM:<{ALICE}>".encode(),
            f"RCPT TO:<{OUTSIDE}>".encode(),
            b"DATA",
        ):
            raw.sendall(command + b"\r\n")
            assert raw_reply(raw)[:1] in (b"2", b"3")
        raw.sendall(body + b"\r\n.\r\n")
        reply = raw_reply(raw)
        assert reply.startswith(b"550 5.6.11"), reply
        # The session ends there: nothing pipelined behind the refused message is read.
        assert _closed(raw)
    assert sink.messages() == []
    assert maildir_files(lab_tmp_path / "mail", "Sent") == []


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def test_bare_line_feed_in_a_header_is_rejected(
    lab_tmp_path: Path, sink: SmtpSink, proxies: Callable[[str], ProxyThread]
) -> None:
    proxy = proxies(relay_config(lab_tmp_path, sink))
    message = b"From: alice@example.test\r\nTo: dave@remote.test\nBcc: x@remote.test\r\n\r\nhi\r\n"
    with proxy.client() as smtp:
        smtp.mail(ALICE)
        smtp.rcpt(OUTSIDE)
        with pytest.raises(smtplib.SMTPDataError) as err:
            # smtplib would turn the bare LF into CRLF; send the bytes as they are.
            smtp.putcmd("DATA")
            assert smtp.getreply()[0] == 354
            smtp.send(message + b".\r\n")
            code, reply = smtp.getreply()
            raise smtplib.SMTPDataError(code, reply)
        assert err.value.smtp_code == 550
    assert sink.messages() == []


def test_too_many_recipients_get_452(
    lab_tmp_path: Path, sink: SmtpSink, proxies: Callable[[str], ProxyThread]
) -> None:
    proxy = proxies(relay_config(lab_tmp_path, sink, limits="{max_recipients: 2}"))
    with proxy.client() as smtp:
        smtp.mail(ALICE)
        assert smtp.rcpt("a@remote.test")[0] == 250
        assert smtp.rcpt("b@remote.test")[0] == 250
        assert smtp.rcpt("c@remote.test")[0] == 452


def test_oversized_message_gets_552_and_is_not_relayed(
    lab_tmp_path: Path, sink: SmtpSink, proxies: Callable[[str], ProxyThread]
) -> None:
    proxy = proxies(relay_config(lab_tmp_path, sink, limits="{max_message_bytes: 10000}"))
    with proxy.client() as smtp:
        smtp.mail(ALICE)
        smtp.rcpt(OUTSIDE)
        code, _ = smtp.data(build_message(ALICE, [OUTSIDE], body="x" * 900 + "\n") * 20)
    assert code == 552
    assert sink.messages() == []


def test_sessions_beyond_the_limit_get_421(
    lab_tmp_path: Path, sink: SmtpSink, proxies: Callable[[str], ProxyThread]
) -> None:
    proxy = proxies(relay_config(lab_tmp_path, sink, limits="{max_sessions: 1}"))
    with proxy.client(), socket.create_connection((LOOPBACK, proxy.port), timeout=10) as second:
        assert raw_reply(second).startswith(b"421 4.7.0")
    # The slot is free again once the first session ended.
    wait_for(lambda: _greeting(proxy.port).startswith(b"220"), 5.0, what="a free session slot")


def _greeting(port: int) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        return raw_reply(sock)


def test_idle_session_is_closed_with_421(
    lab_tmp_path: Path, sink: SmtpSink, proxies: Callable[[str], ProxyThread]
) -> None:
    proxy = proxies(relay_config(lab_tmp_path, sink, limits="{idle_timeout: 1}"))
    with socket.create_connection((LOOPBACK, proxy.port), timeout=10) as sock:
        assert raw_reply(sock).startswith(b"220")
        assert raw_reply(sock).startswith(b"421 4.4.2")
        assert sock.recv(100) == b""


def test_relay_for_a_stranger_is_refused(
    lab_tmp_path: Path, sink: SmtpSink, proxies: Callable[[str], ProxyThread]
) -> None:
    upstream = f"{{host: {LOOPBACK}, port: {sink.port}, tls: none, auth: none}}"
    proxy = proxies(proxy_config(lab_tmp_path, lab_tmp_path / "m", upstream=upstream))
    message_id = f"<{uuid.uuid4().hex}@example.test>"
    with proxy.client() as smtp:
        code, _ = smtp.mail(ALICE)
        assert code == 530
        with pytest.raises(smtplib.SMTPSenderRefused):
            smtp.sendmail(ALICE, [OUTSIDE], build_message(ALICE, [OUTSIDE], message_id=message_id))
    assert sink.messages() == []
