"""The outbox: events written with the links, delivered in order per record, retried and
dead-lettered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hookutil import write_config
from sentlink.config import load_config_text
from sentlink.config.models import OutboxConfig
from sentlink.errors import StoreError
from sentlink.events import message_facts
from sentlink.hooks import Event, Result
from sentlink.hooks.webhook import WebhookHook
from sentlink.linker import Linker
from sentlink.model import Link, MessageInfo, Participant, Record
from sentlink.outbox import HookRunner, OutboxWorker, backoff
from sentlink.store import NewEvent, Store, open_store
from sentlink.testing import Response, WebhookReceiver

BOB = Record("contact", "c1", "Bob Buyer", ("bob@customer.test",))
CAROL = Record("lead", "l7", "Carol", ("carol@prospect.test",))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path}/sentlink.db")
    s.upsert_record(BOB)
    yield s
    s.close()


def info(uniq: str, message_id: str = "") -> MessageInfo:
    return MessageInfo(
        account="alice",
        folder="Sent",
        uniq=uniq,
        file=f".Sent/cur/{uniq}:2,S",
        direction="sent",
        message_id=message_id or f"{uniq}@example.test",
        subject=f"subject {uniq}",
        date="2024-05-01T10:00:00+00:00",
        participants=(Participant("bob@customer.test", "to"),),
    )


def event(
    eid: str, records: tuple[str, ...] = ("contact:c1",), hooks: tuple[str, ...] = ("crm",)
) -> NewEvent:
    body = json.dumps({"id": eid, "type": "message.linked", "timestamp": "t", "data": {}})
    return NewEvent(eid, "message.linked", body, records, hooks, time.time())


def link_of(msg: MessageInfo, record: Record) -> Link:
    return Link(msg.account, msg.message_id, record, record.emails[0], "to", "address", "sent")


def save(store: Store, eid: str, records: tuple[str, ...] = ("contact:c1",)) -> None:
    assert store.save_message(info(eid), [link_of(info(eid), BOB)], [event(eid, records)])


class Recorder:
    """A hook that records events and answers from a script of outcomes per event id."""

    name = "crm"

    def __init__(self, script: dict[str, list[Result]] | None = None) -> None:
        self.script = script or {}
        self.seen: list[str] = []

    def deliver(self, ev: Event) -> Result:
        self.seen.append(ev.id)
        answers = self.script.get(ev.id)
        return answers.pop(0) if answers else Result.done()


def worker(store: Store, hook: Recorder, **outbox: object) -> tuple[OutboxWorker, HookRunner]:
    settings = {"backoff_seconds": (0,), "batch": 10, **outbox}
    config = OutboxConfig(**settings)  # type: ignore[arg-type]
    return OutboxWorker(store, [HookRunner(hook, 5.0)], config), HookRunner(hook, 5.0)


def drain(w: OutboxWorker, runner: HookRunner, rounds: int = 20) -> None:
    for _ in range(rounds):
        w.deliver_batch(runner)


# writing


def test_linker_writes_one_message_linked_event_with_the_documented_shape(tmp_path: Path) -> None:
    maildir = tmp_path / "mail"
    (maildir / ".Sent" / "cur").mkdir(parents=True)
    config = load_config_text(
        textwrap.dedent(f"""\
            internal_domains: [example.test]
            accounts: [{{name: alice, addresses: [alice@example.test], maildir: {maildir}}}]
            hooks:
              - {{name: crm, type: command, path: /bin/true}}
              - {{name: other, type: command, path: /bin/true, events: [record.created]}}
            """),
        "s.yaml",
    )
    store = open_store(f"sqlite:///{tmp_path}/db.sqlite")
    store.upsert_record(BOB)
    msg = maildir / ".Sent" / "cur" / "1714557600.M1P2.host,S=900:2,S"
    msg.write_bytes(
        b"From: Alice <alice@example.test>\r\nTo: Bob <bob@customer.test>, x@nowhere.test\r\n"
        b"Subject: Quote\r\nMessage-ID: <q1@example.test>\r\n"
        b"Date: Wed, 01 May 2024 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain\r\n\r\nsecret body text\r\n--b\r\n"
        b"Content-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename*=UTF-8''Angebot%20%C3%BC.pdf\r\n\r\n"
        b"JVBERi0=\r\n--b--\r\n"
    )
    linker = Linker(store, config)
    account = config.accounts[0]
    assert linker.link_file(account, "Sent", msg, "sent").status == "linked"
    (row,) = store.outbox_rows({"pending"})
    assert (row["hook"], row["type"], row["attempts"]) == ("crm", "message.linked", 0)
    (claimed,) = store.claim_deliveries("crm", "me", 10, 60, time.time())
    body = json.loads(claimed.payload)
    assert body["id"] == claimed.event_id == row["id"]
    assert body["id"].startswith("msg_") and body["type"] == "message.linked"
    assert body["timestamp"].endswith("+00:00")
    data = body["data"]
    assert data["message_id"] == "q1@example.test"
    assert data["subject"] == "Quote" and data["direction"] == "sent"
    assert data["from"] == {"email": "alice@example.test", "name": "Alice"}
    assert data["records"] == [
        {
            "kind": "contact",
            "id": "c1",
            "name": "Bob Buyer",
            "email": "bob@customer.test",
            "role": "to",
            "via": "address",
        }
    ]
    assert [p["email"] for p in data["participants"]] == ["bob@customer.test", "x@nowhere.test"]
    assert data["attachments"] == ["Angebot ü.pdf"]
    assert data["size"] == msg.stat().st_size
    assert "secret body text" not in claimed.payload
    # The id is stable: the same message linked again (a full reindex) is not a new event.
    store.forget_account("alice")
    assert linker.link_file(account, "Sent", msg, "sent").status == "linked"
    assert len(list(store.outbox_rows({"pending", "done", "dead"}))) == 1
    store.close()


def test_no_hooks_means_no_outbox_rows_and_skipped_mail_has_no_event(
    store: Store, tmp_path: Path
) -> None:
    assert store.save_message(info("u1"), [link_of(info("u1"), BOB)])
    assert list(store.outbox_rows({"pending", "done", "dead"})) == []


def test_message_facts_leave_out_the_body(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.write_bytes(b"Subject: x\r\n\r\nhello\r\n")
    facts = message_facts(path, None)
    assert (facts.size, facts.attachments) == (path.stat().st_size, ())


def test_message_links_and_events_are_written_together_or_not_at_all(store: Store) -> None:
    broken = event("e1", hooks=("crm", "crm"))  # the second delivery row violates its key
    with pytest.raises(StoreError):
        store.save_message(info("u1"), [link_of(info("u1"), BOB)], [broken])
    assert not store.has_message("alice", "u1")
    assert list(store.query_links()) == []
    assert list(store.outbox_rows({"pending", "done", "dead"})) == []
    save(store, "u1")
    assert store.has_message("alice", "u1")
    assert len(list(store.query_links())) == 1
    assert len(list(store.outbox_rows({"pending"}))) == 1


CRASHER = """
import json, sys, time
from sentlink.model import Link, MessageInfo, Participant, Record
from sentlink.store import NewEvent, open_store
store = open_store(sys.argv[1])
bob = Record("contact", "c1", "Bob", ("bob@customer.test",))
store.upsert_record(bob)
print("ready", flush=True)
i = 0
while True:
    i += 1
    uniq = f"{sys.argv[2]}-{i}"
    to = (Participant("bob@customer.test", "to"),)
    msg = MessageInfo("alice", "Sent", uniq, uniq, "sent", uniq, "s", "", to)
    body = json.dumps({"id": uniq})
    ev = NewEvent(uniq, "message.linked", body, ("contact:c1",), ("crm",), time.time())
    link = Link("alice", uniq, bob, "bob@customer.test", "to", "address", "sent")
    store.save_message(msg, [link], [ev])
