"""The submission proxy against a real upstream: Postfix with Dovecot SASL, and smtp-sink faults.

Postfix's submission listener (SASL via Dovecot, no TLS: loopback) is the upstream for AUTH
passthrough; smtp-sink stands in for an upstream that refuses, tempfails, drops or aborts.
"""

from __future__ import annotations

import smtplib
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab import (
    LOOPBACK,
    MailLab,
    build_message,
    maildir_files,
    parse_headers,
)
from proxy_fixtures import (
    ALICE,
    FaultySink,
    ProxyThread,
    proxy_config,
    start_proxy,
)

pytestmark = pytest.mark.real

BOB = "bob@example.test"
OUTSIDE = "dave@remote.test"
HIDDEN = "erin@remote.test"


def mid(tag: str) -> str:
    return f"<{tag}-{uuid.uuid4().hex[:10]}@example.test>"


def sent_files(maildir: Path) -> list[Path]:
    return maildir_files(maildir, "Sent")


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
def via_postfix(
    mail_lab: MailLab, lab_tmp_path: Path, proxies: Callable[[str], ProxyThread]
) -> ProxyThread:
    """A submission proxy whose upstream is the lab Postfix's SASL submission port."""
    upstream = f"{{host: {LOOPBACK}, port: {mail_lab.postfix.submission_port}, tls: none}}"
    text = proxy_config(lab_tmp_path, mail_lab.postfix.mailbox("alice"), upstream=upstream)
    return proxies(text)


def alice_password(lab: MailLab) -> str:
    return next(u.password for u in lab.users if u.address == ALICE)


def test_message_is_relayed_and_copied_with_bcc_only_after_upstreams_250(
    mail_lab: MailLab, via_postfix: ProxyThread
) -> None:
    message_id = mid("relay")
    before = len(sent_files(mail_lab.postfix.mailbox("alice")))
    with via_postfix.client() as smtp:
        smtp.login(ALICE, alice_password(mail_lab))
        refused = smtp.sendmail(
            ALICE, [OUTSIDE, HIDDEN], build_message(ALICE, [OUTSIDE], message_id=message_id)
        )
    assert refused == {}
    relayed = mail_lab.postfix.wait_relayed(message_id)[0]
    assert set(relayed.rcpts) == {OUTSIDE, HIDDEN}
    assert relayed.headers["Bcc"] is None  # never in what is relayed
    copies = sent_files(mail_lab.postfix.mailbox("alice"))
    assert len(copies) == before + 1
    headers = parse_headers(copies[-1].read_bytes())
    assert headers["Message-ID"] == message_id
    assert headers["Bcc"] == HIDDEN
    assert headers["X-Sentlink-Trace"]
    assert copies[-1].stat().st_uid == 5000


def test_message_without_message_id_gets_one_shared_by_relayed_message_and_copy(
    mail_lab: MailLab, via_postfix: ProxyThread
) -> None:
    tag = uuid.uuid4().hex
    with via_postfix.client() as smtp:
        smtp.login(ALICE, alice_password(mail_lab))
        smtp.sendmail(ALICE, [OUTSIDE], build_message(ALICE, [OUTSIDE], subject=tag))
    relayed = next(m for m in mail_lab.postfix.wait_relayed(count=1) if tag in m.data.decode())
    copy = next(p for p in sent_files(mail_lab.postfix.mailbox("alice")) if tag in p.read_text())
    assert relayed.message_id is not None
    assert parse_headers(copy.read_bytes())["Message-ID"] == relayed.message_id


def test_wrong_password_gets_upstreams_535_and_nothing_is_relayed(
    mail_lab: MailLab, via_postfix: ProxyThread
) -> None:
    with via_postfix.client() as smtp, pytest.raises(smtplib.SMTPAuthenticationError) as err:
        smtp.login(ALICE, "wrong")
    assert err.value.smtp_code == 535
    with via_postfix.client() as smtp:
        code, _ = smtp.mail(ALICE)
    assert code == 530  # still not authenticated: no relaying


def test_refused_recipient_is_refused_to_the_client_and_left_out_of_the_copy(
    mail_lab: MailLab, via_postfix: ProxyThread
) -> None:
    message_id = mid("partial")
    unknown = "nobody@example.test"
    with via_postfix.client() as smtp:
        smtp.login(ALICE, alice_password(mail_lab))
        refused = smtp.sendmail(
            ALICE, [BOB, unknown, HIDDEN], build_message(ALICE, [BOB], message_id=message_id)
        )
    assert list(refused) == [unknown]
    assert refused[unknown][0] == 550
    mail_lab.postfix.wait_message("bob", message_id)
    copy = next(
        p
        for p in sent_files(mail_lab.postfix.mailbox("alice"))
        if parse_headers(p.read_bytes())["Message-ID"] == message_id
    )
    assert parse_headers(copy.read_bytes())["Bcc"] == HIDDEN


