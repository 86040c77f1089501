"""Batched store writes (``Store.batch``) on both backends: many messages per transaction, each
message still all-or-nothing, a crash losing only the open transaction's rows."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pg import PgCluster, running_cluster
from sentlink.errors import StoreError
from sentlink.model import Link, MessageInfo, Participant, Record
from sentlink.store import (
    IndexedFile,
    MessageRows,
    NewEvent,
    SaveRequest,
    Store,
    open_store,
    sql,
)

BOB = Record("contact", "c1", "Bob", ("bob@customer.test",))
_names = itertools.count()


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PgCluster]:
    yield from running_cluster()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/sentlink.db"
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    return cluster.create_database(f"batch{next(_names)}")


@pytest.fixture
def stores(store_url: str) -> Iterator[Callable[[], Store]]:
    """Opens stores on one database: each has its own connections, like another process."""
    opened: list[Store] = []

    def open_one() -> Store:
        opened.append(open_store(store_url))
        return opened[-1]

    yield open_one
    for s in opened:
        s.close()


def info(uniq: str, message_id: str = "", folder: str = "Sent") -> MessageInfo:
    prefix = ".Sent/" if folder == "Sent" else ""
    return MessageInfo(
        "alice",
        folder,
        uniq,
        f"{prefix}cur/{uniq}:2,S",
        "sent",
        message_id or f"{uniq}@x.test",
        "subject",
        "",
        (Participant("bob@customer.test", "to"),),
    )


def link(m: MessageInfo) -> Link:
    return Link("alice", m.message_id, BOB, "bob@customer.test", "to", "address", "sent")


def event(eid: str, hooks: tuple[str, ...] = ("crm",)) -> NewEvent:
    return NewEvent(eid, "message.linked", "{}", ("contact:c1",), hooks, 1.0)


def save(store: Store, uniq: str, hooks: tuple[str, ...] = ("crm",)) -> bool:
    m = info(uniq)
    return store.save_message(m, [link(m)], [event(f"e-{uniq}", hooks)])


def indexed(store: Store) -> set[str]:
    return set(store.folder_files("alice", "Sent"))


def test_batched_writes_are_seen_by_the_writer_and_committed_when_the_block_ends(
    stores: Callable[[], Store],
) -> None:
    writer, other = stores(), stores()
    writer.upsert_record(BOB)
    with writer.batch(max_writes=100, max_seconds=3600):
        assert save(writer, "u1") and save(writer, "u2")
        assert writer.has_message("alice", "u1")
        assert not save(writer, "u1")  # idempotence sees the uncommitted row
        assert indexed(other) == set()
    assert indexed(other) == {"u1", "u2"}
    assert len(list(other.query_links())) == 2
    assert len(list(other.outbox_rows({"pending"}))) == 2


def test_a_batch_commits_every_max_writes(stores: Callable[[], Store]) -> None:
    writer, other = stores(), stores()
    writer.upsert_record(BOB)
    with writer.batch(max_writes=2, max_seconds=3600):
        for n in range(3):
            save(writer, f"u{n}")
        assert indexed(other) == {"u0", "u1"}
    assert indexed(other) == {"u0", "u1", "u2"}


def test_a_failing_message_leaves_none_of_its_rows_and_the_batch_goes_on(
    stores: Callable[[], Store],
) -> None:
    writer, other = stores(), stores()
    writer.upsert_record(BOB)
    with writer.batch(max_writes=100, max_seconds=3600):
        save(writer, "good1")
        with pytest.raises(StoreError):
            save(writer, "bad", hooks=("crm", "crm"))  # the second delivery row breaks a key
        save(writer, "good2")
    assert indexed(other) == {"good1", "good2"}
    assert {r["message_id"] for r in other.query_links()} == {"good1@x.test", "good2@x.test"}
    assert {r["id"] for r in other.outbox_rows({"pending"})} == {"e-good1", "e-good2"}


def test_before_commit_runs_before_the_rows_are_committed(stores: Callable[[], Store]) -> None:
    writer, other = stores(), stores()
    writer.upsert_record(BOB)
    seen_at_hook: list[set[str]] = []
    with writer.batch(
        max_writes=2, max_seconds=3600, before_commit=lambda: seen_at_hook.append(indexed(other))
    ):
        for n in range(3):
            save(writer, f"u{n}")
    assert seen_at_hook == [set(), {"u0", "u1"}]


def test_a_nested_batch_joins_the_open_one_and_commits_when_it_ends(
    stores: Callable[[], Store],
) -> None:
    writer, other = stores(), stores()
    writer.upsert_record(BOB)
    hooks: list[str] = []
    with writer.batch(
        max_writes=100, max_seconds=3600, before_commit=lambda: hooks.append("outer")
    ):
        save(writer, "u1")
        with writer.batch(before_commit=lambda: hooks.append("inner")):
            save(writer, "u2")
        assert indexed(other) == {"u1", "u2"}
        save(writer, "u3")
    assert hooks == ["outer", "inner", "outer"]
    assert indexed(other) == {"u1", "u2", "u3"}


def test_bulk_lookups_list_a_folders_files_and_a_messages_copies(
    stores: Callable[[], Store],
) -> None:
    store = stores()
    first, copy, inbox = info("u1", "m@x"), info("u2", "m@x"), info("u3", "n@x", folder="INBOX")
    assert store.save_message(first, [])
    assert not store.save_message(copy, [])  # a second copy of the message: its file is kept
    assert store.save_message(inbox, [])
    assert store.folder_files("alice", "Sent") == {
        "u1": ".Sent/cur/u1:2,S",
        "u2": ".Sent/cur/u2:2,S",
    }
    assert store.account_uniqs("alice") == {"u1", "u2", "u3"}
    assert store.message_files("alice", "m@x") == [
        IndexedFile("u1", "Sent", ".Sent/cur/u1:2,S"),
        IndexedFile("u2", "Sent", ".Sent/cur/u2:2,S"),
    ]
    assert store.message_files("alice", "") == []
    assert store.message_files("bob", "m@x") == []


CRASH_MID_BATCH = """
import os, sys
from sentlink.model import Link, MessageInfo, Participant, Record
from sentlink.store import NewEvent, open_store
store = open_store(sys.argv[1])
bob = Record("contact", "c1", "Bob", ("bob@customer.test",))
store.upsert_record(bob)
with store.batch(max_writes=10, max_seconds=3600):
    for n in range(25):
        m = MessageInfo("alice", "Sent", f"u{n}", f".Sent/cur/u{n}", "sent", f"{n}@x", "s", "",
                        (Participant("bob@customer.test", "to"),))
        link = Link("alice", m.message_id, bob, "bob@customer.test", "to", "address", "sent")
        ev = NewEvent(f"e{n}", "message.linked", "{}", ("contact:c1",), ("crm",), 1.0)
        store.save_message(m, [link], [ev])
    os._exit(3)  # killed mid-batch: 20 messages committed, 5 in the open transaction
