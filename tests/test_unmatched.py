"""Unmatched recipients (crm.unmatched: review): listed per account with counts, and linked
once `sentlink crm import` makes their addresses known."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def sentlink(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sentlink", "-c", str(cfg), *args],
        cwd=cfg.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def setup(tmp_path: Path, unmatched: str = "review") -> Path:
    for account in ("alice", "carl"):
        (tmp_path / "mail" / account / ".Sent" / "cur").mkdir(parents=True)
    cfg = tmp_path / "sentlink.yaml"
    cfg.write_text(
        f"""\
site_secret_file: {tmp_path}/site.secret
store: {{url: "sqlite:///{tmp_path}/sentlink.db"}}
internal_domains: [example.test]
crm: {{unmatched: {unmatched}, never_log: [nolog@newco.test]}}
accounts:
  - {{name: alice, addresses: [alice@example.test], maildir: {tmp_path}/mail/alice}}
  - {{name: carl, addresses: [carl@example.test], maildir: {tmp_path}/mail/carl}}
hooks:
  - {{name: crm, type: command, path: /bin/true}}
"""
    )
    (tmp_path / "known.csv").write_text("kind,id,name,email\ncontact,c1,Bob,bob@customer.test\n")
    assert sentlink(cfg, "crm", "import", str(tmp_path / "known.csv")).returncode == 0
    sent = [
        ("alice", "1", "To: dana@newco.test", ""),
        ("alice", "2", "To: Dana <dana@newco.test>\r\nCc: erin@other.test", ""),
        ("alice", "3", "To: bob@customer.test", ""),
        ("alice", "4", "To: bob@customer.test\r\nCc: dana@newco.test", ""),
        ("alice", "5", "To: nolog@newco.test", ""),  # never-log: not kept for review
        ("alice", "6", "To: frank@newco.test", " [private]"),  # private: not kept either
        ("alice", "7", "To: colleague@example.test", ""),  # internal
        ("carl", "8", "To: dana@newco.test", ""),
    ]
    for account, n, rcpts, tag in sent:
        path = tmp_path / "mail" / account / ".Sent" / "cur" / f"171455760{n}.M{n}P1.host:2,S"
        path.write_bytes(
            f"From: {account}@example.test\r\n{rcpts}\r\nSubject: hello {n}{tag}\r\n"
            f"Message-ID: <m{n}@example.test>\r\nDate: Wed, 01 May 2024 10:00:0{n} +0000\r\n"
            f"\r\nbody\r\n".encode()
        )
    result = sentlink(cfg, "reindex", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["seen"] == 8
    return cfg


def unmatched(cfg: Path, *args: str) -> list[dict[str, object]]:
    result = sentlink(cfg, "links", "--unmatched", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json_lines(result.stdout)


def test_unmatched_addresses_are_listed_per_account_with_message_counts(tmp_path: Path) -> None:
    cfg = setup(tmp_path)
    rows = unmatched(cfg)
    assert [(r["account"], r["email"], r["messages"]) for r in rows] == [
        ("alice", "dana@newco.test", 3),
        ("alice", "erin@other.test", 1),
        ("carl", "dana@newco.test", 1),
    ]
    assert all(str(r["first"]) <= str(r["last"]) for r in rows)
    assert [r["account"] for r in unmatched(cfg, "--account", "carl")] == ["carl"]
    table = sentlink(cfg, "links", "--unmatched").stdout.splitlines()
    assert table[0].split() == ["ACCOUNT", "EMAIL", "MESSAGES", "FIRST", "LAST"]
    assert table[1].split()[:3] == ["alice", "dana@newco.test", "3"]
    usage = sentlink(cfg, "links", "--unmatched", "--email", "dana@newco.test")
    assert usage.returncode == 64


def test_crm_import_links_past_messages_of_newly_known_addresses(tmp_path: Path) -> None:
    cfg = setup(tmp_path)
    events_before = json_lines(sentlink(cfg, "outbox", "list", "--json").stdout)
    assert len(events_before) == 2  # messages 3 and 4, linked to Bob
    csv = tmp_path / "new.csv"
    csv.write_text("kind,id,name,email\nlead,l9,Dana,dana@newco.test\n")
    result = sentlink(cfg, "crm", "import", str(csv), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["records"] == 1
    assert summary["relinked"] == {"addresses": 1, "messages": 4, "linked": 4, "missing": 0}
    links = json_lines(sentlink(cfg, "links", "--json", "--email", "dana@newco.test").stdout)
    assert sorted((r["account"], r["message_id"]) for r in links) == [
        ("alice", "m1@example.test"),
        ("alice", "m2@example.test"),
        ("alice", "m4@example.test"),
        ("carl", "m8@example.test"),
    ]
    bob = json_lines(sentlink(cfg, "links", "--json", "--email", "bob@customer.test").stdout)
    assert sorted(r["message_id"] for r in bob) == ["m3@example.test", "m4@example.test"]
    # Erin is still unknown: still listed; Dana is not any more.
    assert [(r["account"], r["email"]) for r in unmatched(cfg)] == [("alice", "erin@other.test")]
    # Hooks hear of every newly linked message, message 4 (now Bob and Dana) included.
    events = json_lines(sentlink(cfg, "outbox", "list", "--json").stdout)
    assert len(events) == 6 and len({e["id"] for e in events}) == 6
    # Nothing is left over for a rescan, and a second import changes nothing.
    assert json.loads(sentlink(cfg, "reindex", "--json").stdout)["seen"] == 0
    again = json.loads(sentlink(cfg, "crm", "import", str(csv), "--json").stdout)
    assert again["relinked"]["messages"] == 0


def test_without_review_nothing_is_kept_and_the_listing_says_why(tmp_path: Path) -> None:
    cfg = setup(tmp_path, unmatched="ignore")
    result = sentlink(cfg, "links", "--unmatched")
    assert result.returncode == 0
    assert result.stdout == "no unmatched addresses\n"
    assert "crm.unmatched is ignore" in result.stderr
    csv = tmp_path / "new.csv"
    csv.write_text("kind,id,name,email\nlead,l9,Dana,dana@newco.test\n")
    summary = json.loads(sentlink(cfg, "crm", "import", str(csv), "--json").stdout)
    assert summary["relinked"]["messages"] == 0
