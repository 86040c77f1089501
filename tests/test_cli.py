"""The command line: sysexits codes, check-config messages, import and links end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def sentlink(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sentlink", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "sentlink.yaml"
    cfg.write_text(
        f"""\
site_secret_file: {tmp_path}/site.secret
store: {{url: "sqlite:///{tmp_path}/sentlink.db"}}
internal_domains: [example.test]
accounts:
  - name: alice
    addresses: [alice@example.test]
    maildir: {tmp_path}/mail/alice
"""
    )
    return cfg


def test_check_config_accepts_the_reference_file() -> None:
    result = sentlink("-c", "config/sentlink.yaml", "check-config", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_check_config_reports_file_line_col_and_exits_78(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("store:\n  url: sqlite:///x.db\n  colour: blue\nmilter:\n  timeout: soon\n")
    result = sentlink("-c", str(cfg), "check-config", cwd=tmp_path)
    assert result.returncode == 78
    lines = result.stderr.splitlines()
    assert any(line.startswith(f"{cfg}:3:3: ") and "colour" in line for line in lines), lines
    assert any(line.startswith(f"{cfg}:5:12: ") for line in lines), lines


def test_config_path_defaults_to_environment_variable(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    env = {"SENTLINK_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"}
    result = sentlink("check-config", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert str(cfg) in result.stdout


def test_missing_config_file_exits_78(tmp_path: Path) -> None:
    result = sentlink("-c", str(tmp_path / "nope.yaml"), "check-config", cwd=tmp_path)
    assert result.returncode == 78
    assert "nope.yaml" in result.stderr


def test_unknown_option_is_a_usage_error_64(tmp_path: Path) -> None:
    result = sentlink("links", "--frobnicate", cwd=tmp_path)
    assert result.returncode == 64
    assert "frobnicate" in result.stderr


def test_imported_contacts_are_linked_by_reindex_and_listed_as_json(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    csv = tmp_path / "contacts.csv"
    csv.write_text(
        "kind,id,name,email\n"
        "contact,c1,Bob Customer,bob@customer.test\n"
        "lead,l7,Carol Lead,carol@prospect.test\n"
    )
    result = sentlink("-c", str(cfg), "crm", "import", str(csv), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["records"] == 2

    sent = tmp_path / "mail/alice/.Sent/cur"
    sent.mkdir(parents=True)
    (tmp_path / "mail/alice/.Sent/new").mkdir()
    (tmp_path / "mail/alice/.Sent/tmp").mkdir()
    for sub in ("cur", "new", "tmp"):
        (tmp_path / "mail/alice" / sub).mkdir(exist_ok=True)
    (sent / "1700000000.M1P1.host,S=200:2,S").write_bytes(
        b"From: Alice <alice@example.test>\n"
        b"To: Bob <bob@customer.test>\n"
        b"Bcc: carol@prospect.test\n"
        b"Subject: Offer\n"
        b"Date: Tue, 14 Nov 2023 22:13:20 +0000\n"
        b"Message-ID: <offer-1@example.test>\n"
        b"\n"
        b"Hello\n"
    )
    result = sentlink("-c", str(cfg), "reindex", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["linked"] == 1

    result = sentlink("-c", str(cfg), "links", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    by_email = {row["record"]["email"]: row for row in rows}
    assert set(by_email) == {"bob@customer.test", "carol@prospect.test"}
    assert by_email["bob@customer.test"]["role"] == "to"
    assert by_email["carol@prospect.test"]["role"] == "bcc"
    assert by_email["carol@prospect.test"]["record"]["kind"] == "lead"
    for row in rows:
        assert row["account"] == "alice"
        assert row["direction"] == "sent"
        assert row["message_id"] == "offer-1@example.test"
        assert row["subject"] == "Offer"
        assert row["date"].startswith("2023-11-14T22:13:20")
        assert row["folder"] == "Sent"
        assert row["via"] == "address"

    result = sentlink("-c", str(cfg), "links", "--record", "lead:l7", "--json", cwd=tmp_path)
    assert [json.loads(x)["record"]["id"] for x in result.stdout.splitlines()] == ["l7"]
    result = sentlink("-c", str(cfg), "links", "--record", "nonsense", cwd=tmp_path)
    assert result.returncode == 64


def test_import_with_bad_rows_reports_lines_and_exits_65(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    csv = tmp_path / "contacts.csv"
    csv.write_text("kind,id,name,email\ncontact,c1,Bob,bob@customer.test\nvendor,v1,V,v@x.test\n")
    result = sentlink("-c", str(cfg), "crm", "import", str(csv), cwd=tmp_path)
    assert result.returncode == 65
    assert f"{csv}:3:" in result.stderr