"""


def test_a_crash_while_linking_never_leaves_a_message_without_its_event(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/crash.db"
    for run in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASHER, url, f"r{run}"], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(0.2 + run * 0.1)  # let it commit some, then kill it mid-stream
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    store = open_store(url)
    try:
        linked = {row["message_id"] for row in store.query_links()}
        events = {row["id"] for row in store.outbox_rows({"pending"})}
        assert linked and linked == events
    finally:
        store.close()


# delivering


def test_worker_delivers_each_event_once_and_marks_it_done(store: Store) -> None:
    for i in range(25):
        save(store, f"e{i:02d}", (f"contact:c{i}",))
    hook = Recorder()
    w, runner = worker(store, hook)
    drain(w, runner, 5)
    assert hook.seen == [f"e{i:02d}" for i in range(25)]
    assert list(store.outbox_rows({"pending", "dead"})) == []
    assert len(list(store.outbox_rows({"done"}))) == 25


def test_a_batch_saves_its_outcomes_together_and_a_slow_batch_every_second(
    store: Store,
) -> None:
    for i in range(4):
        save(store, f"e{i}", (f"contact:c{i}",))
    done_before: list[int] = []

    class Slow(Recorder):
        def deliver(self, ev: Event) -> Result:
            done_before.append(len(list(store.outbox_rows({"done"}))))
            time.sleep(0.6)  # a slow receiver: the batch takes longer than a second
            return super().deliver(ev)

    hook = Slow()
    w, runner = worker(store, hook)
    assert w.deliver_batch(runner) == 4
    # Nothing is saved after each event; the outcomes of the first second are saved then.
    assert done_before == [0, 0, 2, 2]
    assert len(list(store.outbox_rows({"done"}))) == 4
    assert list(store.outbox_rows({"pending"})) == []


def test_outcomes_are_saved_before_the_lease_of_the_rest_is_renewed(store: Store) -> None:
    # With a lease shorter than a delivery may take, the worker renews the lease of the rest
    # before each delivery; the events delivered so far are saved first, so none of them is
    # left pending under an old lease that another worker could claim after it ran out.
    for i in range(3):
        save(store, f"e{i}", (f"contact:c{i}",))
    done_before: list[int] = []

    class Counting(Recorder):
        def deliver(self, ev: Event) -> Result:
            done_before.append(len(list(store.outbox_rows({"done"}))))
            return super().deliver(ev)

    w, runner = worker(store, Counting(), lease_seconds=3)
    assert w.deliver_batch(runner) == 3
    assert done_before == [0, 1, 2]


def test_outcomes_delivered_before_a_store_failure_are_still_saved(store: Store) -> None:
    for i in range(3):
        save(store, f"e{i}", (f"contact:c{i}",))

    class Failing(Recorder):
        def deliver(self, ev: Event) -> Result:
            if ev.id == "e1":
                raise KeyboardInterrupt  # anything escaping the loop, after e0 was delivered
            return super().deliver(ev)

    w, runner = worker(store, Failing())
    with pytest.raises(KeyboardInterrupt):
        w.deliver_batch(runner)
    assert [r["id"] for r in store.outbox_rows({"done"})] == ["e0"]


def test_events_of_one_record_go_out_in_order_while_other_records_proceed(store: Store) -> None:
    save(store, "a1", ("contact:c1",))
    save(store, "b1", ("contact:c2",))
    save(store, "a2", ("contact:c1", "lead:l7"))
    save(store, "c1", ("lead:l7",))
    hook = Recorder({"a1": [Result.retry("HTTP 500")]})
    w, runner = worker(store, hook, backoff_seconds=(3600,))
    drain(w, runner, 3)
    # a1 failed and waits an hour: a2 (same contact) and c1 (same lead as a2) wait behind it.
    assert hook.seen == ["a1", "b1"]
    store.retry_deliveries("crm", {"a1"}, time.time())
    drain(w, runner, 3)
    assert hook.seen == ["a1", "b1", "a1", "a2", "c1"]


def test_a_poisoned_event_is_dead_lettered_and_stops_blocking_its_record(store: Store) -> None:
    save(store, "bad", ("contact:c1",))
    save(store, "next", ("contact:c1",))
    hook = Recorder({"bad": [Result.retry("HTTP 500")] * 100})
    w, runner = worker(store, hook, dead_letter_seconds=1)
    w.deliver_batch(runner)
    assert hook.seen == ["bad"]
    time.sleep(1.1)  # the dead-letter age is wall-clock time by definition
    drain(w, runner, 3)
    assert hook.seen[-1] == "next" and hook.seen.count("next") == 1
    (dead,) = store.outbox_rows({"dead"})
    assert (dead["id"], dead["last_error"]) == ("bad", "HTTP 500")


def test_a_permanent_failure_dead_letters_at_once_and_retry_revives_it(store: Store) -> None:
    save(store, "e1")
    save(store, "e2")
    hook = Recorder({"e1": [Result.failed("HTTP 400")]})
    w, runner = worker(store, hook)
    drain(w, runner, 2)
    assert hook.seen == ["e1", "e2"]
    assert [r["id"] for r in store.outbox_rows({"dead"})] == ["e1"]
    assert store.retry_deliveries(None, {"e1"}, time.time()) == 1
    drain(w, runner, 2)
    assert hook.seen == ["e1", "e2", "e1"]
    assert list(store.outbox_rows({"dead", "pending"})) == []


def test_retry_backs_off_with_jitter_along_the_schedule() -> None:
    import random

    rng = random.Random(1)
    schedule = (5, 300, 1800)
    delays = [backoff(schedule, n, rng) for n in (1, 2, 3, 9)]
    for delay, base in zip(delays, (5, 300, 1800, 1800), strict=True):
        assert 0.8 * base <= delay <= 1.2 * base
    assert len({backoff(schedule, 1, rng) for _ in range(10)}) > 1


def test_receiver_retry_after_sets_the_next_attempt(store: Store) -> None:
    save(store, "e1")
    hook = Recorder({"e1": [Result.retry("HTTP 429", 600.0)]})
    w, runner = worker(store, hook)
    w.deliver_batch(runner)
    (row,) = store.outbox_rows({"pending"})
    next_at = time.mktime(time.strptime(row["next_attempt"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert 590 <= next_at - time.mktime(time.gmtime()) <= 610
    assert row["attempts"] == 1 and row["last_error"] == "HTTP 429"


def test_a_claim_is_a_lease_other_workers_respect_until_it_expires(store: Store) -> None:
    save(store, "e1")
    now = time.time()
    assert [d.event_id for d in store.claim_deliveries("crm", "w1", 10, 30, now)] == ["e1"]
    assert store.claim_deliveries("crm", "w2", 10, 30, now + 29) == []
    assert [d.event_id for d in store.claim_deliveries("crm", "w2", 10, 30, now + 31)] == ["e1"]


def test_gone_disables_the_hook_keeps_its_events_and_cli_enables_it(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    answers = [Response(410)]
    with WebhookReceiver(lambda _r: answers.pop(0) if answers else Response(204)) as receiver:
        url = f"sqlite:///{tmp_path}/db.sqlite"
        config = write_config(
            tmp_path / "s.yaml",
            url,
            f"- {{name: crm, type: webhook, url: '{receiver.url}', secret_file: {secret},"
            " allow_private: true, timeout: 5}",
        )
        store = open_store(url)
        store.upsert_record(BOB)
        for i in range(3):
            save(store, f"e{i}", (f"contact:c{i}",))
        hook = WebhookHook("crm", receiver.url, [b"s3cret"], 5.0, allow_private=True)
        w = OutboxWorker(store, [HookRunner(hook)], OutboxConfig(backoff_seconds=(0,)))
        w.deliver_batch(HookRunner(hook))
        assert len(receiver.received()) == 1
        assert store.disabled_hooks() == {
            "crm": "HTTP 410 Gone: the receiver asked for no more events"
        }
        assert w.deliver_batch(HookRunner(hook)) == 0  # disabled: nothing claimed

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "sentlink", "-c", str(config), *args],
                capture_output=True,
                text=True,
                timeout=60,
            )

        listed = cli("outbox", "list")
        assert "hook crm is DISABLED" in listed.stdout
        rows = [json.loads(x) for x in cli("outbox", "list", "--json").stdout.splitlines()]
        assert [(r["id"], r["state"], r["hook_disabled"]) for r in rows] == [
            ("e0", "pending", True),
            ("e1", "pending", True),
            ("e2", "pending", True),
        ]
        done = cli("outbox", "retry", "--hook", "crm", "--json")
        assert json.loads(done.stdout) == {"retried": 3}, done.stderr
        w.deliver_batch(HookRunner(hook))
        assert [r.json()["id"] for r in receiver.received()] == ["e0", "e0", "e1", "e2"]
        dropped = cli("outbox", "drop", "--all", "--json")
        assert json.loads(dropped.stdout) == {"dropped": 0}
        hook.close()
        store.close()


def test_outbox_drop_needs_a_scope_and_drops_dead_events(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/db.sqlite"
    config = write_config(tmp_path / "s.yaml", url, "- {name: crm, type: command, path: /bin/true}")
    store = open_store(url)
    store.upsert_record(BOB)
    save(store, "e1")
    save(store, "e2")
    store.close()
    base = [sys.executable, "-m", "sentlink", "-c", str(config)]
    refused = subprocess.run([*base, "outbox", "drop"], capture_output=True, text=True)
    assert refused.returncode == 64
    dropped = subprocess.run([*base, "outbox", "drop", "e1"], capture_output=True, text=True)
    assert dropped.stdout == "1 deliveries dropped\n"
    migrate = subprocess.run([*base, "db", "migrate"], capture_output=True, text=True)
    assert migrate.stdout == "store schema at version 2\n"
    left = subprocess.run([*base, "outbox", "list", "--json"], capture_output=True, text=True)
    assert [json.loads(x)["id"] for x in left.stdout.splitlines()] == ["e2"]
