"""The PostgreSQL store on a real private server: the store contract, migrations, and several
linkers and workers sharing one database."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from hookutil import write_config
from pg import PgCluster, running_cluster
from sentlink.model import Link, MessageInfo, Participant, Record
from sentlink.store import Attempt, NewEvent, open_store
from sentlink.store.postgres import PostgresStore
from sentlink.testing import ReceivedRequest, Response, WebhookReceiver

BOB = Record("contact", "c1", "Bob", ("Bob@Customer.test",))


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PgCluster]:
    yield from running_cluster()


def msg(uniq: str, message_id: str) -> MessageInfo:
    return MessageInfo(
        "alice",
        "Sent",
        uniq,
        f".Sent/cur/{uniq}:2,S",
        "sent",
        message_id,
        "s",
        "",
        (Participant("bob@customer.test", "to"),),
    )


def test_a_fresh_backlog_is_claimed_without_scanning_every_pending_delivery(
    pg_cluster: PgCluster,
) -> None:
    # Written a moment ago, so PostgreSQL has no statistics on it yet: the plan must still
    # look each candidate's earlier events up by key (about 9,000 buffers for the 1,000
    # candidates here), not scan every pending delivery for each of them (about 280,000).
    store = open_store(pg_cluster.create_database("backlog"))
    records = [Record("contact", f"c{i}", f"C{i}", (f"c{i}@customer.test",)) for i in range(50)]
    store.upsert_records(records)
    for i in range(1000):
        record = records[i % len(records)]
        event = NewEvent(f"e{i}", "message.linked", "{}", (f"contact:{record.id}",), ("crm",), 0.0)
        assert store.save_message(msg(f"u{i}", f"m{i}@x"), [], [event])
    sql = PostgresStore._claim_sql().replace("?", "%s")
    with psycopg.connect(pg_cluster.url("backlog"), autocommit=True) as conn:
        (plan,) = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, ("crm", time.time(), 1e12, 100)
        ).fetchone()
    top = plan[0]["Plan"]
    assert top["Actual Rows"] == 50  # the first event of each record; the rest wait behind it
    assert top["Shared Hit Blocks"] + top["Shared Read Blocks"] < 40_000, json.dumps(plan)
    store.close()


def test_postgres_store_keeps_the_store_contract(pg_cluster: PgCluster) -> None:
    url = pg_cluster.create_database("contract")
    store = open_store(url)
    assert isinstance(store, PostgresStore) and store.schema_version() == 2
    store.upsert_record(BOB)
    assert store.records_by_email("bob@customer.test") == [
        Record("contact", "c1", "Bob", ("bob@customer.test",))
    ]
    m1 = msg("u1", "m1@x")
    link = Link("alice", "m1@x", BOB, "bob@customer.test", "to", "address", "sent")
    event = NewEvent("e1", "message.linked", "{}", ("contact:c1",), ("crm",), time.time())
    assert store.save_message(m1, [link], [event])
    assert not store.save_message(msg("u2", "m1@x"), [link], [event])  # same Message-ID
    assert store.has_message("alice", "u2")  # remembered as a copy
    (row,) = store.query_links()
    assert (row["message_id"], row["file"], row["record"]["id"]) == (
        "m1@x",
        ".Sent/cur/u1:2,S",
        "c1",
    )
    assert store.move_message("alice", "u1", "Sent", "new-name")
    assert store.message_location("alice", "u1") == ("Sent", "new-name")
    now = time.time()
    assert [d.event_id for d in store.claim_deliveries("crm", "w1", 5, 30, now)] == ["e1"]
    assert store.claim_deliveries("crm", "w2", 5, 30, now) == []
    store.finish_deliveries("crm", [Attempt(1, "dead", now, "HTTP 400", now)])
    assert [r["id"] for r in store.outbox_rows({"dead"})] == ["e1"]
    assert store.retry_deliveries("crm", set(), now) == 1
    m3 = msg("u3", "m3@x")
    assert store.save_message(m3, [], [], ["dana@newco.test"])  # crm.unmatched: review
    (unmatched,) = store.unmatched_addresses("alice")
    assert (unmatched["account"], unmatched["email"], unmatched["messages"]) == (
        "alice",
        "dana@newco.test",
        1,
    )
    assert store.messages_for_emails({"dana@newco.test"}) == [("alice", "u3")]
    assert store.forget_messages([("alice", "u3")]) == 1
    assert store.unmatched_addresses() == []
    assert store.forget_missing("alice", {"u2"}) == 1
    assert store.forget_account("alice") == 1
    store.close()
    again = open_store(url)  # migrations run once
    assert again.schema_version() == 2
    again.close()


def make_maildir(root: Path, account: str, count: int, records: int) -> None:
    cur = root / account / ".Sent" / "cur"
    cur.mkdir(parents=True)
    for i in range(count):
        (cur / f"17000000{i:05d}.M{i}P1.{account},S=100:2,S").write_bytes(
            f"From: {account}@example.test\r\nTo: c{i % records}@customer.test\r\n"
            f"Subject: n {i}\r\nMessage-ID: <{account}-{i}@example.test>\r\n\r\nhi\r\n".encode()
        )


def test_two_linkers_and_two_workers_share_one_database(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    messages, records = 5000, 100
    url = pg_cluster.create_database("shared")
    store = open_store(url)
    store.upsert_records(
        Record("contact", f"c{i}", f"C{i}", (f"c{i}@customer.test",)) for i in range(records)
    )
    store.close()
    mail = tmp_path / "mail"
    for account in ("alice", "bob"):
        make_maildir(mail, account, messages // 2, records)
    lock = threading.Lock()
    arrivals: list[str] = []

    def ok(request: ReceivedRequest) -> Response:
        with lock:
            arrivals.append(request.headers["webhook-id"])
        return Response(204)

    secret = tmp_path / "secret"
    secret.write_text("s\n")
    with WebhookReceiver(ok) as receiver:
        config = write_config(
            tmp_path / "sentlink.yaml",
            url,
            f"- {{name: crm, type: webhook, url: '{receiver.url}', secret_file: {secret},"
            " allow_private: true, timeout: 5}",
            "{lease_seconds: 60, batch: 50, poll_seconds: 1}",
        )
        text = config.read_text() + (
            "internal_domains: [example.test]\naccounts:\n"
            f"  - {{name: alice, addresses: [alice@example.test], maildir: {mail}/alice}}\n"
            f"  - {{name: bob, addresses: [bob@example.test], maildir: {mail}/bob}}\n"
        )
        config.write_text(text)
        base = [sys.executable, "-m", "sentlink", "-c", str(config)]
        log = (tmp_path / "procs.log").open("ab")
        workers = [subprocess.Popen([*base, "worker"], stdout=log, stderr=log) for _ in range(2)]
        linkers = [
            subprocess.Popen(
                [*base, "reindex", "-a", a, "--json"], stdout=subprocess.PIPE, stderr=log
            )
            for a in ("alice", "bob")
        ]
        try:
            for linker in linkers:
                out, _ = linker.communicate(timeout=150)
                assert linker.returncode == 0
                assert json.loads(out)["linked"] == messages // 2
            deadline = time.monotonic() + 120
            while len(set(arrivals)) < messages and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            codes = [w.wait(60) for w in workers]
            log.close()
        assert codes == [0, 0]
    counts = Counter(arrivals)
    assert len(counts) == messages  # none lost
    assert max(counts.values()) == 1  # no lease expired, so nothing was sent twice
    store = open_store(url)
    try:
        assert list(store.outbox_rows({"pending", "dead"})) == []
        owners = {r["owner"] for r in _delivery_owners(store)}
        assert len(owners) == 2  # both workers did part of the work
    finally:
        store.close()


def _delivery_owners(store: object) -> list[dict[str, str]]:
    assert isinstance(store, PostgresStore)
    with store._read() as conn:
        rows = conn.execute(
            "SELECT DISTINCT lease_owner FROM deliveries WHERE state = 'done'"
        ).fetchall()
    return [{"owner": r[0]} for r in rows]
