"""Operator commands: sentlink config (postconf-style) and sentlink match."""

from __future__ import annotations

import json
from pathlib import Path

from test_cli import sentlink, write_config


def test_config_non_default_prints_only_what_the_file_changes(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    result = sentlink("-c", str(cfg), "config", "--non-default", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" = ", 1) for line in result.stdout.splitlines())
    assert lines["internal_domains"] == "example.test"
    assert lines["accounts[0].name"] == "alice"
    assert lines["store.url"] == f"sqlite:///{tmp_path}/sentlink.db"
    assert "crm.multiple_match" not in lines  # left at its default


def test_config_defaults_and_json_agree(tmp_path: Path) -> None:
    text = sentlink("config", "--defaults", cwd=tmp_path)
    js = sentlink("config", "--defaults", "--json", cwd=tmp_path)
    assert text.returncode == js.returncode == 0
    data = json.loads(js.stdout)
    assert data["crm"]["multiple_match"] == "all"
    assert "crm.multiple_match = all" in text.stdout.splitlines()
    assert data["watch"]["rescan_seconds"] == 300


def test_config_shows_the_file_value_or_else_the_default(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    data = json.loads(sentlink("-c", str(cfg), "config", "--json", cwd=tmp_path).stdout)
    assert data["internal_domains"] == ["example.test"]
    assert data["crm"]["private"]["header"] == "X-CRM-Private"


def test_match_explains_records_and_exclusions(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    csv = tmp_path / "c.csv"
    csv.write_text(
        "kind,id,name,email\ncontact,c1,Bob,bob@customer.test\nlead,l1,Bob L,bob@customer.test\n"
    )
    assert sentlink("-c", str(cfg), "crm", "import", str(csv), cwd=tmp_path).returncode == 0

    result = sentlink("-c", str(cfg), "match", "Bob@Customer.TEST", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["address"] == "bob@customer.test"
    assert sorted((r["kind"], r["id"]) for r in data["records"]) == [
        ("contact", "c1"),
        ("lead", "l1"),
    ]
    assert "address match" in data["reason"]

    internal = sentlink("-c", str(cfg), "match", "carol@example.test", cwd=tmp_path)
    assert internal.returncode == 0
    assert "excluded: internal domain" in internal.stdout
    own = json.loads(
        sentlink("-c", str(cfg), "match", "alice@example.test", "--json", cwd=tmp_path).stdout
    )
    assert own["records"] == [] and "account alice" in own["reason"]
    unknown = sentlink("-c", str(cfg), "match", "zed@nowhere.test", cwd=tmp_path)
    assert "no record" in unknown.stdout
    bad = sentlink("-c", str(cfg), "match", "not an address", cwd=tmp_path)
    assert bad.returncode == 65


def test_log_syslog_sends_mail_facility_lines_to_the_syslog_socket(tmp_path: Path) -> None:
    import socket

    cfg = write_config(tmp_path)
    sock_path = tmp_path / "log.sock"
    cfg.write_text(cfg.read_text() + f"log: {{syslog: true, syslog_socket: {sock_path}}}\n")
    csv = tmp_path / "c.csv"
    csv.write_text("kind,id,name,email\ncontact,c1,Bob,bob@customer.test\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(sock_path))
        server.settimeout(10)
        result = sentlink("-c", str(cfg), "-v", "crm", "import", str(csv), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        line = server.recv(4096).decode()
    # <PRI> with facility mail (2): PRI = 2 * 8 + severity.
    pri = int(line[1 : line.index(">")])
    assert pri // 8 == 2
    assert "sentlink[" in line
