"""Outbox benchmark: events/s to a loopback webhook (SQLite, PostgreSQL) and the linker's cost
per message with the outbox on (one hook configured) vs off.

    .venv/bin/python bench/outbox.py [--events N] [--messages N] [--no-postgres]

PostgreSQL runs in a private cluster (tests/pg.py; needs root and the postgresql package).
Prints one line per figure; the baseline named in each ratio is the SQLite/outbox-off run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from sentlink.config import load_config_text  # noqa: E402
from sentlink.config.models import OutboxConfig  # noqa: E402
from sentlink.hooks.webhook import WebhookHook  # noqa: E402
from sentlink.linker import Linker  # noqa: E402
from sentlink.model import Link, MessageInfo, Participant, Record  # noqa: E402
from sentlink.outbox import HookRunner, OutboxWorker  # noqa: E402
from sentlink.store import NewEvent, Store, open_store  # noqa: E402
from sentlink.testing import WebhookReceiver  # noqa: E402


def fill(store: Store, events: int) -> None:
    records = [Record("contact", f"c{i}", f"C{i}", (f"c{i}@customer.test",)) for i in range(200)]
    store.upsert_records(records)
    for i in range(events):
        record = records[i % len(records)]
        eid = f"msg_{i:06d}"
        msg = MessageInfo(
            "alice", "Sent", eid, eid, "sent", eid, "s", "", (Participant(record.emails[0], "to"),)
        )
        body = json.dumps({"id": eid, "type": "message.linked", "timestamp": "", "data": {}})
        ev = NewEvent(eid, "message.linked", body, (f"contact:{record.id}",), ("crm",), time.time())
        link = Link("alice", eid, record, record.emails[0], "to", "address", "sent")
        store.save_message(msg, [link], [ev])


def outbox_rate(url: str, events: int) -> float:
    store = open_store(url)
    fill(store, events)
    with WebhookReceiver() as receiver:
        hook = WebhookHook("crm", receiver.url, [b"secret"], 30.0, allow_private=True)
        runner = HookRunner(hook)
        worker = OutboxWorker(store, [runner], OutboxConfig(batch=100))
        start = time.perf_counter()
        while len(receiver.requests) < events:
            if worker.deliver_batch(runner) == 0:
                time.sleep(0.01)
        elapsed = time.perf_counter() - start
        hook.close()
    store.close()
    return events / elapsed


def linker_cost(tmp: Path, messages: int, with_hook: bool) -> float:
    """Seconds per message for Linker.link_file over fresh Maildir files."""
    name = "on" if with_hook else "off"
    maildir = tmp / f"mail-{name}"
    cur = maildir / ".Sent" / "cur"
    cur.mkdir(parents=True)
    for i in range(messages):
        (cur / f"1700000000.M{i}P1.bench,S=200:2,S").write_bytes(
            f"From: alice@example.test\r\nTo: c{i % 200}@customer.test\r\nSubject: s {i}\r\n"
            f"Message-ID: <{name}-{i}@example.test>\r\n\r\nbody\r\n".encode()
        )
    hooks = "hooks: [{name: crm, type: command, path: /bin/true}]" if with_hook else ""
    config = load_config_text(
        textwrap.dedent(f"""\
            internal_domains: [example.test]
            accounts: [{{name: alice, addresses: [alice@example.test], maildir: {maildir}}}]
            {hooks}
            """),
        "bench.yaml",
    )
    store = open_store(f"sqlite:///{tmp}/linker-{name}.db")
    store.upsert_records(
        Record("contact", f"c{i}", f"C{i}", (f"c{i}@customer.test",)) for i in range(200)
    )
    linker = Linker(store, config)
    account = config.accounts[0]
    files = sorted(cur.iterdir())
    start = time.perf_counter()
    for path in files:
        linker.link_file(account, "Sent", path, "sent")
    elapsed = time.perf_counter() - start
    store.close()
    return elapsed / messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sentlink-bench-") as name:
        tmp = Path(name)
        sqlite_rate = outbox_rate(f"sqlite:///{tmp}/outbox.db", args.events)
        print(f"outbox sqlite:     {sqlite_rate:8.0f} events/s to a loopback webhook")
        if not args.no_postgres:
            from pg import pg_problem, running_cluster

            problem = pg_problem()
            if problem:
                print(f"outbox postgresql: skipped ({problem})")
            else:
                clusters = running_cluster()
                cluster = next(clusters)
                try:
                    pg_rate = outbox_rate(cluster.url(), args.events)
                finally:
                    clusters.close()
                print(
                    f"outbox postgresql: {pg_rate:8.0f} events/s"
                    f" ({pg_rate / sqlite_rate:.2f}x sqlite)"
                )
        off = linker_cost(tmp, args.messages, with_hook=False)
        on = linker_cost(tmp, args.messages, with_hook=True)
        print(f"linker, outbox off: {off * 1e6:7.0f} us/message (baseline)")
        print(f"linker, outbox on:  {on * 1e6:7.0f} us/message ({on / off:.2f}x baseline)")


if __name__ == "__main__":
    main()
