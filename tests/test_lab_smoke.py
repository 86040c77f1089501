"""The lab itself: real Postfix and Dovecot instances behave as the end-to-end tests assume."""

from __future__ import annotations

import os
import poplib
import smtplib
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from lab import (
    DovecotLab,
    MailLab,
    PostfixLab,
    build_message,
    descendants,
    pid_alive,
    pids_with_environment,
    wait_for,
)

# A throwaway pymilter milter (libmilter keeps global state: one milter per process).
HEADER_MILTER = """
import sys, Milter
class M(Milter.Base):
    def eom(self):
        self.addheader("X-Lab-Milter", "daemon_name=%s" % self.getsymval("{daemon_name}"))
        return Milter.ACCEPT
Milter.factory = M
Milter.set_flags(Milter.ADDHDRS)
Milter.runmilter("labmilter", sys.argv[1], 60)
"""


def new_message_id() -> str:
    return f"<{uuid.uuid4().hex}@example.test>"


def test_wait_for_returns_the_first_truthy_value_and_names_what_timed_out() -> None:
    values = iter([0, None, "ready"])
    assert wait_for(lambda: next(values), timeout=5.0, interval=0.001) == "ready"
    with pytest.raises(TimeoutError, match="the impossible"):
        wait_for(lambda: False, timeout=0.05, interval=0.01, what="the impossible")


@pytest.mark.real
def test_local_recipient_gets_maildir_copy_and_outside_recipients_reach_the_sink(
    postfix_lab: PostfixLab,
) -> None:
    message_id = new_message_id()
    message = build_message(
        "alice@example.test", ["bob@example.test", "dave@remote.test"], message_id=message_id
    )
    envelope = ["bob@example.test", "dave@remote.test", "hidden@customer.test"]

    queue_id = postfix_lab.send("alice@example.test", envelope, message)

    delivered = postfix_lab.wait_message("bob", message_id)
    assert b"Subject: lab test" in delivered
    assert f"id {queue_id}".encode() in delivered  # Postfix's own Received: header
    (relayed,) = postfix_lab.wait_relayed(message_id)
    assert relayed.mail_from == "alice@example.test"
    assert sorted(relayed.rcpts) == ["dave@remote.test", "hidden@customer.test"]
    assert relayed.headers["Subject"] == "lab test"
    assert relayed.data.endswith(b"\n\nHello from the lab.\n")
    postfix_lab.wait_queue_empty()


@pytest.mark.real
def test_unknown_local_recipient_is_refused(postfix_lab: PostfixLab) -> None:
    message = build_message("alice@example.test", ["nobody@example.test"])
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        postfix_lab.send("alice@example.test", ["nobody@example.test"], message)
    assert refused.value.recipients["nobody@example.test"][0] == 550


@pytest.mark.real
def test_xclient_client_outside_mynetworks_may_deliver_locally_but_not_relay(
    postfix_lab: PostfixLab,
) -> None:
    outside = {"ADDR": "203.0.113.9", "NAME": "[UNAVAILABLE]"}
    message_id = new_message_id()
    message = build_message("eve@remote.test", ["alice@example.test"], message_id=message_id)

    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        postfix_lab.send("eve@remote.test", ["dave@remote.test"], message, xclient=outside)
    postfix_lab.send("eve@remote.test", ["alice@example.test"], message, xclient=outside)

    assert refused.value.recipients["dave@remote.test"][0] == 554
    delivered = postfix_lab.wait_message("alice", message_id)
    assert b"[203.0.113.9]" in delivered  # Postfix's Received: names the XCLIENT address


@pytest.mark.real
def test_submission_accepts_sasl_login_of_a_dovecot_user(postfix_lab: PostfixLab) -> None:
    message_id = new_message_id()
    message = build_message("alice@example.test", ["dave@remote.test"], message_id=message_id)

    queue_id = postfix_lab.send(
        "alice@example.test",
        ["dave@remote.test"],
        message,
        port=postfix_lab.submission_port,
        login="alice@example.test",
        password="alice-pw",
    )

    postfix_lab.wait_relayed(message_id)
    postfix_lab.wait_maillog(
        rf"postfix/submission/smtpd\[\d+\]: {queue_id}: .*sasl_username=alice@example\.test"
    )


@pytest.mark.real
def test_submission_rejects_a_wrong_password_with_535(postfix_lab: PostfixLab) -> None:
    message = build_message("alice@example.test", ["dave@remote.test"])
    with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
        postfix_lab.send(
            "alice@example.test",
            ["dave@remote.test"],
            message,
            port=postfix_lab.submission_port,
            login="alice@example.test",
            password="wrong",
        )
    assert failed.value.smtp_code == 535


