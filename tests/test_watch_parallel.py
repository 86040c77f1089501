"""A large reconcile reads and judges files in a worker process and writes them to the store in
groups (watch/scan.py): it must end exactly where handling the files one at a time ends, and a
crash in the middle must lose nothing the next reconcile does not put right."""

from __future__ import annotations

import pickle
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sentlink.config.models import Config
from sentlink.linker import LinkFilter
from sentlink.model import Record
from sentlink.store import MessageRows, open_store
from sentlink.watch.handler import MessageHandler
from sentlink.watch.oneshot import Reconcile
from sentlink.watch.policy import WatchPolicy
from sentlink.watch.prepare import Preparer, unpack
from test_watch_inbox import ALICE, SECRET, drop, mail, make_config, traced

SERIAL = 10**9  # parallel_from: never
PARALLEL = 0  # parallel_from: always

CRASHING_RECONCILE = """
import os, sys
from pathlib import Path
from sentlink.config import load_config
from sentlink.store import MessageRows, open_store
from sentlink.store.sqlite import SqliteStore
from sentlink.watch import handler
from sentlink.watch.oneshot import Reconcile

handler.BATCH_WRITES = 100
written = 0

def crashing(real):
    def save(self, writes):
        global written
        if written >= 150:  # a commit behind us, and writes since then
            os._exit(3)
        written += len(writes)
        return real(self, writes)
    return save

if __name__ == "__main__":
    SqliteStore.save_messages = crashing(SqliteStore.save_messages)
    SqliteStore.save_rows = crashing(SqliteStore.save_rows)
    config = load_config(Path(sys.argv[1]))
    store = open_store(config.store.url)
    with Reconcile(config, config.accounts, store, b"s" * 32) as r:
        r.run(r.pending(), parallel_from=0)
"""

HOOKS = "hooks: [{name: crm, type: command, path: /bin/true}]"


def fill(box: Path) -> None:
    """Every kind of file the handler treats differently, with replies close to what they
    answer (the same write group) and far from it."""
    for n in range(240):
        customer = f"user{n % 40}@customer{n % 7}.test"
        kind = n % 8
        if kind == 0:  # self-sent, fetched back into INBOX: moves to Sent
            drop(box, "INBOX", mail(f"s{n}@x", frm=ALICE, to=customer, subject=f"offer {n}"))
        elif kind == 1:  # our capture copy and the client's copy of one sent message
            drop(box, "Sent", traced(f"d{n}@x", frm=ALICE, to=customer), flags="S")
            drop(box, "Sent", mail(f"d{n}@x", frm=ALICE, to=customer), flags="S")
        elif kind == 2:  # a reply to the previous message, and one to a message long ago
            refs = f"In-Reply-To: <s{n - 2}@x>\nReferences: <r{max(0, n - 100)}@x> <s{n - 2}@x>\n"
            drop(box, "INBOX", mail(f"r{n}@x", frm=customer, extra=refs))
        elif kind == 3:  # the same message fetched twice into INBOX
            drop(box, "INBOX", mail(f"t{n}@x", frm=customer))
            drop(box, "INBOX", mail(f"t{n}@x", frm=customer))
        elif kind == 4:  # an ambiguous address: indexed, linked to nothing
            drop(box, "INBOX", mail(f"a{n}@x", frm="a@x.test)<b@y.test>"))
        elif kind == 5:  # internal only
            drop(box, "INBOX", mail(f"i{n}@x", frm="colleague@example.test"))
        else:  # dated in the usual form, and in others (the draft's date is ISO 8601)
            date = [f"Tue, 4 Jun 2024 10:00:{n % 60:02d} +0200", "4 Jun 2024 10:00 -0000"]
            date += ["Tue, 31 Feb 2024 10:00:00 +0200", "yesterday"]
            extra = f"Date: {date[n // 8 % 4]}\n"
            drop(
                box,
                "INBOX",
                mail(f"r{n}@x", frm=customer, cc=f"new{n}@elsewhere.test", extra=extra),
            )


def run(config: Config, parallel_from: int) -> dict[str, object]:
    store = open_store(config.store.url)
    try:
        store.upsert_records(
            Record("contact", f"c{k}", f"C {k}", (f"user{k}@customer{k % 7}.test",))
            for k in range(0, 40, 3)
        )
        with Reconcile(config, config.accounts, store, SECRET) as r:
            return r.run(r.pending(), parallel_from=parallel_from).as_dict()
    finally:
        store.close()


def state(base: Path) -> dict[str, object]:
    """The mailbox's files and every row the reconcile wrote (times and event ids aside)."""
    db = sqlite3.connect(base / "s.db")
    try:
        queries = {
            "messages": "SELECT pk, account, message_id, direction, subject, date, private"
            " FROM messages ORDER BY pk",
            "files": "SELECT account, uniq, message_pk, folder, file FROM message_files"
            " ORDER BY rowid",
            "links": "SELECT * FROM links ORDER BY message_pk, kind, record_id",
            "unmatched": "SELECT * FROM unmatched ORDER BY message_pk, email",
            "records": "SELECT kind, id, name FROM records ORDER BY kind, id",
            "events": "SELECT type, records FROM events ORDER BY pk",
            "deliveries": "SELECT event_pk, hook, state FROM deliveries ORDER BY event_pk",
        }
        rows = {name: db.execute(sql).fetchall() for name, sql in queries.items()}
    finally:
        db.close()
    box = base / "alice"
    rows["layout"] = sorted(str(p.relative_to(box)) for p in box.rglob("*") if p.is_file())
    return rows