"""


def test_a_crash_mid_batch_loses_only_the_open_transactions_rows_and_never_half_a_message(
    store_url: str, stores: Callable[[], Store]
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_MID_BATCH, store_url], capture_output=True, timeout=60
    )
    assert proc.returncode == 3, proc.stderr.decode()
    store = stores()
    assert indexed(store) == {f"u{n}" for n in range(20)}
    linked = {r["message_id"] for r in store.query_links()}
    events = {r["id"] for r in store.outbox_rows({"pending"})}
    assert linked == {f"{n}@x" for n in range(20)}
    assert events == {f"e{n}" for n in range(20)}
    # The next pass (a rescan re-reading the Maildir) writes the lost ones again.
    with store.batch():
        for n in range(25):
            m = MessageInfo(
                "alice",
                "Sent",
                f"u{n}",
                f".Sent/cur/u{n}",
                "sent",
                f"{n}@x",
                "s",
                "",
                (Participant("bob@customer.test", "to"),),
            )
            store.save_message(
                m, [Link("alice", m.message_id, BOB, "bob@customer.test", "to", "address", "sent")]
            )
    assert indexed(store) == {f"u{n}" for n in range(25)}


def test_many_messages_at_once_answer_as_one_by_one(stores: Callable[[], Store]) -> None:
    """``save_messages``: what ``save_message`` in order would answer and write, each message
    all-or-nothing, whether the backend writes the group in a few statements or not."""
    store = stores()
    store.upsert_record(BOB)
    assert save(store, "old")
    ghost = Record("contact", "gone", "Ghost", ("ghost@customer.test",))
    fresh = [info(f"n{i}") for i in range(5)]
    copy = info("copy", message_id=fresh[1].message_id)  # same Message-ID as an earlier one
    again = info("old", message_id="other@x.test")  # this file is indexed already
    broken = info("broken")  # links a record that does not exist: fails on its own
    requests = [
        *(SaveRequest(m, [link(m)], [event(f"e-{m.uniq}")]) for m in fresh[:3]),
        SaveRequest(copy, [link(copy)]),
        SaveRequest(again, [link(again)]),
        SaveRequest(
            broken,
            [
                Link(
                    "alice",
                    broken.message_id,
                    ghost,
                    "ghost@customer.test",
                    "to",
                    "address",
                    "sent",
                )
            ],
        ),
        *(SaveRequest(m, [link(m)], [], ["dana@newco.test"]) for m in fresh[3:]),
    ]
    with store.batch():
        answers = store.save_messages(requests)
    assert answers[:5] == [True, True, True, False, False]
    assert isinstance(answers[5], StoreError)
    assert answers[6:] == [True, True]
    assert indexed(store) == {"old", "copy", *(m.uniq for m in fresh)}  # "copy": another file
    assert [f.uniq for f in store.message_files("alice", fresh[1].message_id)] == ["n1", "copy"]
    assert {r["email"] for r in store.unmatched_addresses("alice")} == {"dana@newco.test"}
    assert len(list(store.outbox_rows({"pending"}))) == 4  # "old" and n0..n2


def test_a_group_of_new_messages_is_written_like_one_by_one(stores: Callable[[], Store]) -> None:
    one, many = stores(), stores()
    for store in (one, many):
        store.upsert_record(BOB)
    group = [info(f"g{i}") for i in range(20)]
    with one.batch():
        for m in group:
            assert one.save_message(m, [link(m)], [event(f"e-{m.uniq}")], ["x@y.test"])
    one.forget_account("alice")  # the same database: write the same rows again, in one go
    with many.batch():
        answers = many.save_messages(
            [SaveRequest(m, [link(m)], [event(f"e2-{m.uniq}")], ["x@y.test"]) for m in group]
        )
    assert answers == [True] * 20
    rows = list(many.query_links(account="alice"))
    assert [r["file"] for r in rows] == [m.file for m in group]  # indexing order kept
    assert {r["record"]["id"] for r in rows} == {"c1"}


@pytest.mark.parametrize("all_new", [True, False], ids=["all-new", "some-refused"])
def test_rows_are_written_as_the_requests_they_stand_for(
    stores: Callable[[], Store], all_new: bool
) -> None:
    """``save_rows``: what ``save_messages`` of the same requests answers and writes, whether
    the group goes in a few statements (all new) or one by one (a unique key refuses one)."""
    store = stores()
    store.upsert_record(BOB)
    fresh = [info(f"n{i}") for i in range(4)]
    requests = [
        SaveRequest(fresh[0], [link(fresh[0])], [], ["dana@newco.test"]),
        SaveRequest(fresh[1], []),
        *(SaveRequest(m, [link(m)]) for m in fresh[2:]),
    ]
    if not all_new:
        copy = info("copy", message_id=fresh[1].message_id)  # same Message-ID as an earlier one
        ghost = Record("contact", "gone", "Ghost", ("ghost@customer.test",))
        broken = info("broken")  # links a record that does not exist: fails on its own
        gone = Link("alice", broken.message_id, ghost, "ghost@x.test", "to", "address", "sent")
        requests[2:2] = [SaveRequest(copy, [link(copy)]), SaveRequest(broken, [gone])]
    rows = [MessageRows.of(r) for r in requests]
    assert all(r is not None for r in rows)

    def written() -> tuple[object, ...]:
        return (
            list(store.query_links(account="alice")),
            store.folder_files("alice", "Sent"),
            sorted(r["email"] for r in store.unmatched_addresses("alice")),
            [f.uniq for f in store.message_files("alice", fresh[1].message_id)],
        )

    def shown(answers: list[bool | StoreError]) -> list[object]:
        return [a if isinstance(a, bool) else "error" for a in answers]

    with store.batch():
        expected = shown(store.save_messages(requests))
    wrote = written()
    store.forget_account("alice")  # the same database: the same rows again, as rows
    with store.batch():
        answers = shown(store.save_rows([r for r in rows if r is not None]))
    assert answers == expected
    assert written() == wrote
    assert expected == ([True] * 4 if all_new else [True, True, False, "error", True, True])


@pytest.mark.parametrize("refused", ["message-id", "file", "link"])
def test_a_refused_row_in_a_group_leaves_no_trace_and_the_others_are_written(
    stores: Callable[[], Store], refused: str
) -> None:
    """SQLite writes a group of rows in a few statements without a savepoint. When it refuses
    one message (its Message-ID or its file indexed already, a link to no record), what the
    statements wrote is deleted again and the group goes one by one: the others are written
    once each, the refused one as one by one would have it, and the batch goes on."""
    store, other = stores(), stores()
    store.upsert_record(BOB)
    old = info("old")
    assert store.save_message(old, [link(old)])
    fresh = [info(f"n{i}") for i in range(4)]
    if refused == "message-id":
        odd = info("copy", message_id=old.message_id)  # another copy of an indexed message
        odd_links = [link(odd)]
    elif refused == "file":
        odd = info("old", message_id="other@x.test")
        odd_links = [link(odd)]
    else:
        ghost = Record("contact", "gone", "Ghost", ("ghost@customer.test",))
        odd = info("broken")
        odd_links = [
            Link("alice", odd.message_id, ghost, "ghost@customer.test", "to", "address", "sent")
        ]
    requests = [
        *(SaveRequest(m, [link(m)], [], ["dana@newco.test"]) for m in fresh[:2]),
        SaveRequest(odd, odd_links, [], ["erin@newco.test"]),
        *(SaveRequest(m, [link(m)]) for m in fresh[2:]),
    ]
    rows = [MessageRows.of(r) for r in requests]
    with store.batch(max_writes=1000, max_seconds=3600):
        answers = store.save_rows([r for r in rows if r is not None])
        assert save(store, "after")
    assert len(rows) == 5 and answers[:2] == [True, True] and answers[3:] == [True, True]
    if refused == "link":
        assert isinstance(answers[2], StoreError)
    else:
        assert answers[2] is False
    copies = {"copy"} if refused == "message-id" else set()
    assert indexed(other) == {"old", "after", *(m.uniq for m in fresh)} | copies
    assert sorted(r["message_id"] for r in other.query_links(account="alice")) == sorted(
        [old.message_id, "after@x.test", *(m.message_id for m in fresh)]
    )
    unmatched = other.unmatched_addresses("alice")
    assert [(r["email"], r["messages"]) for r in unmatched] == [("dana@newco.test", 2)]
    assert [f.uniq for f in other.message_files("alice", old.message_id)] == ["old", *copies]


def test_a_refused_row_whose_rows_cannot_be_deleted_again_aborts_the_batch(
    tmp_path: Path,
) -> None:
    """If taking back a refused group's rows fails too, the batch's whole transaction is rolled
    back (the next rescan writes it again: the Maildir is the queue) rather than committed
    with part of a group; later writes go on in a new transaction."""
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    try:
        store.upsert_record(BOB)
        old = info("old")
        assert store.save_message(old, [link(old)])
        fresh = [info(f"n{i}") for i in range(3)]
        copy = info("copy", message_id=old.message_id)
        rows = [MessageRows.of(SaveRequest(m, [link(m)])) for m in [fresh[0], copy, *fresh[1:]]]
        conn = store._conn()  # type: ignore[attr-defined]
        conn.execute(
            "CREATE TEMP TRIGGER no_delete BEFORE DELETE ON messages"
            " BEGIN SELECT RAISE(ABORT, 'deleting refused'); END"
        )
        with store.batch(max_writes=1000, max_seconds=3600):
            assert save(store, "before")  # in the batch's transaction, not committed yet
            answers = store.save_rows([r for r in rows if r is not None])
            conn.execute("DROP TRIGGER temp.no_delete")
            assert save(store, "after")
        assert answers == [True, False, True, True]  # one by one, in a new transaction
        assert indexed(store) == {"old", "copy", "after", *(m.uniq for m in fresh)}
    finally:
        store.close()


def test_a_request_rows_cannot_say_has_none() -> None:
    m = info("x")
    assert MessageRows.of(SaveRequest(m, [link(m)], [event("e")])) is None
    assert MessageRows.of(SaveRequest(m, [link(m)], new_records=[BOB])) is None
    private = MessageInfo(**{**m.__dict__, "private": True})
    assert MessageRows.of(SaveRequest(private, [])) is None
    rows = MessageRows.of(SaveRequest(m, [link(m)], [], ["dana@newco.test"]))
    assert rows is not None
    assert rows.links == (("contact", "c1", "bob@customer.test", "to", "address"),)
    assert rows.unmatched == ("dana@newco.test",)
    assert rows.request().info == MessageInfo(**{**m.__dict__, "participants": ()})


def test_records_answers_follow_another_connections_import_within_a_batch(
    stores: Callable[[], Store],
) -> None:
    """The batch keeps records answers between its transactions only while nobody else wrote:
    a record another connection commits meanwhile is seen from the next transaction on."""
    watcher, importer = stores(), stores()
    watcher.upsert_record(BOB)
    dana = Record("contact", "c2", "Dana", ("dana@newco.test",))
    with watcher.batch(max_writes=1):
        assert watcher.records_by_email("dana@newco.test") == []
        assert save(watcher, "a")  # commits (max_writes=1)
        assert watcher.records_by_email("dana@newco.test") == []
        importer.upsert_record(dana)
        assert watcher.records_by_email("dana@newco.test") == [dana]
        assert save(watcher, "b")
        assert watcher.records_by_email("dana@newco.test") == [dana]


@pytest.mark.parametrize("whole", [True, False], ids=["crm-loaded-whole", "per-chunk"])
def test_records_looked_up_together_answer_as_one_by_one(
    stores: Callable[[], Store], whole: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not whole:  # a CRM above the size that is loaded whole
        monkeypatch.setattr(sql, "PRELOAD_ADDRESSES", 0)
    store = stores()
    shared = Record("lead", "l9", "Shared", ("bob@customer.test", "b.shared@customer.test"))
    two = Record("contact", "c7", "Two", ("two@customer.test", "bob.two@customer.test"))
    store.upsert_records([BOB, shared, two])
    emails = ["bob@customer.test", "two@customer.test", "bob.two@customer.test", "nobody@x.test"]
    expected = {e: store.records_by_email(e) for e in emails}
    assert [r.kind for r in expected["bob@customer.test"]] == ["contact", "lead"]
    with store.batch():
        store.prime_records(emails)
        primed = {e: store.records_by_email(e) for e in emails}
        # The primed answers follow another connection's import like any other.
        stores().upsert_record(Record("contact", "c8", "Late", ("nobody@x.test",)))
        assert [r.id for r in store.records_by_email("nobody@x.test")] == ["c8"]
    assert primed == expected


# 0: every account is above the size that is loaded whole; looked up per chunk.
@pytest.mark.parametrize("preload", [sql.PRELOAD_THREAD_LINKS, 0], ids=["whole", "per-chunk"])
def test_thread_links_looked_up_together_follow_every_write(
    stores: Callable[[], Store], preload: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql, "PRELOAD_THREAD_LINKS", preload)
    store, other = stores(), stores()
    dana = Record("contact", "c2", "Dana", ("dana@newco.test",))
    store.upsert_records([BOB, dana])
    assert save(store, "old")
    new = [info(f"n{i}") for i in range(3)]

    def thread(m: str) -> list[str]:
        return [r.id for r in store.linked_records_for_message_ids("alice", [f"{m}@x.test"])]

    def files(m: str) -> list[str]:
        return [f.uniq for f in store.message_files("alice", f"{m}@x.test")]

    with store.batch(max_writes=1):  # each write commits: the other store can write too
        store.prime_thread_links("alice", ["old@x.test", "n0@x.test", "n1@x.test", "nix@x.test"])
        assert (thread("old"), thread("n0"), thread("nix")) == (["c1"], [], [])
        assert (files("old"), files("n0")) == (["old"], [])
        assert store.save_messages([SaveRequest(m, [link(m)]) for m in new[:2]]) == [True] * 2
        assert store.save_message(new[2], [link(new[2])])
        assert (thread("n0"), thread("n1"), thread("n2")) == (["c1"], ["c1"], ["c1"])
        assert (files("n0"), files("n1"), files("n2")) == (["n0"], ["n1"], ["n2"])
        assert not store.save_message(info("copy", "n2@x.test"), [])
        assert files("n2") == ["n2", "copy"]
        dana_link = Link("alice", "old@x.test", dana, "dana@newco.test", "to", "address", "sent")
        assert store.add_links(info("old"), [dana_link]) == 1
        assert thread("old") == ["c1", "c2"]
        late = info("late")
        assert other.save_message(late, [link(late)])
        assert (thread("late"), files("late")) == (["c1"], ["late"])
        assert store.forget_messages([("alice", "n0")]) == 1
        assert (thread("n0"), files("n0")) == ([], [])


def test_primed_records_are_answered_from_the_batch_transaction(pg_cluster: PgCluster) -> None:
    # PostgreSQL: another connection can commit while the batch's transaction is open (with
    # SQLite the batch holds the write lock, so nobody can).
    url = pg_cluster.create_database(f"batch{next(_names)}")
    store, importer = open_store(url), open_store(url)
    try:
        store.upsert_record(BOB)
        with store.batch(max_writes=100):
            assert save(store, "a")  # the batch's transaction is open from here on
            store.prime_records(["late@x.test"])
            importer.upsert_record(Record("contact", "c8", "Late", ("late@x.test",)))
            # Looked up once for the whole chunk and kept for the transaction: the import
            # committed meanwhile is seen from the next transaction on.
            assert store.records_by_email("late@x.test") == []
        assert [r.id for r in store.records_by_email("late@x.test")] == ["c8"]
    finally:
        store.close()
        importer.close()
