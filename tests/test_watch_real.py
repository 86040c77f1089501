"""The INBOX watcher against real components: Postfix + milter, Dovecot IMAP/POP3, fetchmail,
getmail6, and ``sentlink serve`` as a subprocess.

Accounts: ``alice`` is a Dovecot mailbox (Postfix delivers, Dovecot serves IMAP, the milter files
Sent copies). ``bob-pop`` and ``carol-pop`` are local Maildirs filled by fetchmail and getmail6
from the Dovecot POP3 mailboxes of bob@ and carol@example.test, standing in for an outside
provider.
"""

from __future__ import annotations

import imaplib
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import (
    VMAIL_GID,
    VMAIL_UID,
    MailLab,
    build_message,
    maildir_files,
    make_lab_dir,
    make_maildir,
    wait_for,
)
from sentlink_proc import SentlinkServe, write_csv

pytestmark = pytest.mark.real

ALICE = "alice@example.test"
BOB = "bob@example.test"
CAROL = "carol@example.test"
DAVE = "dave@customer.test"

MDA = """\
import os, socket, sys, time
root = sys.argv[1]
data = sys.stdin.buffer.read()
name = f"{time.time_ns()}.P{os.getpid()}.{socket.gethostname()}"
tmp = os.path.join(root, "tmp", name)
with open(tmp, "wb") as f:
    f.write(data)
    os.fsync(f.fileno())
os.chown(tmp, int(sys.argv[2]), int(sys.argv[3]))
os.rename(tmp, os.path.join(root, "new", name))
"""


@dataclass
class Setup:
    lab: MailLab
    serve: SentlinkServe
    workdir: Path
    local: Path

    def submit(self, message: bytes, rcpts: list[str]) -> str:
        return self.lab.postfix.send(
            ALICE,
            rcpts,
            message,
            port=self.lab.postfix.submission_port,
            login=ALICE,
            password="alice-pw",
        )

    def provider_drop(self, user: str, message: bytes) -> None:
        """A message in the provider's mailbox (what POP3 will hand out)."""
        new = self.lab.postfix.mailbox(user) / "new"
        name = f"{time.time_ns()}.M1P{os.getpid()}.provider"
        (new.parent / "tmp" / name).write_bytes(message)
        os.chown(new.parent / "tmp" / name, VMAIL_UID, VMAIL_GID)
        os.rename(new.parent / "tmp" / name, new / name)


def config_text(workdir: Path, vmail: Path, socket_path: Path, local: Path) -> str:
    return f"""\
site_secret_file: {workdir}/site.secret
store: {{url: "sqlite:///{workdir}/sentlink.db"}}
internal_domains: [example.test]
accounts:
  - name: alice
    addresses: [{ALICE}]
    logins: [{ALICE}]
    maildir: {vmail}/alice
    owner: "{VMAIL_UID}:{VMAIL_GID}"
  - name: bob-pop
    addresses: [{BOB}]
    maildir: {local}/bob
    owner: "{VMAIL_UID}:{VMAIL_GID}"
  - name: carol-pop
    addresses: [{CAROL}]
    maildir: {local}/carol
    owner: nobody
milter:
  listen: "unix:{socket_path}"
  socket_mode: "0666"
watch: {{rescan_seconds: 30}}
"""


@pytest.fixture(scope="module")
def setup(lab_base: Path) -> Iterator[Setup]:
    lab_dir = make_lab_dir(lab_base, prefix="watch-")
    socket_path = lab_dir / "milter.sock"
    lab = MailLab(make_lab_dir(lab_dir), milter=f"unix:{socket_path}")
    lab.start()
    serve: SentlinkServe | None = None
    try:
        for user in ("alice", "bob", "carol"):
            make_maildir(lab.postfix.mailbox(user), ["Sent"])
        workdir = make_lab_dir(lab_dir, prefix="sentlink-")
        local = make_lab_dir(lab_dir, prefix="local-")
        make_maildir(local / "bob")
        nobody = pwd.getpwnam("nobody")
        make_maildir(local / "carol", uid=nobody.pw_uid, gid=nobody.pw_gid)
        config = workdir / "sentlink.yaml"
        config.write_text(config_text(workdir, lab.postfix.vmail, socket_path, local))
        serve = SentlinkServe(config, workdir)
        contacts = write_csv(
            workdir / "contacts.csv",
            [("contact", "c-bob", "Bob", "bob@customer.test"), ("contact", "c-dave", "Dave", DAVE)],
        )
        assert serve.run("crm", "import", str(contacts)).returncode == 0
        serve.start(socket_path)
        s = Setup(lab, serve, workdir, local)
        yield s
        assert serve.stop() == 0, serve.log_text()[-3000:]
    finally:
        if serve is not None:
            serve.stop()
        lab.stop()


