"""End to end on a real Postfix (and Dovecot for SASL and IMAP) with ``sentlink serve``.

Postfix hands submission-port sessions to the milter over a unix socket; the Sent copy lands in
the sender's Maildir that Postfix and Dovecot also use, and the watcher links it.
"""

from __future__ import annotations

import re
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import MailLab, PostfixLab, build_message, make_lab_dir, parse_headers, wait_for
from sentlink_proc import SentlinkServe, write_csv

pytestmark = pytest.mark.real

ALICE = "alice@example.test"
CAROL = "carol@example.test"
BOB = "bob@example.test"


@dataclass
class Setup:
    lab: MailLab
    serve: SentlinkServe
    workdir: Path

    @property
    def postfix(self) -> PostfixLab:
        return self.lab.postfix

    @property
    def alice_sent(self) -> Path:
        return self.postfix.mailbox("alice") / ".Sent"

    def submit(self, login: str, mail_from: str, rcpts: list[str], message: bytes) -> str:
        user = self.lab.postfix.users
        password = next(u.password for u in user if u.address == login)
        return self.postfix.send(
            mail_from,
            rcpts,
            message,
            port=self.postfix.submission_port,
            login=login,
            password=password,
        )


def write_config(workdir: Path, vmail: Path, socket_path: Path, extra_accounts: str = "") -> Path:
    config = workdir / "sentlink.yaml"
    config.write_text(
        f"""\
site_secret_file: {workdir}/site.secret
store: {{url: "sqlite:///{workdir}/sentlink.db"}}
internal_domains: [example.test]
accounts:
  - name: alice
    addresses: [{ALICE}]
    logins: [{ALICE}]
    maildir: {vmail}/alice
    owner: "5000:5000"
{extra_accounts}
milter:
  listen: "unix:{socket_path}"
  socket_mode: "0666"
watch: {{rescan_seconds: 2}}
"""
    )
    return config


def start_setup(
    lab_dir: Path, start_lab: Callable[..., MailLab], extra_accounts: str = ""
) -> Setup:
    socket_path = lab_dir / "milter.sock"
    lab = start_lab(root=make_lab_dir(lab_dir), milter=f"unix:{socket_path}")
    workdir = make_lab_dir(lab_dir, prefix="sentlink-")
    config = write_config(workdir, lab.postfix.vmail, socket_path, extra_accounts)
    serve = SentlinkServe(config, workdir)
    contacts = write_csv(
        workdir / "contacts.csv",
        [
            ("contact", "c-bob", "Bob Customer", "bob@customer.test"),
            ("contact", "c-dave", "Dave Customer", "dave@customer.test"),
            ("lead", "l-carol", "Carol Prospect", "carol@prospect.test"),
        ],
    )
    result = serve.run("crm", "import", str(contacts))
    assert result.returncode == 0, result.stderr
    serve.start(socket_path)
    return Setup(lab, serve, workdir)


@pytest.fixture(scope="module")
def setup(lab_base: Path) -> Iterator[Setup]:
    labs: list[MailLab] = []

    def start_lab(**kwargs: object) -> MailLab:
        lab = MailLab(**kwargs)  # type: ignore[arg-type]
        labs.append(lab)
        lab.start()
        return lab

    lab_dir = make_lab_dir(lab_base, prefix="e2e-")
    locked = lab_dir / "locked"  # a Maildir root sentlink must refuse: owned by root, not 5000
    (locked / "carol").mkdir(parents=True)
    accounts = f"""\
  - name: carol
    addresses: [{CAROL}]
    logins: [{CAROL}]
    maildir: {locked}/carol
    owner: "5000:5000"
"""
    s = start_setup(lab_dir, start_lab, accounts)
    try:
        yield s
        assert s.serve.stop() == 0, s.serve.log_text()
    finally:
        s.serve.stop()
        for lab in labs:
            lab.stop()


def sent_copy(folder: Path, needle: str, timeout: float = 10.0) -> tuple[Path, bytes]:
    """The Sent copy whose header block mentions ``needle`` (read headers only: copies are big)."""

    def find() -> tuple[Path, bytes] | None:
        for path in sorted((folder / "cur").glob("*")):
            with path.open("rb") as f:
                head = f.read(256 * 1024).split(b"\n\n", 1)[0]
            if needle.encode() in head:
                return path, head
        return None

    return wait_for(find, timeout, what=f"a Sent copy with {needle}")


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


