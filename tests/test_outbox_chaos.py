"""At-least-once delivery under fire: a flaky, sometimes-down receiver and a worker SIGKILLed
at random. Every event arrives (2xx) at least once, repeats are retries of the same id, each
record's events first arrive in order, and every request is signed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from hookutil import load_example_verifier, write_config
from sentlink.model import Link, MessageInfo, Participant, Record
from sentlink.store import NewEvent, open_store
from sentlink.testing import ReceivedRequest, Response, WebhookReceiver

EVENTS = 10_000
RECORDS = 500
SECRET = b"chaos-secret"


def fill_outbox(url: str) -> dict[str, str]:
    """EVENTS linked messages with their events; returns event id -> record key."""
    store = open_store(url)
    records = [
        Record("contact", f"c{i}", f"C{i}", (f"c{i}@customer.test",)) for i in range(RECORDS)
    ]
    store.upsert_records(records)
    owner: dict[str, str] = {}
    now = time.time()
    for i in range(EVENTS):
        record = records[i % RECORDS]
        eid = f"msg_{i:05d}"
        msg = MessageInfo(
            "alice",
            "Sent",
            eid,
            eid,
            "sent",
            f"{eid}@example.test",
            "s",
            "",
            (Participant(record.emails[0], "to"),),
        )
        body = json.dumps({"id": eid, "type": "message.linked", "timestamp": "", "data": {"n": i}})
        key = f"contact:{record.id}"
        ev = NewEvent(eid, "message.linked", body, (key,), ("crm",), now)
        link = Link("alice", msg.message_id, record, record.emails[0], "to", "address", "sent")
        assert store.save_message(msg, [link], [ev])
        owner[eid] = key
    store.close()
    return owner


def test_every_event_arrives_despite_500s_downtime_and_a_sigkilled_worker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/outbox.db"
    owner = fill_outbox(url)
    rng = random.Random(5)
    lock = threading.Lock()
    answered: list[tuple[str, int]] = []

    def flaky(request: ReceivedRequest) -> Response:
        status = 500 if rng.random() < 0.3 else 204
        with lock:
            answered.append((request.headers.get("webhook-id", ""), status))
        return Response(status)

    secret_file = tmp_path / "webhook.secret"
    secret_file.write_text(SECRET.decode() + "\n")
    receiver = WebhookReceiver(flaky)
    receiver.up()
    config = write_config(
        tmp_path / "sentlink.yaml",
        url,
        f"- {{name: crm, type: webhook, url: '{receiver.url}', secret_file: {secret_file},"
        " allow_private: true, timeout: 5}",
        "{backoff_seconds: [0, 1], lease_seconds: 6, batch: 100, poll_seconds: 1}",
    )
    log = (tmp_path / "worker.log").open("ab")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "sentlink", "-c", str(config), "worker"],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )

    def delivered() -> set[str]:
        with lock:
            return {eid for eid, status in answered if status == 204}

    proc = start()
    kills = 0
    outage_done = False
    deadline = time.monotonic() + 170
    try:
        while len(delivered()) < EVENTS:
            assert time.monotonic() < deadline, f"only {len(delivered())} of {EVENTS} delivered"
            time.sleep(rng.uniform(0.5, 2.5))
            if kills < 6:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                proc = start()
            if not outage_done and len(delivered()) > EVENTS // 3:
                receiver.down()
                time.sleep(2.0)
                receiver.up()
                outage_done = True
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        receiver.down()
        log.close()

    requests = receiver.received()
    assert kills == 6 and outage_done
    # None lost; nothing but our ids; repeats are retries of an id, never a new id.
    assert delivered() == set(owner)
    assert {r.headers["webhook-id"] for r in requests} == set(owner)
    assert all(r.json()["id"] == r.headers["webhook-id"] for r in requests)
    # Per record, events first arrived in the order they were written.
    first: dict[str, list[str]] = {}
    seen: set[str] = set()
    for eid, status in answered:
        if status == 204 and eid not in seen:
            seen.add(eid)
            first.setdefault(owner[eid], []).append(eid)
    assert all(ids == sorted(ids) for ids in first.values())
    # Every request verifies with the example receiver-side verifier; tampering does not.
    verifier = load_example_verifier()
    for r in requests:
        h = r.headers
        args = (h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"])
        assert verifier.verify([SECRET], *args, r.body, now=r.received_at)
    h = requests[0].headers
    assert not verifier.verify(
        [SECRET],
        h["webhook-id"],
        h["webhook-timestamp"],
        h["webhook-signature"],
        requests[0].body + b" ",
        now=requests[0].received_at,
    )
    assert not verifier.verify(
        [SECRET],
        h["webhook-id"],
        str(int(h["webhook-timestamp"]) + 1),
        h["webhook-signature"],
        requests[0].body,
        now=requests[0].received_at,
    )
    duplicates = len(requests) - EVENTS
    print(f"\n{EVENTS} events, {len(requests)} requests ({duplicates} retries), {kills} kills")