def unique(tag: str) -> str:
    return f"<{tag}-{uuid.uuid4().hex[:10]}@example.test>"


def provider_batch(setup: Setup, user: str) -> dict[str, str]:
    """Three messages in the provider mailbox: self-sent, received, note to self."""
    address = f"{user}@example.test"
    ids = {"self": unique("self"), "received": unique("recv"), "note": unique("note")}
    setup.provider_drop(
        user, build_message(address, [DAVE], "sent from webmail", message_id=ids["self"])
    )
    setup.provider_drop(
        user, build_message(DAVE, [address], "a question", message_id=ids["received"])
    )
    setup.provider_drop(user, build_message(address, [address], "todo", message_id=ids["note"]))
    return ids


def ids_in(maildir: Path, folder: str) -> set[str]:
    found = set()
    for path in maildir_files(maildir, folder):
        match = re.search(rb"(?im)^Message-ID:\s*(<[^>]+>)", path.read_bytes())
        if match:
            found.add(match.group(1).decode())
    return found


def assert_sorted_and_linked(setup: Setup, maildir: Path, ids: dict[str, str]) -> None:
    wait_for(
        lambda: (
            ids_in(maildir, "Sent") == {ids["self"]}
            and ids_in(maildir, "INBOX") == {ids["received"], ids["note"]}
        ),
        15.0,
        what="self-sent mail in Sent, the rest in INBOX",
    )
    assert all(p.name.endswith(":2,S") for p in maildir_files(maildir, "Sent"))
    received = setup.serve.wait_links(ids["received"].strip("<>"), 1)
    assert [(r["direction"], r["role"], r["folder"], r["record"]["id"]) for r in received] == [
        ("received", "from", "INBOX", "c-dave")
    ]
    sent = setup.serve.wait_links(ids["self"].strip("<>"), 1)
    assert [(r["direction"], r["role"], r["folder"]) for r in sent] == [("sent", "to", "Sent")]


