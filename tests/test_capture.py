"""sentlink.capture: the Sent copy as the sender's Maildir receives it."""

from __future__ import annotations

import threading
from email import message_from_bytes
from email.policy import compat32
from pathlib import Path

import pytest

from sentlink.capture import Counters, SentCopyWriter, new_message_id
from sentlink.config.models import AccountConfig
from sentlink.errors import CaptureError
from sentlink.model import Envelope
from sentlink.trace import TRACE_HEADER, verify

SECRET = b"capture-test-secret-0123456789ab"


def account(tmp_path: Path) -> AccountConfig:
    return AccountConfig(
        name="alice",
        addresses=("alice@example.test", "a.smith@example.test"),
        maildir=tmp_path / "alice",
        logins=("alice",),
    )


def envelope(*rcpts: str) -> Envelope:
    return Envelope(queue_id="4ABC", mail_from="alice@example.test", rcpt_to=rcpts)


HEADERS = [
    ("From", "Alice <alice@example.test>"),
    ("To", "Bob <bob@ext.test>"),
    ("Cc", "carol@ext.test"),
    ("Subject", "Quote"),
    ("Message-ID", "<q1@example.test>"),
]


def write_copy(
    tmp_path: Path,
    headers: list[tuple[str, str]],
    rcpts: tuple[str, ...],
    body: list[bytes],
    message_id: str | None = None,
) -> Path:
    writer = SentCopyWriter(SECRET, "mail.example.test", clock=lambda: 1700000000.0)
    copy = writer.begin(account(tmp_path), envelope(*rcpts), headers, message_id)
    for chunk in body:
        copy.write_body(chunk)
    return copy.finish()


def test_copy_is_filed_in_sent_cur_with_seen_flag(tmp_path: Path) -> None:
    path = write_copy(tmp_path, HEADERS, ("bob@ext.test",), [b"Hi\r\n"])
    assert path.parent == tmp_path / "alice" / ".Sent" / "cur"
    assert path.name.endswith(":2,S")
    assert list((tmp_path / "alice" / ".Sent" / "tmp").iterdir()) == []
    assert (path.stat().st_mode & 0o777) == 0o600


def test_bcc_recipients_appear_only_for_envelope_recipients_not_in_to_or_cc(
    tmp_path: Path,
) -> None:
    rcpts = ("<bob@ext.test>", "CAROL@EXT.TEST", "dave@ext.test", "eve@ext.test")
    path = write_copy(tmp_path, HEADERS, rcpts, [b"Hi\r\n"])
    msg = message_from_bytes(path.read_bytes(), policy=compat32)
    assert msg.get_all("Bcc") == ["dave@ext.test, eve@ext.test"]


def test_resent_to_and_resent_cc_count_as_visible(tmp_path: Path) -> None:
    headers = [*HEADERS, ("Resent-To", "dave@ext.test"), ("Resent-Cc", "eve@ext.test")]
    path = write_copy(tmp_path, headers, ("dave@ext.test", "eve@ext.test"), [b"x\r\n"])
    assert b"\nBcc:" not in path.read_bytes()


def test_no_bcc_header_when_every_recipient_is_visible(tmp_path: Path) -> None:
    path = write_copy(tmp_path, HEADERS, ("bob@ext.test", "carol@ext.test"), [b"x\r\n"])
    assert message_from_bytes(path.read_bytes(), policy=compat32).get_all("Bcc") is None


def test_client_bcc_header_is_replaced_by_the_envelope_truth(tmp_path: Path) -> None:
    headers = [*HEADERS, ("Bcc", "mallory@ext.test"), ("BCC", "")]
    path = write_copy(tmp_path, headers, ("bob@ext.test", "dave@ext.test"), [b"x\r\n"])
    msg = message_from_bytes(path.read_bytes(), policy=compat32)
    assert msg.get_all("Bcc") == ["dave@ext.test"]


