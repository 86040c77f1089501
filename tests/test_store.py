from __future__ import annotations

import io
import json
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sentlink.errors import StoreError
from sentlink.links_query import format_table, iter_links, write_json_lines
from sentlink.model import Link, MessageInfo, Participant, Record
from sentlink.store import Store, open_store
from sentlink.store.schema import MIGRATIONS, migrate, schema_version
from sentlink.store.sqlite import SqliteStore, sqlite_path

BOB = Record("contact", "c1", "Bob Buyer", ("bob@customer.test",))
LEAD = Record("lead", "l1", "Lee Lead", ("lee@prospect.test", "lee@alt.test"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path}/db/sentlink.db")
    yield s
    s.close()


def message(uniq: str, message_id: str = "", account: str = "alice", **kw: object) -> MessageInfo:
    fields: dict[str, object] = {
        "account": account,
        "folder": "Sent",
        "uniq": uniq,
        "file": f".Sent/cur/{uniq}:2,S",
        "direction": "sent",
        "message_id": message_id,
        "subject": f"subject {uniq}",
        "date": "2024-05-01T10:00:00+00:00",
        "participants": (Participant("bob@customer.test", "to"),),
    }
    fields.update(kw)
    return MessageInfo(**fields)  # type: ignore[arg-type]


def link(info: MessageInfo, record: Record, role: str = "to", via: str = "address") -> Link:
    return Link(
        account=info.account,
        message_id=info.message_id,
        record=record,
        email=record.emails[0],
        role=role,  # type: ignore[arg-type]
        via=via,  # type: ignore[arg-type]
        direction=info.direction,
    )


def test_sqlite_url_takes_relative_and_absolute_paths() -> None:
    assert sqlite_path("sqlite:///./var/sentlink.db") == Path("./var/sentlink.db")
    assert sqlite_path("sqlite:///var/sentlink.db") == Path("var/sentlink.db")
    assert sqlite_path("sqlite:////srv/sentlink.db") == Path("/srv/sentlink.db")


def test_unknown_store_url_is_refused_with_a_store_error() -> None:
    with pytest.raises(StoreError):
        open_store("mysql://db/sentlink")
    with pytest.raises(StoreError):
        open_store("sqlite:///:memory:")


def test_open_creates_parent_directory_and_a_private_database_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "sentlink.db"
    open_store(f"sqlite:///{path}").close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_database_uses_wal_and_enforces_foreign_keys(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "s.db")
    conn = s._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    s.close()


def test_migrations_run_once_and_reopening_keeps_data(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    first = open_store(url)
    first.upsert_record(BOB)
    first.close()
    second = open_store(url)
    assert second.records_by_email("bob@customer.test") == [BOB]
    second.close()
    conn = sqlite3.connect(tmp_path / "s.db")
    assert schema_version(conn) == len(MIGRATIONS)
    conn.close()


def test_migrate_applies_only_the_steps_a_database_has_not_seen(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    steps = [("CREATE TABLE one (x)",), ("CREATE TABLE two (x)",)]
    assert migrate(conn, steps[:1]) == 1
    assert migrate(conn, steps) == 1  # would fail if step 1 ran again: table one exists
    assert migrate(conn, steps) == 0
    assert schema_version(conn) == 2
    conn.close()


def test_failed_migration_leaves_the_version_unchanged(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    with pytest.raises(sqlite3.Error):
        migrate(conn, [("CREATE TABLE ok (x)", "NOT SQL")])
    assert schema_version(conn) == 0
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'ok'").fetchone()[0] == 0
    conn.close()


def test_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "new.db")
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        open_store(f"sqlite:///{tmp_path}/new.db")


def test_upsert_replaces_the_address_set_and_name(store: Store) -> None:
    store.upsert_record(LEAD)
    store.upsert_record(Record("lead", "l1", "Lee L.", ("LEE@Alt.test",)))
    assert store.records_by_email("lee@prospect.test") == []
    assert store.records_by_email("lee@alt.test") == [
        Record("lead", "l1", "Lee L.", ("lee@alt.test",))
    ]


def test_records_by_email_lists_contacts_before_leads(store: Store) -> None:
    shared = "shared@customer.test"
    store.upsert_records(
        [Record("lead", "a", "", (shared,)), Record("contact", "z", "", (shared,))]
    )
    assert [(r.kind, r.id) for r in store.records_by_email(shared)] == [
        ("contact", "z"),
        ("lead", "a"),
    ]


def test_save_message_is_idempotent_on_unique_name(store: Store) -> None:
    store.upsert_record(BOB)
    info = message("u1", "m1@example.test")
    assert store.save_message(info, [link(info, BOB)]) is True
    assert store.save_message(info, [link(info, BOB)]) is False
    assert store.has_message("alice", "u1")
    assert len(list(store.query_links())) == 1


def test_same_message_id_in_another_file_is_not_linked_again_but_remembered(store: Store) -> None:
    store.upsert_record(BOB)
    first = message("u1", "m1@example.test")
    copy = message("u2", "m1@example.test")
    assert store.save_message(first, [link(first, BOB)])
    assert store.save_message(copy, [link(copy, BOB)]) is False
    assert store.has_message("alice", "u2")  # the rescan will not parse the copy again
    assert len(list(store.query_links())) == 1


def test_message_id_is_per_account(store: Store) -> None:
    store.upsert_record(BOB)
    a = message("u1", "m1@example.test", account="alice")
    b = message("u1", "m1@example.test", account="bert")
    assert store.save_message(a, [link(a, BOB)])
    assert store.save_message(b, [link(b, BOB)])
    assert {row["account"] for row in store.query_links()} == {"alice", "bert"}


def test_messages_without_message_id_are_told_apart_by_file(store: Store) -> None:
    assert store.save_message(message("u1"), [])
    assert store.save_message(message("u2"), [])


def test_thread_lookup_returns_records_linked_in_this_account_only(store: Store) -> None:
    store.upsert_records([BOB, LEAD])
    mine = message("u1", "m1@example.test")
    theirs = message("u2", "m2@example.test", account="bert")
    store.save_message(mine, [link(mine, BOB)])
    store.save_message(theirs, [link(theirs, LEAD)])
    found = store.linked_records_for_message_ids("alice", ["m1@example.test", "m2@example.test"])
    assert found == [BOB]
    assert store.linked_records_for_message_ids("alice", []) == []


def test_move_message_records_the_new_location(store: Store) -> None:
    store.save_message(message("u1"), [])
    assert store.move_message("alice", "u1", "Archive", ".Archive/cur/u1:2,ST")
    assert store.message_location("alice", "u1") == ("Archive", ".Archive/cur/u1:2,ST")
    assert store.move_message("alice", "nope", "Sent", "x") is False


def test_forget_missing_drops_gone_files_with_their_links(store: Store) -> None:
    store.upsert_record(BOB)
    kept, gone = message("u1", "m1@x.test"), message("u2", "m2@x.test")
    store.save_message(kept, [link(kept, BOB)])
    store.save_message(gone, [link(gone, BOB)])
    assert store.forget_missing("alice", {"u1"}) == 1
    assert not store.has_message("alice", "u2")
    assert [r["message_id"] for r in store.query_links()] == ["m1@x.test"]
    assert store.forget_missing("alice", {"u1"}, folder="Other") == 0


def test_forget_missing_keeps_a_message_while_another_copy_remains(store: Store) -> None:
    store.upsert_record(BOB)
    first, copy = message("u1", "m1@x.test"), message("u2", "m1@x.test", folder="INBOX")
    store.save_message(first, [link(first, BOB)])
    store.save_message(copy, [])
    assert store.forget_missing("alice", {"u2"}) == 1
    rows = list(store.query_links())
    assert [(r["message_id"], r["folder"]) for r in rows] == [("m1@x.test", "INBOX")]


def test_forget_account_drops_its_messages_but_keeps_records(store: Store) -> None:
    store.upsert_record(BOB)
    info = message("u1", "m1@x.test")
    store.save_message(info, [link(info, BOB)])
    assert store.forget_account("alice") == 1
    assert not store.has_message("alice", "u1")
    assert list(store.query_links()) == []
    assert store.records_by_email("bob@customer.test") == [BOB]


def test_store_serves_several_threads_at_once(store: Store) -> None:
    store.upsert_record(BOB)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                info = message(f"t{n}-{i}", f"t{n}-{i}@x.test")
                store.save_message(info, [link(info, BOB)])
                assert store.has_message("alice", info.uniq)
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(list(store.query_links())) == 80


def test_closed_store_refuses_new_connections(tmp_path: Path) -> None:
    s = open_store(f"sqlite:///{tmp_path}/s.db")
    s.close()
    result: list[BaseException] = []
    t = threading.Thread(target=lambda: _capture(result, lambda: s.has_message("a", "u")))
    t.start()
    t.join(timeout=10)
    assert len(result) == 1 and isinstance(result[0], StoreError)


def _capture(sink: list[BaseException], fn: object) -> None:
    try:
        fn()  # type: ignore[operator]
    except BaseException as exc:
        sink.append(exc)


# links query


@pytest.fixture
def linked(store: Store) -> Store:
    store.upsert_records([BOB, LEAD])
    one = message("u1", "m1@example.test")
    two = message("u2", "m2@example.test", account="bert", direction="received")
    store.save_message(one, [link(one, BOB), link(one, LEAD, role="cc")])
    store.save_message(two, [link(two, LEAD, role="from", via="thread")])
    return store


def test_links_query_without_filters_lists_every_link(linked: Store) -> None:
    rows = list(iter_links(linked))
    assert rows[0] == {
        "account": "alice",
        "direction": "sent",
        "message_id": "m1@example.test",
        "subject": "subject u1",
        "date": "2024-05-01T10:00:00+00:00",
        "folder": "Sent",
        "file": ".Sent/cur/u1:2,S",
        "record": {
            "kind": "contact",
            "id": "c1",
            "name": "Bob Buyer",
            "email": "bob@customer.test",
        },
        "role": "to",
        "via": "address",
    }
    assert len(rows) == 3


def test_links_query_filters_by_account_email_record_and_message_id(linked: Store) -> None:
    def keys(**kw: object) -> list[tuple[str, str, str]]:
        rows = iter_links(linked, **kw)  # type: ignore[arg-type]
        return [(r["account"], r["message_id"], r["record"]["id"]) for r in rows]

    assert keys(account="bert") == [("bert", "m2@example.test", "l1")]
    assert keys(email="BOB@Customer.TEST") == [("alice", "m1@example.test", "c1")]
    assert keys(record=("lead", "l1")) == [
        ("alice", "m1@example.test", "l1"),
        ("bert", "m2@example.test", "l1"),
    ]
    assert keys(message_id="<m2@example.test>") == [("bert", "m2@example.test", "l1")]
    assert keys(account="alice", record=("lead", "l1")) == [("alice", "m1@example.test", "l1")]
    assert keys(email="nobody@nowhere.test") == []


def test_links_json_lines_have_the_documented_members(linked: Store) -> None:
    out = io.StringIO()
    assert write_json_lines(iter_links(linked, account="bert"), out) == 1
    row = json.loads(out.getvalue())
    assert set(row) >= {
        "account",
        "direction",
        "message_id",
        "subject",
        "date",
        "folder",
        "file",
        "record",
        "role",
        "via",
    }
    assert row["direction"] == "received" and row["role"] == "from" and row["via"] == "thread"
    assert set(row["record"]) == {"kind", "id", "name", "email"}


def test_links_table_has_a_header_and_one_line_per_link(linked: Store) -> None:
    table = format_table(list(iter_links(linked)))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["DATE", "ACCOUNT", "DIR"]
    assert len(lines) == 4
    assert "contact:c1 (Bob Buyer)" in lines[1]
    assert format_table([]) == "no links\n"