def test_fetchmail_pop3_mail_is_sorted_self_sent_to_sent_and_received_linked(
    setup: Setup,
) -> None:
    ids = provider_batch(setup, "bob")
    home = make_lab_dir(setup.workdir, prefix="fetchmail-")
    mda = setup.workdir / "mda.py"
    mda.write_text(MDA)
    rc = home / "fetchmailrc"
    assert setup.lab.dovecot is not None
    rc.write_text(
        f"""set no bouncemail
set no syslog
poll 127.0.0.1 service {setup.lab.dovecot.pop3_port} protocol pop3 auth password timeout 30
  user "{BOB}" there with password "bob-pw" is root here
  sslproto ''  # the lab's Dovecot has no TLS (fetchmail 6.4 insists otherwise)
  mda "{sys.executable} {mda} {setup.local}/bob {VMAIL_UID} {VMAIL_GID}"
"""
    )
    rc.chmod(0o600)
    result = subprocess.run(
        ["fetchmail", "-f", str(rc), "--nodetach"],
        env={**os.environ, "FETCHMAILHOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    # fetchmail's exit code does not tell whether the MDA worked: the Maildir does.
    assert "3 messages" in result.stdout + result.stderr, result.stdout + result.stderr
    assert_sorted_and_linked(setup, setup.local / "bob", ids)


def test_getmail_pop3_mail_is_sorted_self_sent_to_sent_and_received_linked(
    setup: Setup,
) -> None:
    getmail = shutil.which("getmail")
    assert getmail is not None, "getmail6 is not installed"
    ids = provider_batch(setup, "carol")
    home = make_lab_dir(setup.workdir, prefix="getmail-")
    assert setup.lab.dovecot is not None
    (home / "getmailrc").write_text(
        f"""[retriever]
type = SimplePOP3Retriever
server = 127.0.0.1
port = {setup.lab.dovecot.pop3_port}
username = {CAROL}
password = carol-pw

[destination]
type = Maildir
path = {setup.local}/carol/
user = nobody

[options]
delete = true
read_all = true
"""
    )
    result = subprocess.run(
        [getmail, "--getmaildir", str(home), "--rcfile", str(home / "getmailrc")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert_sorted_and_linked(setup, setup.local / "carol", ids)


def visible_in_sent(imap: imaplib.IMAP4, mid: str) -> tuple[int, int]:
    """(copies not flagged \\Deleted, all copies) of ``mid`` in Sent."""
    typ, _ = imap.select("Sent")
    assert typ == "OK"
    _, undeleted = imap.search(None, "UNDELETED", "HEADER", "Message-ID", mid)
    _, every = imap.search(None, "HEADER", "Message-ID", mid)
    return len(undeleted[0].split()), len(every[0].split())


def test_imap_saved_copy_of_a_captured_message_leaves_one_visible_copy(setup: Setup) -> None:
    mid = unique("append")
    message = build_message(ALICE, ["bob@customer.test"], "Offer", message_id=mid, body="Deal.\n")
    setup.submit(message, ["bob@customer.test", DAVE])
    setup.serve.wait_links(mid.strip("<>"), 2)  # the capture copy (with the Bcc) is indexed
    assert setup.lab.dovecot is not None
    with setup.lab.dovecot.imap("alice") as imap:
        assert visible_in_sent(imap, mid) == (1, 1)
        # The client saves its own copy, as Thunderbird does after sending.
        typ, _ = imap.append("Sent", "(\\Seen)", None, message)
        assert typ == "OK"
        wait_for(lambda: visible_in_sent(imap, mid) == (1, 1), 10.0, what="one copy left")
        _, nums = imap.search(None, "HEADER", "Message-ID", mid)
        _, data = imap.fetch(nums[0].split()[0], "(BODY.PEEK[HEADER])")
        header = data[0][1] if isinstance(data[0], tuple) else b""
        assert b"X-Sentlink-Trace" not in header  # keep: client -> the client's copy stays
        # A different message reusing that Message-ID is not a duplicate: both stay visible.
        other = build_message(ALICE, ["bob@customer.test"], "Other", message_id=mid, body="No.\n")
        typ, _ = imap.append("Sent", "(\\Seen)", None, other)
        assert typ == "OK"
        wait_for(
            lambda: "reused with a different body: all copies kept" in setup.serve.log_text(),
            10.0,
            what="the reused Message-ID to be handled",
        )
        assert visible_in_sent(imap, mid) == (2, 2)
    assert "corrupt" not in setup.lab.dovecot.log_text().lower()


def test_dovecot_sees_a_moved_self_sent_message_in_sent_and_not_inbox(setup: Setup) -> None:
    assert setup.lab.dovecot is not None
    mid = unique("selfbcc")
    with setup.lab.dovecot.imap("alice") as imap:
        for folder in ("INBOX", "Sent"):  # Dovecot has its indexes built before the move
            assert imap.select(folder)[0] == "OK"
        # A self-Bcc copy arriving from outside (no milter capture on the plain port).
        message = build_message(ALICE, ["bob@customer.test"], "self bcc", message_id=mid)
        setup.lab.postfix.send(ALICE, [ALICE], message)
        delivered = time.monotonic()

        def where() -> tuple[bool, bool]:
            imap.select("INBOX")
            _, inbox = imap.search(None, "HEADER", "Message-ID", mid)
            imap.select("Sent")
            _, sent = imap.search(None, "HEADER", "Message-ID", mid)
            return bool(inbox[0].split()), bool(sent[0].split())

        wait_for(lambda: where() == (False, True), 5.0, interval=0.1, what="the move over IMAP")
        assert time.monotonic() - delivered < 5.0
        _, nums = imap.search(None, "HEADER", "Message-ID", mid)
        _, data = imap.fetch(nums[0].split()[0], "(FLAGS RFC822)")
        assert isinstance(data[0], tuple) and b"\\Seen" in data[0][0]
        assert data[0][1].replace(b"\r\n", b"\n").endswith(b"Hello from the lab.\n")
    log = setup.lab.dovecot.log_text().lower()
    assert "corrupt" not in log and "panic" not in log