def test_unparseable_to_puts_its_recipients_in_bcc(tmp_path: Path) -> None:
    headers = [("From", "alice@example.test"), ("To", "bob@ext.test)<x@y>")]
    path = write_copy(tmp_path, headers, ("bob@ext.test",), [b"x\r\n"])
    msg = message_from_bytes(path.read_bytes(), policy=compat32)
    assert msg.get_all("Bcc") == ["bob@ext.test"]


def test_long_bcc_list_is_folded(tmp_path: Path) -> None:
    rcpts = tuple(f"recipient-number-{i}@ext.test" for i in range(20))
    path = write_copy(tmp_path, HEADERS, rcpts, [b"x\r\n"])
    header_block = path.read_bytes().split(b"\n\n", 1)[0]
    assert all(len(line) <= 78 for line in header_block.split(b"\n") if line.startswith(b" "))
    msg = message_from_bytes(path.read_bytes(), policy=compat32)
    bcc = [a.strip() for a in msg["Bcc"].replace("\n", "").split(",")]
    assert bcc == list(rcpts)


def test_crlf_split_across_chunks_becomes_one_lf(tmp_path: Path) -> None:
    body = [b"line one\r", b"\nline two\r\n\r", b"\n", b"end\r\n"]
    path = write_copy(tmp_path, HEADERS, ("bob@ext.test",), body)
    assert path.read_bytes().split(b"\n\n", 1)[1] == b"line one\nline two\n\nend\n"


def test_lone_cr_is_kept_as_data(tmp_path: Path) -> None:
    body = [b"a\rb\r", b"c\r\r\n", b"tail\r"]
    path = write_copy(tmp_path, HEADERS, ("bob@ext.test",), body)
    assert path.read_bytes().split(b"\n\n", 1)[1] == b"a\rb\rc\r\ntail\r"


def test_message_id_is_added_when_the_client_sent_none(tmp_path: Path) -> None:
    headers = [h for h in HEADERS if h[0] != "Message-ID"]
    writer = SentCopyWriter(SECRET, "mail.example.test")
    copy = writer.begin(account(tmp_path), envelope("bob@ext.test"), headers, "<new@x.test>")
    copy.write_body(b"x\r\n")
    path = copy.finish()
    assert copy.added_message_id == "<new@x.test>" == copy.message_id
    msg = message_from_bytes(path.read_bytes(), policy=compat32)
    assert msg.get_all("Message-ID") == ["<new@x.test>"]


def test_client_message_id_is_kept_and_nothing_added(tmp_path: Path) -> None:
    writer = SentCopyWriter(SECRET, "mail.example.test")
    copy = writer.begin(account(tmp_path), envelope("bob@ext.test"), HEADERS, "<unused@x.test>")
    path = copy.finish()
    assert copy.added_message_id is None
    msg = message_from_bytes(path.read_bytes(), policy=compat32)
    assert msg.get_all("Message-ID") == ["<q1@example.test>"]


def test_without_a_given_id_a_fresh_one_is_made(tmp_path: Path) -> None:
    headers = [h for h in HEADERS if h[0] != "Message-ID"]
    writer = SentCopyWriter(SECRET, "mail.example.test")
    copy = writer.begin(account(tmp_path), envelope("bob@ext.test"), headers, None)
    copy.finish()
    assert copy.added_message_id is not None
    assert copy.added_message_id.endswith("@mail.example.test>")


def test_trace_header_is_signed_and_replaces_any_the_client_sent(tmp_path: Path) -> None:
    headers = [*HEADERS, (TRACE_HEADER, "v=1; a=mallory; t=1; s=forged")]
    path = write_copy(tmp_path, headers, ("bob@ext.test",), [b"x\r\n"])
    msg = message_from_bytes(path.read_bytes(), policy=compat32)
    traces = msg.get_all(TRACE_HEADER)
    assert traces is not None and len(traces) == 1
    assert verify(SECRET, traces[0], "<q1@example.test>") == "alice"