def twins(tmp_path: Path, extra: str) -> tuple[Config, Config]:
    """Two copies of one mailbox (same file names), each with its own store and config."""
    source = tmp_path / "source"
    fill(source / "alice")
    configs = []
    for name in ("one", "two"):
        base = tmp_path / name
        shutil.copytree(source, base)
        (base / "site.secret").write_bytes(SECRET)
        (base / "site.secret").chmod(0o600)
        configs.append(make_config(base, extra))
    return configs[0], configs[1]


@pytest.mark.parametrize("hooks", [HOOKS, ""], ids=["hooks", "no-hooks"])
@pytest.mark.parametrize("unmatched", ["review", "create-lead"])
def test_the_parallel_reconcile_ends_where_one_at_a_time_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unmatched: str, hooks: str
) -> None:
    serial, parallel = twins(tmp_path, f"crm: {{unmatched: {unmatched}}}\n{hooks}")
    expected = run(serial, SERIAL)
    # The parallel reconcile stages the usual message from what the worker packed (as rows to
    # write when they say it all, else as a write request), the others as one at a time does:
    # every way must be taken here.
    taken = {"rows": 0, "request": 0, "general": 0}
    stage_packed, stage = MessageHandler.stage_packed, MessageHandler.stage

    def count_packed(self: MessageHandler, *args: Any) -> Any:
        staged = stage_packed(self, *args)
        if staged is not None:
            taken["rows" if isinstance(staged[0], MessageRows) else "request"] += 1
        return staged

    def count_general(self: MessageHandler, *args: Any) -> Any:
        taken["general"] += 1
        return stage(self, *args)

    monkeypatch.setattr(MessageHandler, "stage_packed", count_packed)
    monkeypatch.setattr(MessageHandler, "stage", count_general)
    assert run(parallel, PARALLEL) == expected
    assert taken["rows"] >= 30 and taken["request"] >= 10 and taken["general"] >= 30, taken
    assert expected["moved"] and expected["duplicates_removed"]  # every path was taken
    assert {"linked", "already", "skipped", "ambiguous"} <= set(expected["by_status"])  # type: ignore[arg-type]
    one, two = state(tmp_path / "one"), state(tmp_path / "two")
    assert one["links"] and (one["events"] if hooks else not one["events"])
    dates = {row[5] for row in one["messages"]}  # type: ignore[union-attr]
    assert {"2024-06-04T10:00:06+02:00", "2024-06-04T10:00:00+00:00", ""} <= dates
    assert two == one


def test_a_crash_between_write_groups_is_made_good_by_the_next_reconcile(
    tmp_path: Path,
) -> None:
    crashed, reference = twins(tmp_path, HOOKS)
    base = tmp_path / "one"
    (base / "sentlink.yaml").write_text(
        f"""
store: {{url: "sqlite:///{base}/s.db"}}
site_secret_file: {base}/site.secret
internal_domains: [example.test]
accounts:
  - name: alice
    addresses: [{ALICE}, a.smith@example.test]
    maildir: {base}/alice
{HOOKS}
"""
    )
    (base / "crash.py").write_text(CRASHING_RECONCILE)
    store = open_store(crashed.store.url)
    store.upsert_records(
        Record("contact", f"c{k}", f"C {k}", (f"user{k}@customer{k % 7}.test",))
        for k in range(0, 40, 3)
    )
    store.close()
    died = subprocess.run(
        [sys.executable, str(base / "crash.py"), str(base / "sentlink.yaml")],
        capture_output=True,
        timeout=120,
    )
    assert died.returncode == 3, died.stderr.decode()
    db = sqlite3.connect(base / "s.db")
    try:
        (done,) = db.execute("SELECT count(*) FROM message_files").fetchone()
    finally:
        db.close()
    assert 100 <= done < 150  # committed, and the rows after the last commit lost
    run(crashed, PARALLEL)  # the next reconcile
    run(reference, SERIAL)  # never crashed
    assert outcome(tmp_path / "one") == outcome(tmp_path / "two")


def outcome(base: Path) -> tuple[object, ...]:
    """Where the files are, what is indexed and which addresses are linked. Not the row keys,
    nor thread links: a crash changes the order files are indexed in (moved files are found
    in Sent by the next reconcile), and a thread link needs what it answers indexed first."""
    rows = state(base)
    store = open_store(f"sqlite:///{base}/s.db")
    try:
        linked = sorted(
            (r["message_id"], r["record"]["id"], r["role"], r["folder"])
            for r in store.query_links(account="alice")
            if r["via"] == "address"
        )
        indexed = store.folder_files("alice", "INBOX"), store.folder_files("alice", "Sent")
    finally:
        store.close()
    return rows["layout"], rows["records"], linked, indexed


