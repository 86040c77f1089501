"""``sentlink status`` against a running and a stopped ``sentlink serve``."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from sentlink_proc import sentlink_command


def status(config: Path) -> tuple[int, dict[str, object]]:
    result = subprocess.run(
        sentlink_command("-c", str(config), "status", "--json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, json.loads(result.stdout)


def test_status_shows_running_components_then_unavailable_after_stop(tmp_path: Path) -> None:
    config = tmp_path / "sentlink.yaml"
    config.write_text(
        f"site_secret_file: {tmp_path}/secret\n"
        f"status_file: {tmp_path}/status.json\n"
        f'store: {{url: "sqlite:///{tmp_path}/s.db"}}\n'
        f"accounts:\n  - name: alice\n    addresses: [alice@example.test]\n"
        f"    maildir: {tmp_path}/alice\n"
        f'milter: {{listen: "unix:{tmp_path}/m.sock"}}\n'
    )
    code, state = status(config)
    assert code == 69 and state["running"] is False

    proc = subprocess.Popen(sentlink_command("-c", str(config), "serve"), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            code, state = status(config)
            serve = state.get("serve") or {}
            watcher = serve.get("watcher") if isinstance(serve, dict) else None
            if code == 0 and watcher and watcher.get("last_rescan"):
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        assert state["running"] is True
        assert state["serve"]["components"] == {  # type: ignore[index]
            "watcher": {"alive": True},
            "milter": {"alive": True},
        }
        assert state["outbox"] == {"pending": {}, "dead": {}}
        assert state["disabled_hooks"] == {}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    code, state = status(config)
    assert code == 69 and state["running"] is False
    text = subprocess.run(
        sentlink_command("-c", str(config), "status"), capture_output=True, text=True, timeout=60
    )
    assert text.returncode == 69 and "serve: not running" in text.stdout


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def nice_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # field 19: nice


def test_serve_links_in_a_lower_priority_child_that_stops_with_it(tmp_path: Path) -> None:
    config = tmp_path / "sentlink.yaml"
    config.write_text(
        f"site_secret_file: {tmp_path}/secret\n"
        f"status_file: {tmp_path}/status.json\n"
        f'store: {{url: "sqlite:///{tmp_path}/s.db"}}\n'
        f"accounts:\n  - name: alice\n    addresses: [alice@example.test]\n"
        f"    maildir: {tmp_path}/alice\n"
        f'milter: {{listen: "unix:{tmp_path}/m.sock"}}\n'
    )
    proc = subprocess.Popen(sentlink_command("-c", str(config), "serve"), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not (kids := children_of(proc.pid)):
            assert time.monotonic() < deadline, "no watcher child"
            time.sleep(0.1)
        [child] = kids
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        assert b"watch" in cmdline and b"--child" in cmdline
        # Once it has started, it publishes its watcher state beside serve's status file.
        deadline = time.monotonic() + 20
        while not (tmp_path / "status.watcher.json").exists():
            assert time.monotonic() < deadline, "no watcher state"
            time.sleep(0.1)
        assert nice_of(child) == min(19, nice_of(proc.pid) + 10)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert (
        not Path(f"/proc/{child}").exists()
        or b"zombie" in Path(f"/proc/{child}/status").read_bytes().lower()
    )
