"""sd_notify over a real datagram socket, as systemd listens for it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from sentlink.sdnotify import Notifier


def test_ready_stopping_and_watchdog_reach_the_notify_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(5)
        env = {
            "NOTIFY_SOCKET": str(path),
            "WATCHDOG_USEC": "30000000",
            "WATCHDOG_PID": str(os.getpid()),
        }
        notifier = Notifier(env)
        assert notifier.enabled
        assert notifier.watchdog_interval == 15.0
        assert notifier.ready("milter on")
        assert server.recv(4096) == b"READY=1\nSTATUS=milter on"
        assert notifier.watchdog()
        assert server.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping()
        assert server.recv(4096) == b"STOPPING=1"


def test_abstract_socket_names_start_with_a_nul_byte() -> None:
    name = f"sentlink-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert server.recv(64) == b"READY=1"


def test_without_notify_socket_nothing_is_sent_and_no_watchdog() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert not notifier.enabled
    assert not notifier.ready()
    assert notifier.watchdog_interval is None