def test_what_the_worker_sends_back_unpacks_to_the_slim_preparation(tmp_path: Path) -> None:
    """``prepare_packed`` (tuples, built without the objects) stands for exactly what
    ``prepare`` gives, slimmed, whatever the rules, the self-sent rule and the draft said."""
    config = make_config(
        tmp_path,
        """crm: {private: {subject_tag: "[private]"}}
watch:
  rules:
    - {name: lists, if: {header: {List-Id: ".+"}}, then: {link: false, flag: [F]}}
""",
    )
    preparer = Preparer(WatchPolicy.from_config(config, SECRET), LinkFilter(config))
    alice = config.accounts[0]
    box = tmp_path / "alice"
    files = {
        "INBOX": [
            mail(
                "m1@x",
                frm="Bob <bob@customer.test>",
                cc="carol@other.test, alice@example.test",
                extra="In-Reply-To: <r1@x>\nReferences: <r0@x> <r1@x>\nDate: Tue, 4 Jun 2024 "
                "10:00:00 +0200\nReceived: by mx\n",
            ),
            mail("m2@x", frm=ALICE, to="dave@customer.test"),  # self-sent: moves to Sent
            traced("m3@x", frm=ALICE, to=ALICE),  # self-sent by its trace header
            mail("m4@x", extra="List-Id: <news.example.test>\n"),  # a rule decides
            mail("m5@x", subject="[private] salary"),
            mail("m6@x", frm='"unclosed <bob@customer.test'),  # ambiguous
            mail("m7@x", frm="colleague@example.test"),  # internal only
            b"Subject: no address at all\n\nbody\n",
            mail("m9@x", extra="X-Sentlink-Trace: forged\n"),  # stays, with a trace header
        ],
        "Sent": [mail("m8@x", frm=ALICE, to="Erin <erin@customer.test>", cc="bob@customer.test")],
    }
    # Without hooks wanting message.linked events, the main process reads a message's kept
    # fields only to tell copies in Sent apart: the others are sent without them.
    lean = Preparer(WatchPolicy.from_config(config, SECRET), LinkFilter(config), False)
    seen = set()
    for folder, messages in files.items():
        for data in messages:
            path = drop(box, folder, data)
            packed = preparer.prepare_packed(alice, folder, str(path))
            got = unpack(pickle.loads(pickle.dumps(packed)))
            assert got == preparer.prepare(alice, folder, path).slim(), data
            to_sent = (got.decision.move or folder) == "Sent"
            has_trace = b"X-Sentlink-Trace" in data
            assert lean.prepare_packed(alice, folder, str(path)) == (
                packed if to_sent or has_trace else ((), *packed[1:])
            ), data
            assert got.headers.get("to") == "" and got.headers.get("subject") == ""
            seen.add(
                (
                    got.decision.move,
                    got.decision.link,
                    got.draft.private,
                    bool(got.draft.ambiguous),
                    got.draft.skip,
                    len(got.draft.candidates),
                )
            )
    # The files above take each way through the rules and the draft.
    assert ("Sent", True, False, False, "", 1) in seen  # self-sent, moved
    assert (None, False, False, False, "", 1) in seen  # a rule's decision
    assert any(private for _m, _l, private, *_ in seen)
    assert any(ambiguous for *_, ambiguous, _s, _c in seen)
    assert {"internal-only", "no-participants"} <= {skip for *_, skip, _c in seen}
    assert (None, True, False, False, "", 2) in seen  # From and Cc, or To and Cc in Sent


@pytest.mark.parametrize("parallel_from", [SERIAL, PARALLEL])
def test_files_are_handled_in_delivery_order_so_replies_find_their_thread(
    tmp_path: Path, parallel_from: int
) -> None:
    """A Maildir name starts with the delivery time. Each reply here was written to the
    directory before the message it answers, with a later name: handled in name order, every
    reply comes after its original and is linked to the original's record via the thread."""
    config = make_config(tmp_path)
    box = tmp_path / "alice"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True)
    originals, replies = [], []
    for n in range(60):
        when = 1_700_000_000 + 10 * n
        originals.append((f"{when}.M1P1.host", mail(f"o{n}@x", frm=f"user{n}@customer.test")))
        refs = f"In-Reply-To: <o{n}@x>\n"
        replies.append(
            (f"{when + 5}.M2P1.host", mail(f"re{n}@x", frm=f"other{n}@else.test", extra=refs))
        )
    for name, data in replies + originals:  # the replies first: no help from creation order
        (box / "new" / name).write_bytes(data)
    store = open_store(config.store.url)
    try:
        store.upsert_records(
            Record("contact", f"c{n}", f"C {n}", (f"user{n}@customer.test",)) for n in range(60)
        )
        with Reconcile(config, config.accounts, store, SECRET) as r:
            summary = r.run(r.pending(), parallel_from=parallel_from)
        assert summary.linked == 120
        via_thread = {
            (row["message_id"], row["record"]["id"])
            for row in store.query_links(account="alice")
            if row["via"] == "thread"
        }
    finally:
        store.close()
    assert via_thread == {(f"re{n}@x", f"c{n}") for n in range(60)}