def test_mail_from_not_owned_by_the_login_is_refused_with_553(
    mail_lab: MailLab, via_postfix: ProxyThread
) -> None:
    with via_postfix.client() as smtp:
        smtp.login(ALICE, alice_password(mail_lab))
        code, reply = smtp.mail(BOB)
    assert (code, reply[:5]) == (553, b"5.7.1")


def test_unauthenticated_client_cannot_relay(mail_lab: MailLab, via_postfix: ProxyThread) -> None:
    with via_postfix.client() as smtp:
        code, reply = smtp.mail(ALICE)
    assert (code, reply[:5]) == (530, b"5.7.0")


# -- upstream faults (smtp-sink); the client is an internal host, upstream needs no AUTH ---------

FAULTS = [
    pytest.param(["-f", "MAIL"], "mail", 5, id="mail-5xx"),
    pytest.param(["-r", "MAIL"], "mail", 4, id="mail-4xx"),
    pytest.param(["-f", "RCPT"], "rcpt", 5, id="rcpt-5xx"),
    pytest.param(["-r", "RCPT"], "rcpt", 4, id="rcpt-4xx"),
    pytest.param(["-f", "."], "data", 5, id="data-5xx"),
    pytest.param(["-r", "."], "data", 4, id="data-4xx"),
    pytest.param(["-Q", "."], "data", 4, id="data-421"),
    pytest.param(["-q", "."], "data", 4, id="data-silent-drop"),
    # smtp-sink answers 550 and hangs up mid-DATA: a 5xx or, when the hang-up is seen first,
    # a 4xx; never 250.
    pytest.param(["-A", "0"], "data", 0, id="abort-after-data"),
]


@pytest.mark.parametrize(("options", "stage", "first_digit"), FAULTS)
def test_upstream_failure_reaches_the_client_and_files_no_copy(
    lab_tmp_path: Path,
    proxies: Callable[[str], ProxyThread],
    options: list[str],
    stage: str,
    first_digit: int,
) -> None:
    sink = FaultySink(lab_tmp_path / "sink", options)
    sink.start()
    maildir = lab_tmp_path / "mail"
    try:
        upstream = f"{{host: {LOOPBACK}, port: {sink.port}, tls: none, auth: none}}"
        proxy = proxies(
            proxy_config(
                lab_tmp_path,
                maildir,
                upstream=upstream,
                internal_hosts=["127.0.0.0/8"],
                owner="null",
            )
        )
        with proxy.client() as smtp:
            code, _ = smtp.mail(ALICE)
            if stage != "mail":
                assert code == 250
                code, _ = smtp.rcpt(OUTSIDE)
            if stage == "data":
                assert code == 250
                try:
                    code, _ = smtp.data(build_message(ALICE, [OUTSIDE], message_id=mid("f")))
                except smtplib.SMTPServerDisconnected:  # pragma: no cover - must not happen
                    code = 0
        assert code // 100 == first_digit if first_digit else code // 100 in (4, 5)
        assert sent_files(maildir) == []
    finally:
        sink.stop()


def test_upstream_down_gets_a_temporary_failure(
    lab_tmp_path: Path, proxies: Callable[[str], ProxyThread], mail_lab: MailLab
) -> None:
    closed = socket.socket()
    closed.bind((LOOPBACK, 0))  # bound, never listening: connections are refused
    try:
        port = closed.getsockname()[1]
        upstream = f"{{host: {LOOPBACK}, port: {port}, tls: none}}"
        proxy = proxies(proxy_config(lab_tmp_path, lab_tmp_path / "mail", upstream=upstream))
        with proxy.client() as smtp, pytest.raises(smtplib.SMTPAuthenticationError) as err:
            smtp.login(ALICE, "pw")
        assert err.value.smtp_code == 454
    finally:
        closed.close()


def test_large_message_goes_upstream_in_bdat_chunks_unchanged(
    mail_lab: MailLab, via_postfix: ProxyThread
) -> None:
    # Postfix offers CHUNKING (RFC 3030): the proxy sends the spooled message in BDAT chunks.
    message_id = mid("large")
    body = "".join(f".{'x' * 70} {i:07d}\n" for i in range(12_000))  # ~1 MB, 4 chunks
    with via_postfix.client() as smtp:
        smtp.login(ALICE, alice_password(mail_lab))
        message = build_message(ALICE, [OUTSIDE], message_id=message_id, body=body)
        smtp.sendmail(ALICE, [OUTSIDE], message)
    relayed = mail_lab.postfix.wait_relayed(message_id)[0]
    assert relayed.data.endswith(body.encode())
    copy = next(
        p
        for p in sent_files(mail_lab.postfix.mailbox("alice"))
        if parse_headers(p.read_bytes())["Message-ID"] == message_id
    )
    assert copy.read_bytes().endswith(body.encode())
