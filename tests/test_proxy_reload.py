"""SIGHUP reaches the proxy: new accounts and upstreams apply without dropping the listener."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from lab import LOOPBACK, SmtpSink, build_message, wait_for
from proxy_fixtures import proxy_config
from sentlink.capture import Counters
from sentlink.config import load_config_text
from sentlink.proxy.server import Reloads, run_proxy

pytestmark = pytest.mark.real

BOB = "bob@example.test"


def test_reload_adds_an_account_to_the_running_proxy(lab_tmp_path: Path) -> None:
    sink = SmtpSink(lab_tmp_path / "sink")
    sink.start()
    upstream = f"{{host: {LOOPBACK}, port: {sink.port}, tls: none, auth: none}}"
    text = proxy_config(
        lab_tmp_path, lab_tmp_path / "alice", upstream=upstream,
        internal_hosts=["127.0.0.0/8"], owner="null",
    )  # fmt: skip
    config = load_config_text(text, "proxy.yaml")
    assert config.proxy is not None
    port = int(config.proxy.listen.rpartition(":")[2])
    stop, ready, reloads = threading.Event(), threading.Event(), Reloads()
    thread = threading.Thread(
        target=run_proxy,
        args=(config, stop),
        kwargs={
            "secret": b"s" * 32,
            "counters": Counters(),
            "ready": ready.set,
            "reloads": reloads,
        },
    )
    thread.start()
    try:
        assert ready.wait(10)
        import smtplib

        def send(mid: str) -> None:
            with smtplib.SMTP(LOOPBACK, port, timeout=30) as smtp:
                smtp.sendmail(
                    BOB,
                    ["carol@remote.test"],
                    build_message(BOB, ["carol@remote.test"], "hi", message_id=mid),
                )

        send("<before-reload@example.test>")  # bob is nobody's: relayed, no copy
        assert not (lab_tmp_path / "bob").exists()
        with_bob = text.replace(
            "proxy:",
            f"  - name: bob\n    addresses: [{BOB}]\n    maildir: {lab_tmp_path}/bob\nproxy:",
            1,
        )
        reloads.put(load_config_text(with_bob, "proxy.yaml"))

        # The same listener (no restart) files bob's copies once the loop has taken the reload.
        sent = iter(range(100))

        def filed() -> bool:
            send(f"<after-{next(sent)}@example.test>")
            return any((lab_tmp_path / "bob" / ".Sent" / "cur").glob("*"))

        wait_for(filed, 10.0, interval=0.5, what="bob's Sent copy after the reload")
    finally:
        stop.set()
        thread.join(20)
        sink.stop()