def test_headers_keep_order_and_folding_with_lf_line_ends(tmp_path: Path) -> None:
    headers = [
        ("Received", "from client\r\n\tby mx; Tue, 1 Jan 2030 00:00:00 +0000"),
        ("From", "alice@example.test"),
        ("Subject", "two\r\n lines"),
        ("X-Empty", ""),
    ]
    path = write_copy(tmp_path, headers, (), [b"x\r\n"])
    data = path.read_bytes()
    assert b"\r" not in data
    assert data.startswith(
        b"Received: from client\n\tby mx; Tue, 1 Jan 2030 00:00:00 +0000\n"
        b"From: alice@example.test\nSubject: two\n lines\nX-Empty:\nMessage-ID: <"
    )


def test_header_value_cannot_end_the_header_block_early(tmp_path: Path) -> None:
    headers = [("Subject", "a\n\nInjected: yes"), ("From", "alice@example.test")]
    path = write_copy(tmp_path, headers, (), [b"body\r\n"])
    msg = message_from_bytes(path.read_bytes(), policy=compat32)
    assert msg["Injected"] is None and msg["From"] == "alice@example.test"
    assert msg.get_payload() == "body\n"


def test_8bit_header_bytes_are_written_back_unchanged(tmp_path: Path) -> None:
    raw = b"caf\xe9 \xff"
    headers = [("Subject", raw.decode("utf-8", "surrogateescape"))]
    path = write_copy(tmp_path, headers, (), [b"x\r\n"])
    assert b"Subject: caf\xe9 \xff\n" in path.read_bytes()


def test_abort_leaves_no_file_behind(tmp_path: Path) -> None:
    writer = SentCopyWriter(SECRET, "mail.example.test")
    copy = writer.begin(account(tmp_path), envelope("bob@ext.test"), HEADERS, None)
    copy.write_body(b"partial")
    copy.abort()
    copy.abort()
    sent = tmp_path / "alice" / ".Sent"
    assert list((sent / "tmp").iterdir()) == [] and list((sent / "cur").iterdir()) == []
    with pytest.raises(CaptureError):
        copy.write_body(b"more")


def test_unwritable_maildir_raises_capture_error(tmp_path: Path) -> None:
    (tmp_path / "alice").write_text("a file where the Maildir should be")
    writer = SentCopyWriter(SECRET, "mail.example.test")
    with pytest.raises(CaptureError):
        writer.begin(account(tmp_path), envelope("bob@ext.test"), HEADERS, None)


def test_new_message_ids_are_unique_and_well_formed() -> None:
    ids = {new_message_id("mail.example.test") for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("<") and i.endswith("@mail.example.test>") for i in ids)
    assert new_message_id("bad host\n").endswith("@localhost>")


def test_counters_count_by_event_and_reason_across_threads() -> None:
    counters = Counters()

    def bump() -> None:
        for _ in range(1000):
            counters.add("failed", "io")
            counters.add("captured")

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counters.get("failed", "io") == 4000
    assert counters.total("failed") == 4000
    assert counters.snapshot() == {("failed", "io"): 4000, ("captured", ""): 4000}


def test_copy_gets_a_date_when_the_client_sent_none(tmp_path: Path) -> None:
    from email.utils import parsedate_to_datetime

    account = AccountConfig(name="alice", addresses=("alice@example.test",), maildir=tmp_path / "a")
    writer = SentCopyWriter(b"k" * 32, "mx.example.test")
    envelope = Envelope("Q1", "alice@example.test", ("bob@ext.test",))
    copy = writer.begin(account, envelope, [("From", "alice@example.test")], None)
    copy.write_body(b"hi\r\n")
    path = copy.finish()
    head = path.read_bytes().split(b"\n\n", 1)[0].decode()
    dates = [line for line in head.splitlines() if line.startswith("Date: ")]
    assert len(dates) == 1
    assert parsedate_to_datetime(dates[0][6:]).tzinfo is not None
    dated = writer.begin(account, envelope, [("Date", "Tue, 14 Nov 2023 22:13:20 +0000")], None)
    dated.write_body(b"x\r\n")
    assert dated.finish().read_bytes().count(b"Date: ") == 1