@pytest.mark.real
def test_imap_login_sees_delivered_message_in_inbox_and_a_sent_mailbox(
    postfix_lab: PostfixLab, dovecot_lab: DovecotLab
) -> None:
    message_id = new_message_id()
    message = build_message("alice@example.test", ["carol@example.test"], message_id=message_id)
    postfix_lab.send("alice@example.test", ["carol@example.test"], message)
    postfix_lab.wait_message("carol", message_id)

    with dovecot_lab.imap("carol") as imap:
        _, folders = imap.list()
        status, _ = imap.select("INBOX", readonly=True)
        _, found = imap.search(None, "HEADER", "Message-ID", message_id)

    assert status == "OK"
    assert found[0].split(), "message not found over IMAP"
    assert any(
        isinstance(line, bytes) and b"\\Sent" in line and line.endswith(b" Sent")
        for line in folders
    )


@pytest.mark.real
def test_pop3_login_lists_the_inbox(postfix_lab: PostfixLab, dovecot_lab: DovecotLab) -> None:
    message_id = new_message_id()
    message = build_message("alice@example.test", ["bob@example.test"], message_id=message_id)
    postfix_lab.send("alice@example.test", ["bob@example.test"], message)
    postfix_lab.wait_message("bob", message_id)

    pop = poplib.POP3("127.0.0.1", dovecot_lab.pop3_port, timeout=30)
    try:
        pop.user("bob@example.test")
        pop.pass_("bob-pw")
        count, _ = pop.stat()
    finally:
        pop.quit()

    assert count >= 1


@pytest.mark.real
def test_dead_milter_socket_still_lets_mail_through(
    mail_lab_factory: Callable[..., MailLab],
) -> None:
    lab = mail_lab_factory(
        milter="unix:/nonexistent/milter.sock", sasl=False, dovecot_enabled=False
    )
    smtp_id, local_id = new_message_id(), new_message_id()

    lab.postfix.send(
        "bob@remote.test",
        ["alice@example.test"],
        build_message("bob@remote.test", ["alice@example.test"], message_id=smtp_id),
    )
    lab.postfix.sendmail(  # pickup -> cleanup: the non_smtpd_milters path
        "alice@example.test",
        ["alice@example.test"],
        build_message("alice@example.test", ["alice@example.test"], message_id=local_id),
    )

    lab.postfix.wait_message("alice", smtp_id)
    lab.postfix.wait_message("alice", local_id)
    lab.postfix.wait_maillog(r"connect to Milter service unix:/nonexistent/milter\.sock")


@pytest.mark.real
def test_stopping_a_lab_leaves_no_server_process_behind(
    mail_lab_factory: Callable[..., MailLab],
) -> None:
    lab = mail_lab_factory()
    assert lab.dovecot is not None
    lab.postfix.send(  # leaves smtpd connected to Dovecot's auth service
        "alice@example.test",
        ["dave@remote.test"],
        build_message("alice@example.test", ["dave@remote.test"]),
        port=lab.postfix.submission_port,
        login="alice@example.test",
        password="alice-pw",
    )
    postfix_master, dovecot_master = lab.postfix.master_pid(), lab.dovecot.master_pid()
    assert postfix_master is not None and dovecot_master is not None
    servers = {postfix_master, dovecot_master}
    servers |= descendants(postfix_master) | descendants(dovecot_master)

    lab.stop()

    assert [pid for pid in servers if pid_alive(pid)] == []
    assert pids_with_environment("MAIL_CONFIG", str(lab.postfix.config_dir)) == set()
    assert not lab.postfix.sink.is_running()


@pytest.mark.real
def test_live_milter_on_a_unix_socket_sees_submission_as_originating(
    lab_tmp_path: Path, mail_lab_factory: Callable[..., MailLab]
) -> None:
    # Not "milter.py": a script of that name would shadow pymilter's C module "milter".
    script, socket_path = lab_tmp_path / "header_filter.py", lab_tmp_path / "filter.sock"
    script.write_text(HEADER_MILTER, encoding="utf-8")
    milter = subprocess.Popen([sys.executable, str(script), f"unix:{socket_path}"])
    try:
        wait_for(
            lambda: socket_path.exists() or milter.poll() is not None,
            timeout=10.0,
            what="the milter socket",
        )
        assert milter.poll() is None, "the milter exited"
        os.chmod(socket_path, 0o666)  # smtpd and cleanup connect as the postfix user
        lab = mail_lab_factory(milter=f"unix:{socket_path}", sasl=False, dovecot_enabled=False)
        message_id = new_message_id()
        lab.postfix.send(
            "alice@example.test",
            ["dave@remote.test"],
            build_message("alice@example.test", ["dave@remote.test"], message_id=message_id),
            port=lab.postfix.submission_port,
        )
        (relayed,) = lab.postfix.wait_relayed(message_id)
    finally:
        milter.kill()  # stateless; libmilter takes seconds to honour SIGTERM
        milter.wait(timeout=10.0)

    assert relayed.headers["X-Lab-Milter"] == "daemon_name=ORIGINATING"
