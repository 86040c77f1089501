"""End to end on a real Sendmail with ``sentlink serve``, wired by the shipped .mc snippet.

The private sendmail.cf is built with Sendmail's own m4 files from a .mc that includes
contrib/sendmail/sentlink.mc as shipped (only its socket path is pointed at the test's), so
these tests cover the snippet's flags, timeouts and macro lists: ``{daemon_name}`` marks the
listener's sessions outbound (``Name=ORIGINATING``), ``{auth_authen}`` ties an SMTP AUTH
session to its login's account, ``i`` is the queue id sentlink logs.
The same checks as the Postfix end-to-end test: Sent copy with the Bcc rebuilt, links, and
mail that keeps flowing when sentlink is down (``F=`` empty).
"""

from __future__ import annotations

import os
import re
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import (
    LabError,
    MailUser,
    build_message,
    make_lab_dir,
    make_maildir,
    parse_headers,
    wait_for,
)
from sendmail_lab import (
    SendmailDist,
    SendmailLab,
    check_namespaces,
    fetch_sendmail,
    sendmail_lab,
)
from sentlink_proc import SentlinkServe, write_csv

pytestmark = pytest.mark.real

ALICE = "alice@example.test"
CAROL = "carol@example.test"
USERS = (MailUser(ALICE, "alice-pw"), MailUser(CAROL, "carol-pw"))


@dataclass
class Setup:
    sendmail: SendmailLab
    serve: SentlinkServe
    workdir: Path
    vmail: Path

    @property
    def alice_sent(self) -> Path:
        return self.vmail / "alice" / ".Sent"


@pytest.fixture(scope="module")
def sendmail_dist() -> SendmailDist:
    try:
        check_namespaces()
        return fetch_sendmail()
    except LabError as exc:
        problem = f"no Sendmail to run: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true forbids skipping: {problem}", pytrace=False)
        pytest.skip(problem)


def write_config(workdir: Path, vmail: Path, socket_path: Path) -> Path:
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
  - name: carol
    addresses: [{CAROL}]
    logins: [{CAROL}]
    maildir: {vmail}/carol
    owner: "5000:5000"
milter:
  listen: "unix:{socket_path}"
  socket_mode: "0660"
  # Sendmail's {{daemon_name}}: DAEMON_OPTIONS(`..., Name=ORIGINATING') on the listener.
  outbound: {{daemon_name: [ORIGINATING], internal_hosts: []}}
