"""The watcher in a child process of ``sentlink serve``, at a lower CPU priority.

Linking is the heavy, deferrable part of the work; capture (milter, proxy) is what the MTA waits
for. In one process they share the GIL, so a burst of linking would slow every SMTP session. In
a child process with a higher nice value, the kernel gives the MTA and the milter the CPU first
and linking catches up afterwards: the Maildir is the queue between them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sentlink.config.models import Config

log = logging.getLogger("sentlink.serve")

# Added to the child's nice value (nice(2)): linking yields the CPU to capture.
WATCHER_NICE = 10


def child_status_file(config: Config) -> Path:
    """Where the watcher child publishes its state (beside serve's own status file)."""
    status = config.status_file
    return status.with_name(f"{status.stem}.watcher{status.suffix or '.json'}")


@dataclass
class WatcherView:
    """The child's last published watcher state, shaped like FolderWatcher's counters."""

    rescans: int = 0
    overflows: int = 0
    last_rescan: float | None = None
    last_summary: Any = None
    handled: dict[str, int] = field(default_factory=dict)


class WatcherProcessComponent:
    """``sentlink watch`` as a supervised child; SIGHUP and SIGTERM are passed on to it."""

    name = "watcher"

    def __init__(self, config_path: Path, config: Config) -> None:
        self._config_path = config_path
        self._state_file = child_status_file(config)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "sentlink", "-c", str(self._config_path), "watch", "--child"]
        # The child starts with SIGHUP ignored (an ignored disposition survives exec), so a
        # reload passed on before it has set up its own handler cannot kill it; it reads the
        # configuration fresh at start anyway. stderr is inherited: its log lines go where
        # serve's go (journald).
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=child_environment())
        finally:
            signal.signal(signal.SIGHUP, previous)
        log.info("watcher runs in child process %d (nice +%d)", self._proc.pid, WATCHER_NICE)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def reload(self, config: Config) -> None:
        if self.alive():
            assert self._proc is not None
            self._proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("watcher child %d ignored SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait(5)

    @property
    def watcher(self) -> WatcherView:
        try:
            state = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return WatcherView()
        watch = state.get("watcher") or {}
        return WatcherView(
            rescans=int(watch.get("rescans", 0)),
            overflows=int(watch.get("inotify_overflows", 0)),
            last_rescan=watch.get("last_rescan"),
            handled={str(k): int(v) for k, v in (watch.get("handled") or {}).items()},
        )


def child_environment() -> dict[str, str]:
    """serve's environment without systemd's notification variables: only serve talks to
    systemd (NotifyAccess=main)."""
    hidden = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
    return {k: v for k, v in os.environ.items() if k not in hidden}


def lower_priority() -> None:
    """Called in the child before it starts work."""
    try:
        os.nice(WATCHER_NICE)
    except OSError as exc:
        log.warning("cannot lower the watcher's priority: %s", exc)
