"""``/metrics`` of a running ``sentlink serve`` behind a real Postfix: counters move with mail."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from lab import MailLab, build_message, free_port, make_lab_dir, wait_for
from sentlink_proc import SentlinkServe
from test_e2e_postfix import ALICE, Setup, sent_copy, unique, write_config

pytestmark = pytest.mark.real


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_count_captured_mail_and_report_components(
    lab_tmp_path: Path, mail_lab_factory: Callable[..., MailLab]
) -> None:
    socket_path = lab_tmp_path / "milter.sock"
    lab = mail_lab_factory(root=make_lab_dir(lab_tmp_path), milter=f"unix:{socket_path}")
    workdir = make_lab_dir(lab_tmp_path, prefix="sentlink-")
    config = write_config(workdir, lab.postfix.vmail, socket_path)
    port = free_port()
    config.write_text(config.read_text() + f'metrics: {{listen: "127.0.0.1:{port}"}}\n')
    serve = SentlinkServe(config, workdir)
    serve.start(socket_path)
    try:
        wait_for(lambda: scrape(port, "/ready")[0] == 200, 10.0, what="/ready")
        assert scrape(port, "/healthy")[0] == 200
        _, before = scrape(port)
        assert 'sentlink_up{component="milter"} 1' in before
        assert 'sentlink_up{component="watcher"} 1' in before
        s = Setup(lab, serve, workdir)
        for _ in range(3):
            mid = f"<{unique('metrics')}@example.test>"
            s.submit(
                ALICE,
                ALICE,
                ["bob@customer.test"],
                build_message(ALICE, ["bob@customer.test"], "m", message_id=mid),
            )
            sent_copy(s.alice_sent, mid)
        _, after = scrape(port)
        assert (
            value(after, "sentlink_captured_total") - value(before, "sentlink_captured_total") == 3
        )
        assert value(after, "sentlink_milter_eom_seconds_count") >= 3
        # The watcher runs in serve's child process and publishes its state every few seconds.
        wait_for(
            lambda: value(scrape(port)[1], "sentlink_rescans_total") >= 1, 15.0, what="a rescan"
        )
        # No CRM records here: the three copies are handled as skipped (no-match).
        handled = 'sentlink_watch_messages_total{status="skipped"}'
        wait_for(lambda: value(scrape(port)[1], handled) >= 3, 15.0, what="3 handled messages")
        assert "# TYPE sentlink_milter_eom_seconds histogram" in after
    finally:
        assert serve.stop() == 0
