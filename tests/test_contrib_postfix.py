"""contrib/postfix applied as shipped to a real Postfix; `sentlink postfix-config` agrees."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from lab import MailLab, build_message, make_lab_dir
from sentlink.config import load_config_text
from sentlink.postfix_config import postfix_lines
from sentlink_proc import SentlinkServe
from test_e2e_postfix import ALICE, Setup, sent_copy, unique, write_config

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "postfix"


def main_cf_settings() -> dict[str, str]:
    settings = {}
    for line in (CONTRIB / "main.cf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            settings[name.strip()] = value.strip()
    return settings


def master_cf_options() -> dict[str, str]:
    options = {}
    for line in (CONTRIB / "master.cf").read_text().splitlines():
        match = re.fullmatch(r"\s+-o\s+([a-z_]+)=(.*)", line)
        if match:
            options[match.group(1)] = match.group(2)
    return options


def test_postfix_config_prints_the_shipped_lines_for_the_documented_config() -> None:
    config = load_config_text(
        'milter: {listen: "unix:/var/spool/postfix/sentlink/milter.sock", socket_group: postfix}\n',
        "prod.yaml",
    )
    assert config.milter is not None
    lines = postfix_lines(config.milter, Path("/var/spool/postfix"))
    assert lines.warnings == ()
    shipped_main = [f"{k} = {v}" for k, v in main_cf_settings().items()]
    assert list(lines.main_cf) == shipped_main
    shipped_master = [f"  -o {k}={v}" for k, v in master_cf_options().items()]
    assert list(lines.master_cf) == shipped_master


def test_socket_outside_the_queue_directory_gets_a_chroot_warning() -> None:
    config = load_config_text('milter: {listen: "unix:/run/sentlink/m.sock"}\n', "x.yaml")
    assert config.milter is not None
    lines = postfix_lines(config.milter, Path("/var/spool/postfix"))
    assert (
        lines.main_cf[0] == "sentlink_milter = { unix:/run/sentlink/m.sock, default_action=accept }"
    )
    assert any("chroot" in w for w in lines.warnings)
    tcp = load_config_text('milter: {listen: "inet:8891@127.0.0.1"}\n', "x.yaml")
    assert tcp.milter is not None
    assert "inet:127.0.0.1:8891" in postfix_lines(tcp.milter, Path("/q")).main_cf[0]


@pytest.mark.real
def test_shipped_postfix_snippets_wire_a_real_postfix_to_sentlink(
    lab_tmp_path: Path, mail_lab_factory: Callable[..., MailLab]
) -> None:
    root = make_lab_dir(lab_tmp_path)
    main = main_cf_settings()
    # Only the submission listener gets the milter (master.cf options); port 25 does not.
    lab = mail_lab_factory(root=root, extra_main_cf=main, submission_options=master_cf_options())
    queue = lab.postfix.queue_dir
    socket_path = queue / "sentlink" / "milter.sock"
    socket_path.parent.mkdir()
    workdir = make_lab_dir(lab_tmp_path, prefix="sentlink-")
    config = write_config(workdir, lab.postfix.vmail, socket_path)
    serve = SentlinkServe(config, workdir)
    serve.start(socket_path)
    try:
        s = Setup(lab, serve, workdir)
        mid = f"<{unique('contrib')}@example.test>"
        msg = build_message(ALICE, ["bob@customer.test"], "contrib", message_id=mid)
        s.submit(ALICE, ALICE, ["bob@customer.test", "hidden@customer.test"], msg)
        _path, head = sent_copy(s.alice_sent, mid)
        assert b"Bcc: hidden@customer.test" in head
        # Port 25 has no milter in this wiring: no copy for mail received there.
        other = f"<{unique('port25')}@example.test>"
        lab.postfix.send(
            ALICE,
            ["bob@customer.test"],
            build_message(ALICE, ["bob@customer.test"], "p25", message_id=other),
        )
        assert lab.postfix.wait_relayed(message_id=other)
        with pytest.raises(TimeoutError):
            sent_copy(s.alice_sent, other, timeout=1.0)
    finally:
        assert serve.stop() == 0