def test_bcc_recipients_appear_only_in_senders_copy_and_all_are_linked(setup: Setup) -> None:
    mid = f"<{unique('bcc')}@example.test>"
    message = build_message(
        ALICE, ["Bob Customer <bob@customer.test>"], "Quote", message_id=mid, body="Our offer.\n"
    )
    rcpts = ["bob@customer.test", "carol@prospect.test", "dave@customer.test"]
    setup.submit(ALICE, ALICE, rcpts, message)

    path, head = sent_copy(setup.alice_sent, mid)
    headers = parse_headers(head + b"\n\n")
    assert headers["Bcc"] is not None
    assert sorted(a.strip() for a in headers["Bcc"].split(",")) == [
        "carol@prospect.test",
        "dave@customer.test",
    ]
    assert headers["X-Sentlink-Trace"] is not None
    assert path.name.endswith(":2,S")
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (5000, 5000, 0o600)
    assert path.read_bytes().endswith(b"Our offer.\n")
    assert b"\r\n" not in path.read_bytes()

    relayed = setup.postfix.wait_relayed(message_id=mid)
    assert relayed, "the message was not relayed"
    for copy in relayed:
        assert copy.headers["Bcc"] is None
        assert b"X-Sentlink-Trace" not in copy.data

    links = setup.serve.wait_links(mid.strip("<>"), 3)
    by_id = {(row["record"]["kind"], row["record"]["id"]): row for row in links}
    assert set(by_id) == {("contact", "c-bob"), ("contact", "c-dave"), ("lead", "l-carol")}
    assert by_id[("contact", "c-bob")]["role"] == "to"
    assert by_id[("contact", "c-dave")]["role"] == "bcc"
    assert by_id[("lead", "l-carol")]["role"] == "bcc"
    assert all(row["direction"] == "sent" and row["folder"] == "Sent" for row in links)


def test_message_without_message_id_gets_the_same_one_in_copy_and_relayed(setup: Setup) -> None:
    marker = unique("nomid")
    message = build_message(ALICE, ["bob@customer.test"], marker, body="no id\n")
    assert b"Message-ID" not in message and b"Message-Id" not in message
    setup.submit(ALICE, ALICE, ["bob@customer.test"], message)
    _path, head = sent_copy(setup.alice_sent, marker)
    copy_id = parse_headers(head + b"\n\n")["Message-ID"]
    assert copy_id, "the Sent copy has no Message-ID"
    relayed = setup.postfix.wait_relayed(message_id=copy_id)
    assert [r.message_id for r in relayed] == [copy_id]


def test_sent_copy_is_visible_over_imap_as_seen_within_five_seconds(setup: Setup) -> None:
    mid = f"<{unique('imap')}@example.test>"
    message = build_message(ALICE, ["bob@customer.test"], "IMAP check", message_id=mid)
    setup.submit(ALICE, ALICE, ["bob@customer.test"], message)
    submitted = time.monotonic()
    assert setup.lab.dovecot is not None
    with setup.lab.dovecot.imap("alice") as imap:

        def seen_in_sent() -> bytes | None:
            typ, _ = imap.select("Sent", readonly=True)
            assert typ == "OK"
            typ, data = imap.search(None, "HEADER", "Message-ID", mid)
            nums = data[0].split()
            if not nums:
                return None
            typ, flags = imap.fetch(nums[0], "(FLAGS)")
            return flags[0] if isinstance(flags[0], bytes) else None

        flags = wait_for(seen_in_sent, 5.0, interval=0.1, what="the copy over IMAP")
        assert time.monotonic() - submitted < 5.0
        assert b"\\Seen" in flags
        typ, status = imap.status("Sent", "(MESSAGES UNSEEN)")
        assert typ == "OK"
        counts = re.search(rb"MESSAGES (\d+) UNSEEN (\d+)", status[0] or b"")
        assert counts is not None
        assert int(counts.group(1)) >= 1
        assert int(counts.group(2)) == 0
        typ, listing = imap.list('""', "Sent")
        assert typ == "OK" and listing[0] is not None and b"\\Sent" in listing[0]


def test_mailbox_sentlink_cannot_write_still_delivers_and_logs_the_queue_id(setup: Setup) -> None:
    mid = f"<{unique('locked')}@example.test>"
    message = build_message(CAROL, ["bob@customer.test"], "locked", message_id=mid)
    queue_id = setup.submit(CAROL, CAROL, ["bob@customer.test"], message)
    assert setup.postfix.wait_relayed(message_id=mid)
    wait_for(
        lambda: re.search(rf"{queue_id}: capture failed: ", setup.serve.log_text()),
        10.0,
        what="the capture failure in sentlink's log",
    )
    assert not list((setup.workdir.parent / "locked" / "carol").glob(".Sent/cur/*"))