watch: {{rescan_seconds: 2}}
"""
    )
    return config


def start_sentlink(lab_dir: Path, socket_path: Path) -> tuple[SentlinkServe, Path, Path]:
    vmail = lab_dir / "vmail"
    vmail.mkdir(mode=0o700)
    os.chown(vmail, 5000, 5000)
    for user in USERS:
        make_maildir(vmail / user.local_part)
    workdir = make_lab_dir(lab_dir, prefix="sentlink-")
    serve = SentlinkServe(write_config(workdir, vmail, socket_path), workdir)
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
    return serve, workdir, vmail


@pytest.fixture(scope="module")
def setup(lab_base: Path, sendmail_dist: SendmailDist) -> Iterator[Setup]:
    lab_dir = make_lab_dir(lab_base, prefix="sm-e2e-")
    socket_path = lab_dir / "milter.sock"
    serve, workdir, vmail = start_sentlink(lab_dir, socket_path)
    try:
        with sendmail_lab(lab_dir, sendmail_dist, socket_path, USERS) as sendmail:
            yield Setup(sendmail, serve, workdir, vmail)
        assert serve.stop() == 0, serve.log_text()
    finally:
        serve.stop()


def sent_copy(folder: Path, needle: str, timeout: float = 10.0) -> tuple[Path, bytes]:
    """The Sent copy whose header block mentions ``needle``."""

    def find() -> tuple[Path, bytes] | None:
        for path in sorted((folder / "cur").glob("*")):
            head = path.read_bytes().split(b"\n\n", 1)[0]
            if needle.encode() in head:
                return path, head
        return None

    return wait_for(find, timeout, what=f"a Sent copy with {needle}")


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


def cf_option(cf: str, name: str) -> list[str]:
    match = re.search(rf"^O {re.escape(name)}=(.*)$", cf, re.MULTILINE)
    assert match is not None, f"no {name} in sendmail.cf"
    return [item.strip() for item in match.group(1).split(",")]


def test_shipped_snippet_gives_sendmail_a_fail_open_milter_with_sentlinks_macros(
    setup: Setup,
) -> None:
    cf = setup.sendmail.cf_file.read_text()
    socket_path = setup.sendmail.milter_socket
    assert re.search(
        rf"^Xsentlink, S=unix:{re.escape(str(socket_path))}, F=, T=C:10s;S:30s;R:30s;E:5m$",
        cf,
        re.MULTILINE,
    )
    assert cf_option(cf, "InputMailFilters") == ["sentlink"]
    assert {"{daemon_name}", "{client_addr}"} <= set(cf_option(cf, "Milter.macros.connect"))
    assert {"i", "{auth_authen}"} <= set(cf_option(cf, "Milter.macros.envfrom"))
    assert "i" in cf_option(cf, "Milter.macros.eom")


def test_bcc_recipients_appear_only_in_senders_copy_and_all_are_linked(setup: Setup) -> None:
    mid = f"<{unique('bcc')}@example.test>"
    message = build_message(
        ALICE, ["Bob Customer <bob@customer.test>"], "Quote", message_id=mid, body="Our offer.\n"
    )
    rcpts = ["bob@customer.test", "carol@prospect.test", "dave@customer.test"]
    queue_id = setup.sendmail.send(ALICE, rcpts, message, login=ALICE, password="alice-pw")

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
    # Sendmail's i macro reached sentlink: its log line carries Sendmail's queue id.
    wait_for(
        lambda: re.search(rf"{queue_id}: captured account=alice ", setup.serve.log_text()),
        10.0,
        what=f"{queue_id} in sentlink's log",
    )

    relayed = setup.sendmail.wait_relayed(message_id=mid)
    for copy in relayed:
        assert sorted(copy.rcpts) == sorted(rcpts)
        assert copy.headers["Bcc"] is None
        assert b"X-Sentlink-Trace" not in copy.data

    links = setup.serve.wait_links(mid.strip("<>"), 3)
    by_id = {(row["record"]["kind"], row["record"]["id"]): row for row in links}
    assert set(by_id) == {("contact", "c-bob"), ("contact", "c-dave"), ("lead", "l-carol")}
    assert by_id[("contact", "c-bob")]["role"] == "to"
    assert by_id[("contact", "c-dave")]["role"] == "bcc"
    assert by_id[("lead", "l-carol")]["role"] == "bcc"
    assert all(row["direction"] == "sent" and row["folder"] == "Sent" for row in links)


def test_message_without_message_id_has_the_same_one_in_copy_and_relayed(setup: Setup) -> None:
    marker = unique("nomid")
    message = build_message(ALICE, ["bob@customer.test"], marker, body="no id\n")
    assert b"Message-ID" not in message and b"Message-Id" not in message
    setup.sendmail.send(ALICE, ["bob@customer.test"], message)
    _path, head = sent_copy(setup.alice_sent, marker)
    copy_id = parse_headers(head + b"\n\n")["Message-ID"]
    assert copy_id, "the Sent copy has no Message-ID"
    relayed = setup.sendmail.wait_relayed(message_id=copy_id)
    assert [r.message_id for r in relayed] == [copy_id]


def test_mail_flows_when_the_milter_is_stopped(
    lab_tmp_path: Path, sendmail_dist: SendmailDist
) -> None:
    socket_path = lab_tmp_path / "milter.sock"
    serve, _workdir, vmail = start_sentlink(lab_tmp_path, socket_path)
    try:
        with sendmail_lab(lab_tmp_path, sendmail_dist, socket_path) as sendmail:
            sent_folder = vmail / "alice" / ".Sent"
            first = f"<{unique('up')}@example.test>"
            message = build_message(ALICE, ["bob@customer.test"], "up", message_id=first)
            sendmail.send(ALICE, ["bob@customer.test"], message)
            sent_copy(sent_folder, first)
            assert serve.stop() == 0
            assert not socket_path.exists()

            second = f"<{unique('down')}@example.test>"
            message = build_message(ALICE, ["bob@customer.test"], "down", message_id=second)
            sendmail.send(ALICE, ["bob@customer.test"], message)
            assert sendmail.wait_relayed(message_id=second)
            with pytest.raises(TimeoutError):
                sent_copy(sent_folder, second, timeout=1.0)
    finally:
        serve.stop()


def test_login_sending_as_another_accounts_address_gets_no_copy(setup: Setup) -> None:
    mid = f"<{unique('foreign')}@example.test>"
    message = build_message(CAROL, ["bob@customer.test"], "foreign", message_id=mid)
    # Sendmail's {auth_authen} says alice; MAIL FROM says carol: relayed, but nobody's Sent
    # folder gets it (without the login, the listener's name would file it as carol's).
    queue_id = setup.sendmail.send(
        CAROL, ["bob@customer.test"], message, login=ALICE, password="alice-pw"
    )
    assert setup.sendmail.wait_relayed(message_id=mid)
    wait_for(
        lambda: re.search(rf"{queue_id}: login {ALICE} sent as {CAROL}", setup.serve.log_text()),
        10.0,
        what="the warning about the foreign sender",
    )
    for user in USERS:
        with pytest.raises(TimeoutError):
            sent_copy(setup.vmail / user.local_part / ".Sent", mid, timeout=0.5)
