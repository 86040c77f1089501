"""Run the real ``sentlink`` command as a subprocess, as an admin would, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lab import wait_for


def sentlink_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sentlink", *args]


class SentlinkServe:
    """``sentlink -c CONFIG serve`` in its own process group, its stderr in ``log_path``."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.log_path = workdir / "sentlink.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, socket_path: Path | None = None) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            sentlink_command("-c", str(self.config), "-v", "serve"),
            cwd=self.workdir,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        if socket_path is not None:
            wait_for(
                lambda: socket_path.exists() or self.proc is None or self.proc.poll() is not None,
                15.0,
                what="the milter socket",
            )
            if self.proc.poll() is not None:
                raise AssertionError(f"sentlink serve exited early:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait; returns the exit status (SIGKILL and fail if it does not stop)."""
        if self.proc is None:
            return 0
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
                raise AssertionError(
                    f"sentlink serve ignored SIGTERM:\n{self.log_text()}"
                ) from None
        return proc.returncode

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Another sentlink command on the same configuration."""
        return subprocess.run(
            sentlink_command("-c", str(self.config), *args),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def links(self, *filters: str) -> list[dict[str, Any]]:
        result = self.run("links", "--json", *filters)
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    def wait_links(
        self, message_id: str, count: int, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def enough() -> bool:
            found[:] = self.links("--message-id", message_id)
            return len(found) >= count

        try:
            wait_for(enough, timeout, interval=0.2, what=f"{count} links of {message_id}")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: have {found}\n{self.log_text()[-3000:]}") from None
        return found


def write_csv(path: Path, rows: Sequence[tuple[str, str, str, str]]) -> Path:
    lines = ["kind,id,name,email", *(",".join(row) for row in rows)]
    path.write_text("\n".join(lines) + "\n")
    return path