def test_login_sending_as_another_accounts_address_gets_no_copy(setup: Setup) -> None:
    mid = f"<{unique('foreign')}@example.test>"
    message = build_message(CAROL, ["bob@customer.test"], "foreign", message_id=mid)
    # alice's login, carol's address: delivered, but nobody's Sent folder gets it.
    queue_id = setup.submit(ALICE, CAROL, ["bob@customer.test"], message)
    assert setup.postfix.wait_relayed(message_id=mid)
    wait_for(
        lambda: re.search(rf"{queue_id}.*{ALICE}.*{CAROL}", setup.serve.log_text()),
        10.0,
        what="the warning about the foreign sender",
    )
    with pytest.raises(TimeoutError):
        sent_copy(setup.alice_sent, mid, timeout=1.0)


def _mime_parts(n: int) -> bytes:
    parts = [
        f"--b0\nContent-Type: text/plain\nContent-Disposition: attachment; filename=p{i}.txt\n\n"
        f"part {i}\n"
        for i in range(n)
    ]
    return ("".join(parts) + "--b0--\n").encode()


def hostile(kind: str) -> bytes:
    """A hostile message, with LF line ends (the client sends CRLF)."""
    mid = f"<{unique(kind)}@example.test>"
    head = f"From: {ALICE}\nTo: bob@customer.test\nSubject: {kind}\nMessage-ID: {mid}\n".encode()
    if kind == "no-message-id":
        return f"From: {ALICE}\nTo: bob@customer.test\nSubject: {kind}\n\nhi\n".encode()
    if kind == "8bit-garbage-headers":
        garbage = (
            b"Subject2: \xff\xfe\x80 caf\xe9\n"
            b"X-Junk: \x00\x01\x7f\xc3\x28\n"
            b"Cc: \xe9\xe9 <ee@\xff.test>\n"
        )
        return head + garbage + b"\nbody\n"
    if kind == "1000-part-mime":
        mime = b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b0"\n'
        return head + mime + b"\n" + _mime_parts(1000)
    if kind == "100k-header-line":
        return head + b"X-Long: " + b"a" * 100_000 + b"\n\nbody\n"
    if kind == "50mb-body":
        line = b"x" * 76 + b"\n"
        return head + b"\n" + line * (50 * 1024 * 1024 // len(line))
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["no-message-id", "8bit-garbage-headers", "1000-part-mime", "100k-header-line", "50mb-body"],
)
def test_hostile_message_is_delivered_and_filed_or_logged(setup: Setup, kind: str) -> None:
    bcc = f"{unique('h')}@customer.test"  # only the envelope names it: find the copy by its Bcc
    message = hostile(kind)
    queue_id = setup.submit(
        ALICE, ALICE, ["bob@customer.test", bcc], message.replace(b"\n", b"\r\n")
    )

    def relayed() -> bool:
        return any(bcc in r.rcpts for r in setup.postfix.relayed())

    wait_for(relayed, 60.0, what="the hostile message to be relayed")

    def filed_or_logged() -> bool:
        if re.search(rf"{queue_id}: capture failed: ", setup.serve.log_text()):
            return True
        try:
            sent_copy(setup.alice_sent, bcc, timeout=0.1)
        except TimeoutError:
            return False
        return True

    wait_for(filed_or_logged, 30.0, what="a Sent copy or a logged failure")
    # Whatever the linker made of it, the watcher is still linking the next message.
    after = f"<{unique('after')}@example.test>"
    normal = build_message(ALICE, ["bob@customer.test"], "after", message_id=after)
    setup.submit(ALICE, ALICE, ["bob@customer.test"], normal)
    setup.serve.wait_links(after.strip("<>"), 1)


def test_mail_flows_when_the_milter_is_stopped(
    lab_tmp_path: Path, mail_lab_factory: Callable[..., MailLab]
) -> None:
    s = start_setup(lab_tmp_path, mail_lab_factory)
    try:
        first = f"<{unique('up')}@example.test>"
        s.submit(
            ALICE,
            ALICE,
            ["bob@customer.test"],
            build_message(ALICE, ["bob@customer.test"], "up", message_id=first),
        )
        sent_copy(s.alice_sent, first)
        assert s.serve.stop() == 0
        second = f"<{unique('down')}@example.test>"
        s.submit(
            ALICE,
            ALICE,
            ["bob@customer.test"],
            build_message(ALICE, ["bob@customer.test"], "down", message_id=second),
        )
        assert s.postfix.wait_relayed(message_id=second)
        assert re.search(r"milter", s.postfix.maillog_text(), re.IGNORECASE)
        with pytest.raises(TimeoutError):
            sent_copy(s.alice_sent, second, timeout=1.0)
    finally:
        s.serve.stop()
