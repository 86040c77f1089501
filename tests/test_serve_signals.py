"""``sentlink serve`` under signals, with a real Postfix: SIGHUP reloads, SIGTERM drains."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lab import MailLab, build_message, wait_for
from test_e2e_postfix import ALICE, Setup, sent_copy, start_setup, unique

pytestmark = pytest.mark.real

BOB = "bob@example.test"
BOB_ACCOUNT = f"""\
  - name: bob
    addresses: [{BOB}]
    logins: [{BOB}]
    maildir: {{vmail}}/bob
    owner: "5000:5000"
"""


def add_account(setup: Setup) -> None:
    text = setup.serve.config.read_text()
    extra = BOB_ACCOUNT.format(vmail=setup.postfix.vmail)
    setup.serve.config.write_text(text.replace("milter:\n", extra + "milter:\n", 1))


def hup(setup: Setup) -> None:
    assert setup.serve.proc is not None
    setup.serve.proc.send_signal(signal.SIGHUP)


def wait_log(setup: Setup, pattern: str, after: int = 0) -> None:
    wait_for(
        lambda: re.search(pattern, setup.serve.log_text()[after:]),
        10.0,
        what=f"{pattern!r} in sentlink's log",
    )


def test_sighup_refuses_a_bad_config_and_applies_a_good_one_without_losing_mail(
    lab_tmp_path: Path, mail_lab_factory: Callable[..., MailLab]
) -> None:
    s = start_setup(lab_tmp_path, mail_lab_factory)
    sent: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def load() -> None:
        # Mail keeps flowing through every reload below.
        try:
            while not done.is_set():
                mid = f"<{unique('load')}@example.test>"
                s.submit(
                    ALICE,
                    ALICE,
                    ["bob@customer.test"],
                    build_message(ALICE, ["bob@customer.test"], "load", message_id=mid),
                )
                sent.append(mid)
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=load, name="load")
    sender.start()
    try:
        good = s.serve.config.read_text()
        mark = len(s.serve.log_text())
        s.serve.config.write_text(good + "watch: {rescan_seconds: soon}\nbogus_key: 1\n")
        hup(s)
        wait_log(s, r"reload refused: .*sentlink\.yaml:\d+:\d+: ", mark)
        wait_log(s, r"keeping the running one", mark)
        assert s.serve.proc is not None and s.serve.proc.poll() is None

        s.serve.config.write_text(good)
        add_account(s)
        mark = len(s.serve.log_text())
        hup(s)
        wait_log(s, r"configuration reloaded; accounts=2", mark)
        wait_for(lambda: len(sent) >= 5, 20.0, what="some messages under load")
    finally:
        done.set()
        sender.join(30)
    assert not errors, errors

    # The new account works at once: its copy is filed and linked.
    mid = f"<{unique('bob')}@example.test>"
    s.submit(
        BOB,
        BOB,
        ["dave@customer.test"],
        build_message(BOB, ["dave@customer.test"], "from bob", message_id=mid),
    )
    sent_copy(s.postfix.mailbox("bob") / ".Sent", mid)
    [link] = s.serve.wait_links(mid.strip("<>"), 1)
    assert link["account"] == "bob" and link["record"]["id"] == "c-dave"

    # Nothing sent under load was lost or blocked: each one relayed and filed exactly once.
    for mid in sent:
        assert s.postfix.wait_relayed(message_id=mid)

    def filed() -> bool:
        names = [p.read_bytes() for p in (s.alice_sent / "cur").iterdir()]
        return all(sum(m.encode() in data for data in names) == 1 for m in sent)

    wait_for(filed, 20.0, what="one Sent copy per message sent under load")
    assert s.serve.stop() == 0


def test_sigterm_stops_serve_promptly_with_exit_0_and_removes_the_socket(
    lab_tmp_path: Path, mail_lab_factory: Callable[..., MailLab]
) -> None:
    s = start_setup(lab_tmp_path, mail_lab_factory)
    mid = f"<{unique('term')}@example.test>"
    s.submit(
        ALICE,
        ALICE,
        ["bob@customer.test"],
        build_message(ALICE, ["bob@customer.test"], "before stop", message_id=mid),
    )
    sent_copy(s.alice_sent, mid)
    started = time.monotonic()
    assert s.serve.stop() == 0
    assert time.monotonic() - started < 20
    assert not (lab_tmp_path / "milter.sock").exists()
    assert "SIGTERM: stopping" in s.serve.log_text()


def test_sigterm_lets_an_smtp_session_in_flight_finish_its_message(
    lab_tmp_path: Path, mail_lab_factory: Callable[..., MailLab]
) -> None:
    import smtplib

    s = start_setup(lab_tmp_path, mail_lab_factory)
    mid = f"<{unique('drain')}@example.test>"
    message = build_message(ALICE, ["bob@customer.test"], "in flight", message_id=mid)
    password = next(u.password for u in s.postfix.users if u.address == ALICE)
    with smtplib.SMTP("127.0.0.1", s.postfix.submission_port, timeout=30) as smtp:
        smtp.login(ALICE, password)
        smtp.mail(ALICE)
        smtp.rcpt("bob@customer.test")
        smtp.rcpt("hidden@customer.test")
        # The session (and its milter connection) is open when SIGTERM arrives.
        assert s.serve.proc is not None
        s.serve.proc.send_signal(signal.SIGTERM)
        wait_log(s, r"SIGTERM: stopping")
        code, _ = smtp.data(message)
        assert code == 250
    _path, head = sent_copy(s.alice_sent, mid)
    assert b"Bcc: hidden@customer.test" in head
    assert s.serve.stop() == 0
    assert not (lab_tmp_path / "milter.sock").exists()
