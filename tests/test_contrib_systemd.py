"""contrib/systemd as shipped: units verify, sysusers/tmpfiles apply, sd_notify works."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sentlink_proc import sentlink_command

SYSTEMD = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
UNITS = [
    "sentlink.service",
    "sentlink-milter.service",
    "sentlink-proxy.service",
    "sentlink-watch.service",
    "sentlink-worker.service",
]
# Units whose process captures mail: up before the MTA so its first message finds them.
CAPTURING = {"sentlink.service", "sentlink-milter.service", "sentlink-proxy.service"}


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is required under CI=true (Debian package systemd)")
        pytest.skip(f"{tool} not installed (Debian package systemd)")
    return path


def directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (SYSTEMD / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    analyze = need("systemd-analyze")
    # The shipped unit, with ExecStart pointing at this checkout's sentlink instead of /usr/bin.
    here = str(Path(sys.executable).parent / "sentlink")
    (tmp_path / unit).write_text((SYSTEMD / unit).read_text().replace("/usr/bin/sentlink", here))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_notify_type_hardened_and_reloadable(unit: str) -> None:
    d = directives(unit)
    assert d["Type"] == ["notify"]
    assert d["User"] == ["sentlink"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "WatchdogSec" in d and "RestrictAddressFamilies" in d and "ReadWritePaths" in d
    assert d["RuntimeDirectory"] == ["sentlink"]
    if unit in CAPTURING:
        assert "postfix.service" in d["Before"][0]
    else:
        assert "Before" not in d


def test_sysusers_and_tmpfiles_create_the_user_and_directories(tmp_path: Path) -> None:
    sysusers = need("systemd-sysusers")
    tmpfiles = need("systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    for name in ("passwd", "group"):
        shutil.copy(f"/etc/{name}", tmp_path / "etc" / name)
    run = {"capture_output": True, "text": True, "timeout": 60}
    result = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSTEMD / "sentlink.sysusers")], **run
    )  # type: ignore[call-overload]
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc/passwd").read_text()
    assert any(line.startswith("sentlink:") for line in passwd.splitlines())
    postfix = [
        g for g in (tmp_path / "etc/group").read_text().splitlines() if g.startswith("postfix:")
    ]
    if postfix:  # the group exists where Postfix is installed: sentlink joins it
        assert "sentlink" in postfix[0].split(":")[3].split(",")
    result = subprocess.run(
        [tmpfiles, f"--root={tmp_path}", "--create", str(SYSTEMD / "sentlink.tmpfiles")], **run
    )  # type: ignore[call-overload]
    assert result.returncode == 0, result.stderr
    for path in ("var/spool/postfix/sentlink", "var/lib/sentlink", "etc/sentlink"):
        assert (tmp_path / path).is_dir(), path
        assert (tmp_path / path).stat().st_mode & 0o007 == 0, path


def test_serve_reports_ready_reloading_watchdog_and_stopping_to_systemd(tmp_path: Path) -> None:
    config = tmp_path / "sentlink.yaml"
    config.write_text(
        f"site_secret_file: {tmp_path}/secret\n"
        f'store: {{url: "sqlite:///{tmp_path}/s.db"}}\n'
        f"accounts:\n  - name: alice\n    addresses: [alice@example.test]\n"
        f"    maildir: {tmp_path}/alice\n"
        f'milter: {{listen: "unix:{tmp_path}/m.sock"}}\n'
    )
    notify = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(notify))
        server.settimeout(20)
        proc = subprocess.Popen(
            sentlink_command("-c", str(config), "serve"),
            env={**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "400000"},
            stderr=subprocess.PIPE,
        )
        try:
            messages = [server.recv(4096).decode()]
            assert messages[0].startswith("READY=1"), messages
            assert server.recv(4096) == b"WATCHDOG=1"  # every WATCHDOG_USEC / 2
            proc.send_signal(signal.SIGHUP)
            seen = set()
            while not {"RELOADING=1", "READY=1"} <= seen:
                seen.add(server.recv(4096).decode())
            proc.send_signal(signal.SIGTERM)
            while (msg := server.recv(4096).decode()) != "STOPPING=1":
                assert msg in ("WATCHDOG=1", "READY=1"), msg
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
