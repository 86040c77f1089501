"""The ``Store`` interface in SQL both backends speak; each backend supplies connections.

Statements use ``?`` placeholders (the PostgreSQL backend's connection wrapper turns them into
``%s``) and only SQL that SQLite (3.35+) and PostgreSQL share: ``ON CONFLICT``, ``RETURNING``.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from sentlink.addresses import normalize_address
from sentlink.model import Link, MessageInfo, Record, RecordKind
from sentlink.store import (
    Attempt,
    Delivery,
    IndexedFile,
    LinkRow,
    MessageRows,
    NewEvent,
    OutboxRow,
    SaveRequest,
    StoreError,
    UnmatchedRow,
)
from sentlink.store.batch import MAX_CACHED_ADDRESSES, MAX_CACHED_THREADS, Finish, WriteBatch

log = logging.getLogger("sentlink.store")

_CHUNK = 500  # bound on "IN (?, ...)" parameters per statement (SQLite's limit was 999)


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> Any: ...


def iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


# A CRM with at most this many addresses is loaded whole for a reconcile (prime_records): a few
# MB of memory; lookups then cost a dictionary hit instead of a query.
PRELOAD_ADDRESSES = 50_000
# Whole loads per batch: one that other connections' commits keep making stale (records are
# dropped on any commit elsewhere, SQLite's data_version) falls back to lookups per chunk.
_FULL_LOADS = 2
# An account with at most this many messages and links has them all loaded for a reconcile's
# thread lookups (prime_thread_links), as the records are; its copies lookups (message_files)
# then skip the query for a Message-ID it does not have.
PRELOAD_THREAD_LINKS = 50_000
_NO_LINKS: frozenset[tuple[str, str]] = frozenset()


# The records having an address (m.email), each with all its addresses, one row per address.
_RECORDS_BY_ADDRESS = (
    "SELECT m.email, r.kind, r.id, r.name, e.email FROM record_emails m"
    " JOIN records r ON r.kind = m.kind AND r.id = m.id"
    " JOIN record_emails e ON e.kind = m.kind AND e.id = m.id"
)


def _records_by_address(rows: Iterable[Sequence[Any]]) -> dict[str, list[Record]]:
    """_RECORDS_BY_ADDRESS rows, ordered by address -> records by address."""
    grouped: dict[str, list[Sequence[Any]]] = {}
    for row in rows:
        grouped.setdefault(row[0], []).append(row[1:])
    return {email: _records_from_rows(r) for email, r in grouped.items()}


def _records_from_rows(rows: Iterable[Sequence[Any]]) -> list[Record]:
    """(kind, id, name, email) rows, ordered by record then address position -> records,
    contacts first, then by id."""
    emails: dict[tuple[str, str], list[str]] = {}
    names: dict[tuple[str, str], str] = {}
    for kind, rid, name, address in rows:
        names[(kind, rid)] = name
        emails.setdefault((kind, rid), []).append(address)
    records = [
        Record(cast(RecordKind, kind), rid, names[(kind, rid)], tuple(addresses))
        for (kind, rid), addresses in emails.items()
    ]
    records.sort(key=lambda r: (r.kind != "contact", r.id))
    return records


class SqlStore(ABC):
    """Every query of the store; subclasses open connections and run transactions."""

    # The first file of a message in the links listing: SQLite's rowid, PostgreSQL's seq column.
    _FILE_ORDER = "rowid"
    # Row locking for the claim: PostgreSQL lets concurrent workers skip each other's rows.
    _SKIP_LOCKED = ""

    # Per-thread state (connections, the open batch); each backend creates it.
    _local: threading.local

    @abstractmethod
    def _errors(self) -> AbstractContextManager[None]:
        """Maps the driver's errors to StoreError."""

    @abstractmethod
    def _conn(self) -> Connection:
        """This thread's connection."""

    @abstractmethod
    def _transaction(self, conn: Connection) -> AbstractContextManager[None]:
        """One transaction, committed on exit, rolled back on error."""

    @abstractmethod
    def _begin(self, conn: Connection) -> Finish:
        """Open a transaction for a batch; the function given back commits or rolls it back."""

    @abstractmethod
    def _savepoint(self, conn: Connection) -> AbstractContextManager[None]:
        """A savepoint inside the open transaction, rolled back to on error."""

    @abstractmethod
    def _in_transaction(self, conn: Connection) -> bool:
        """Whether ``conn`` still has a transaction open (errors may abort a whole one)."""

    @abstractmethod
    def _batch_settings(self, conn: Connection, on: bool, transactions: int) -> None:
        """Backend settings for a batch's many writes (``on``), and back when it ends after
        ``transactions`` transactions (store/batch.py)."""

    def _records_version(self, conn: Connection) -> object:
        """A value that changes whenever another connection may have changed records, read
        inside a write transaction; None when the backend has none (store/batch.py)."""
        return None

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A connection for reads (errors mapped to StoreError); inside a batch it sees the
        batch's rows."""
        with self._errors():
            yield self._conn()

    @contextmanager
    def _write(self, writes: int = 1, savepoint: bool = True) -> Iterator[Connection]:
        """A connection inside a write transaction, committed on exit, rolled back on error.

        Inside a batch (store/batch.py): a savepoint in the batch's transaction, which is
        committed once enough writes or time have gone by (the block counts as ``writes``).
        ``savepoint`` False: none, for a block that undoes its own writes when it fails (a
        savepoint makes SQLite copy each page before its first change in it)."""
        batch: WriteBatch | None = getattr(self._local, "batch", None)
        with self._errors():
            conn = self._conn()
            if batch is None:
                with self._transaction(conn):
                    yield conn
                return
            if batch.finish is not None and batch.conn is not conn:
                # The connection was replaced (PostgreSQL reconnect): that transaction is gone.
                log.warning("store connection lost: %d batched writes to redo", batch.writes)
                batch.finish = None
            if batch.finish is None:
                if not batch.tuned:
                    self._batch_settings(conn, True, 0)
                    batch.tuned = True
                finish = self._begin(conn)
                batch.begin(conn, finish, self._records_version(conn))
            try:
                if savepoint:
                    with self._savepoint(conn):
                        yield conn
                else:
                    yield conn
            except BaseException:
                if not self._in_transaction(conn):  # the database aborted the whole batch
                    log.warning("store batch aborted: %d batched writes to redo", batch.writes)
                    with suppress(Exception):
                        batch.end(commit=False)
                raise
            batch.writes += writes
            if batch.due():
                batch.end(commit=True)

    def batch(
        self,
        max_writes: int = 500,
        max_seconds: float = 0.5,
        before_commit: Callable[[], None] | None = None,
    ) -> AbstractContextManager[None]:
        return self._batch(max_writes, max_seconds, before_commit)

    @contextmanager
    def _batch(
        self, max_writes: int, max_seconds: float, before_commit: Callable[[], None] | None
    ) -> Iterator[None]:
        outer: WriteBatch | None = getattr(self._local, "batch", None)
        batch = outer or WriteBatch(max_writes, max_seconds)
        if before_commit is not None:
            batch.hooks.append(before_commit)
        self._local.batch = batch
        try:
            yield
        finally:
            # A nested block commits when it ends too: its hook must run before its rows commit.
            try:
                with self._errors():
                    try:
                        batch.end(commit=True)
                    finally:
                        if outer is None and batch.tuned:
                            self._batch_settings(self._conn(), False, batch.transactions)
            finally:
                if before_commit is not None:
                    batch.hooks.remove(before_commit)
                self._local.batch = outer

    # records

    def upsert_record(self, record: Record) -> None:
        self.upsert_records([record])

    def upsert_records(self, records: Iterable[Record]) -> int:
        count = 0
        with self._write() as conn:
            for record in records:
                self._upsert_record(conn, record)
                count += 1
        return count

    def _upsert_record(self, conn: Connection, record: Record) -> None:
        batch: WriteBatch | None = getattr(self._local, "batch", None)
        if batch is not None:
            batch.forget_records()
        conn.execute(
            "INSERT INTO records (kind, id, name) VALUES (?, ?, ?)"
            " ON CONFLICT (kind, id) DO UPDATE SET name = excluded.name",
            (record.kind, record.id, record.name),
        )
        conn.execute(
            "DELETE FROM record_emails WHERE kind = ? AND id = ?", (record.kind, record.id)
        )
        emails = dict.fromkeys(normalize_address(e) for e in record.emails)
        conn.executemany(
            "INSERT INTO record_emails (kind, id, email, position) VALUES (?, ?, ?, ?)",
            [(record.kind, record.id, e, i) for i, e in enumerate(emails)],
        )

    def records_by_email(self, email: str) -> list[Record]:
        batch = self._records_cache()
        if batch is not None:
            cached = batch.records.get(email)
            if cached is not None:
                return list(cached)
            if batch.records_complete:
                return []
        records = self._records_by_email(email)
        if batch is not None:
            batch.remember(email, list(records))
        return records

    def _records_cache(self) -> WriteBatch | None:
        """This thread's batch, when its cached records answers hold (store/batch.py)."""
        batch: WriteBatch | None = getattr(self._local, "batch", None)
        if batch is None or batch.finish is not None:
            return batch  # no batch; or inside its transaction: nobody else can write
        # Between two of the batch's transactions: the answers hold while no other connection
        # has committed since they were read.
        with self._errors():
            version = self._records_version(self._conn())
        if version is None:
            return None
        if version != batch.records_version:
            batch.forget_records()
            batch.records_version = version
        return batch

    def prime_records(self, emails: Iterable[str]) -> None:
        batch = self._records_cache()
        if batch is None or batch.records_complete:
            return  # ``emails`` is not even iterated
        if batch.full_loads < _FULL_LOADS and self._load_all_records(batch):
            return
        wanted = sorted({e for e in emails if e and e not in batch.records})
        if not wanted or len(batch.records) + len(wanted) > MAX_CACHED_ADDRESSES:
            return
        found: dict[str, list[Record]] = {email: [] for email in wanted}
        with self._read() as conn:
            for chunk in chunks(wanted):
                rows = conn.execute(
                    f"{_RECORDS_BY_ADDRESS} WHERE m.email IN ({', '.join('?' * len(chunk))})"
                    " ORDER BY m.email, r.kind, r.id, e.position",
                    list(chunk),
                ).fetchall()
                found.update(_records_by_address(rows))
        for email, records in found.items():
            batch.remember(email, records)

    def _load_all_records(self, batch: WriteBatch) -> bool:
        """A CRM of up to PRELOAD_ADDRESSES addresses is read whole into the batch's cache: one
        query, then every lookup of the batch is a dictionary hit (false when it is larger)."""
        with self._read() as conn:
            (count,) = conn.execute("SELECT count(*) FROM record_emails").fetchone()
            if int(count) > PRELOAD_ADDRESSES:
                batch.full_loads = _FULL_LOADS  # not again in this batch
                return False
            rows = conn.execute(
                f"{_RECORDS_BY_ADDRESS} ORDER BY m.email, r.kind, r.id, e.position"
            ).fetchall()
        batch.load_all(_records_by_address(rows))
        return True

    def _records_by_email(self, email: str) -> list[Record]:
        # One query for the records and all their addresses: this runs for every participant.
        with self._read() as conn:
            rows = conn.execute(
                f"{_RECORDS_BY_ADDRESS} WHERE m.email = ? ORDER BY r.kind, r.id, e.position",
                (email,),
            ).fetchall()
        return _records_from_rows(row[1:] for row in rows)

    @staticmethod
    def _load_records(conn: Connection, keys: Iterable[tuple[str, str]]) -> list[Record]:
        records = []
        for kind, rid in keys:
            row = conn.execute(
                "SELECT name FROM records WHERE kind = ? AND id = ?", (kind, rid)
            ).fetchone()
            if row is None:
                continue
            emails = conn.execute(
                "SELECT email FROM record_emails WHERE kind = ? AND id = ? ORDER BY position",
                (kind, rid),
            ).fetchall()
            records.append(Record(cast(RecordKind, kind), rid, row[0], tuple(e for (e,) in emails)))
        records.sort(key=lambda r: (r.kind != "contact", r.id))
        return records

    # messages

    def has_message(self, account: str, uniq: str) -> bool:
        return self.message_location(account, uniq) is not None

    def message_location(self, account: str, uniq: str) -> tuple[str, str] | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT folder, file FROM message_files WHERE account = ? AND uniq = ?",
                (account, uniq),
            ).fetchone()
        return None if row is None else (row[0], row[1])

    def folder_files(self, account: str, folder: str) -> dict[str, str]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT uniq, file FROM message_files WHERE account = ? AND folder = ?",
                (account, folder),
            )
            return dict(rows)

    def account_uniqs(self, account: str) -> set[str]:
        with self._read() as conn:
            rows = conn.execute("SELECT uniq FROM message_files WHERE account = ?", (account,))
            return {uniq for (uniq,) in rows}

    def message_files(self, account: str, message_id: str) -> list[IndexedFile]:
        if not message_id or self._known_absent(account, message_id):
            return []
        with self._read() as conn:
            # "message_id <> ''" lets the planner use the partial index on Message-IDs; the
            # files come through message_files_by_message. Sorting here, not in SQL: ORDER BY
            # the file order made SQLite's planner walk every file instead.
            rows = conn.execute(
                f"SELECT f.{self._FILE_ORDER}, f.uniq, f.folder, f.file FROM message_files f"
                " WHERE f.message_pk IN (SELECT pk FROM messages"
                "   WHERE account = ? AND message_id = ? AND message_id <> '')",
                (account, message_id),
            ).fetchall()
        return [IndexedFile(uniq, folder, file) for _order, uniq, folder, file in sorted(rows)]

    def move_message(self, account: str, uniq: str, folder: str, file: str) -> bool:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE message_files SET folder = ?, file = ? WHERE account = ? AND uniq = ?",
                (folder, file, account, uniq),
            )
            return cur.rowcount > 0

    def save_message(
        self,
        info: MessageInfo,
        links: Sequence[Link],
        events: Sequence[NewEvent] = (),
        unmatched: Sequence[str] = (),
        new_records: Sequence[Record] = (),
    ) -> bool:
        # The common case, a message and a file never seen, costs two inserts and no lookup:
        # the unique keys on (account, Message-ID) and (account, uniq) answer "already indexed".
        self._forget_threads(info.account, info.message_id)
        with self._write() as conn:
            row = conn.execute(
                "INSERT INTO messages"
                " (account, message_id, direction, subject, date, private, indexed_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (account, message_id) WHERE message_id <> '' DO NOTHING"
                " RETURNING pk",
                (
                    info.account,
                    info.message_id,
                    info.direction,
                    info.subject,
                    info.date,
                    int(info.private),
                    datetime.now(UTC).isoformat(timespec="seconds"),
                ),
            ).fetchone()
            if row is None:
                # Another copy of an indexed message: remember the file (unless this very file
                # is indexed already), link nothing.
                (existing,) = conn.execute(
                    # "message_id <> ''" lets the planner use the partial index on Message-IDs.
                    "SELECT pk FROM messages"
                    " WHERE account = ? AND message_id = ? AND message_id <> ''",
                    (info.account, info.message_id),
                ).fetchone()
                self._insert_file(conn, info, int(existing))
                return False
            pk = int(row[0])
            if not self._insert_file(conn, info, pk):
                # The file is indexed already (under another Message-ID, or none): undo the row.
                conn.execute("DELETE FROM messages WHERE pk = ?", (pk,))
                return False
            for record in new_records:
                self._upsert_record(conn, record)
            if links:
                conn.executemany(
                    "INSERT INTO links (message_pk, kind, record_id, email, role, via)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [(pk, ln.record.kind, ln.record.id, ln.email, ln.role, ln.via) for ln in links],
                )
            if unmatched:
                conn.executemany(
                    "INSERT INTO unmatched (message_pk, email) VALUES (?, ?)"
                    " ON CONFLICT DO NOTHING",
                    [(pk, email) for email in unmatched],
                )
            for event in events:
                self._insert_event(conn, event)
            return True

    def save_rows(self, rows: Sequence[MessageRows]) -> list[bool | StoreError]:
        return self.save_messages([r.request() for r in rows])

    def save_messages(self, requests: Sequence[SaveRequest]) -> list[bool | StoreError]:
        return [self._save_or_error(r) for r in requests]

    def _save_or_error(self, request: SaveRequest) -> bool | StoreError:
        try:
            return self.save_message(
                request.info,
                request.links,
                request.events,
                request.unmatched,
                request.new_records,
            )
        except StoreError as exc:
            return exc

    @staticmethod
    def _insert_file(conn: Connection, info: MessageInfo, pk: int) -> bool:
        """Index the file as one of message ``pk``; False when its unique name already is."""
        return (
            conn.execute(
                "INSERT INTO message_files (account, uniq, message_pk, folder, file)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (account, uniq) DO NOTHING",
                (info.account, info.uniq, pk, info.folder, info.file),
            ).rowcount
            > 0
        )

    @staticmethod
    def _insert_event(conn: Connection, event: NewEvent) -> None:
        row = conn.execute(
            "INSERT INTO events (id, type, payload, records, created_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO NOTHING RETURNING pk",
            (event.id, event.type, event.payload, "\n".join(event.records), event.created_at),
        ).fetchone()
        if row is None:  # the same event was written before (a re-link): sent once already
            return
        pk = int(row[0])
        conn.executemany(
            "INSERT INTO event_records (event_pk, record) VALUES (?, ?) ON CONFLICT DO NOTHING",
            [(pk, record) for record in event.records],
        )
        conn.executemany(
            "INSERT INTO deliveries (event_pk, hook, state, attempts, next_at, since, last_error)"
            " VALUES (?, ?, 'pending', 0, ?, ?, '')",
            [(pk, hook, event.created_at, event.created_at) for hook in event.hooks],
        )

    def add_links(
        self, info: MessageInfo, links: Sequence[Link], events: Sequence[NewEvent] = ()
    ) -> int:
        if not info.message_id or not links:
            return 0
        self._forget_threads(info.account, info.message_id)
        with self._write() as conn:
            row = conn.execute(
                "SELECT pk FROM messages WHERE account = ? AND message_id = ?"
                " AND message_id <> '' AND direction = ? AND private = 0",
                (info.account, info.message_id, info.direction),
            ).fetchone()
            if row is None:
                return 0
            pk = int(row[0])
            have = {
                (k, r)
                for k, r in conn.execute(
                    "SELECT kind, record_id FROM links WHERE message_pk = ?", (pk,)
                )
            }
            new = [ln for ln in links if (ln.record.kind, ln.record.id) not in have]
            if not new:
                return 0
            conn.executemany(
                "INSERT INTO links (message_pk, kind, record_id, email, role, via)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(pk, ln.record.kind, ln.record.id, ln.email, ln.role, ln.via) for ln in new],
            )
            for event in events:
                self._insert_event(conn, event)
            return len(new)

    def linked_records_for_message_ids(
        self, account: str, message_ids: Sequence[str]
    ) -> list[Record]:
        ids = sorted({m for m in message_ids if m})
        keys = self._cached_thread_keys(account, ids)
        if keys is not None and not keys:
            return []  # the usual answer from the cache: no query at all
        with self._read() as conn:
            if keys is None:
                keys = set()
                for found in self._thread_links(conn, account, ids).values():
                    keys.update(found)
            return self._load_records(conn, sorted(keys))

    def prime_thread_links(self, account: str, message_ids: Iterable[str]) -> None:
        batch = self._records_cache()
        if batch is None or account in batch.threads_complete:
            return
        if batch.thread_loads < _FULL_LOADS and self._load_all_thread_links(batch, account):
            return
        cached = batch.threads
        wanted = sorted({m for m in message_ids if m and cached.get((account, m)) is None})
        if not wanted:
            return
        if len(cached) + len(wanted) > MAX_CACHED_THREADS:
            self._forget_threads()  # a bound on memory; later chunks are looked up anew
        with self._read() as conn:
            found = self._thread_links(conn, account, wanted)
        batch.threads.update(((account, m), keys) for m, keys in found.items())

    def _load_all_thread_links(self, batch: WriteBatch, account: str) -> bool:
        """An account with up to PRELOAD_THREAD_LINKS messages and links is read whole into
        the batch's cache (a first reconcile finds none at all); false when it has more."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT m.message_id, m.private, l.kind, l.record_id FROM messages m"
                " LEFT JOIN links l ON l.message_pk = m.pk"
                " WHERE m.account = ? AND m.message_id <> '' LIMIT ?",
                (account, PRELOAD_THREAD_LINKS + 1),
            ).fetchall()
        if len(rows) > PRELOAD_THREAD_LINKS:
            batch.thread_loads = _FULL_LOADS  # not again in this batch
            return False
        batch.thread_loads += 1
        loaded: dict[str, set[tuple[str, str]]] = {}
        for message_id, private, kind, rid in rows:
            keys = loaded.setdefault(message_id, set())
            if kind is not None and not private:
                keys.add((kind, rid))
        batch.threads = {k: v for k, v in batch.threads.items() if k[0] != account}
        batch.threads.update(((account, m), keys) for m, keys in loaded.items())
        batch.threads_complete.add(account)
        return True

    def _cached_thread_keys(self, account: str, ids: Sequence[str]) -> set[tuple[str, str]] | None:
        """The records linked to any of ``ids`` from the batch's cache, or None unless it
        answers for every one of them (the caller then asks the database)."""
        if not ids:
            return set()
        batch = self._records_cache()
        if batch is None or not (batch.threads or batch.threads_complete):
            return None
        complete = account in batch.threads_complete
        keys: set[tuple[str, str]] = set()
        for message_id in ids:
            cached = batch.threads.get((account, message_id), _NO_LINKS if complete else None)
            if cached is None:
                return None
            keys.update(cached)
        return keys

    def _known_absent(self, account: str, message_id: str) -> bool:
        """The batch's cache holds every message of the account, and not this one."""
        batch = self._records_cache()
        return (
            batch is not None
            and account in batch.threads_complete
            and (account, message_id) not in batch.threads
        )

    @staticmethod
    def _thread_links(
        conn: Connection, account: str, ids: Sequence[str]
    ) -> dict[str, set[tuple[str, str]]]:
        """``(kind, id)`` of the records linked to each of ``ids`` (none for an unknown or
        private message)."""
        found: dict[str, set[tuple[str, str]]] = {m: set() for m in ids}
        for chunk in chunks(ids):
            marks = ", ".join("?" * len(chunk))
            # No DISTINCT: the sets drop repeats without the temporary B-tree SQLite builds
            # for it on every call (this runs for every message with references).
            rows = conn.execute(
                "SELECT m.message_id, l.kind, l.record_id FROM messages m"
                " JOIN links l ON l.message_pk = m.pk"
                f" WHERE m.account = ? AND m.private = 0 AND m.message_id IN ({marks})"
                " AND m.message_id <> ''",
                (account, *chunk),
            )
            for message_id, kind, rid in rows:
                found[message_id].add((kind, rid))
        return found

    def _forget_threads(self, account: str | None = None, message_id: str = "") -> None:
        """Before a write that may change links: one message's cached ones are not known any
        more, or (no account) none are."""
        batch: WriteBatch | None = getattr(self._local, "batch", None)
        if batch is None:
            return
        if account is None:
            batch.threads = {}
            batch.threads_complete = set()
        elif message_id:
            batch.threads[(account, message_id)] = None

    def _new_messages_written(self, requests: Sequence[SaveRequest]) -> None:
        """Messages just written as new, each with exactly its ``links``: what a thread lookup
        of them now finds."""
        self._new_links_written(
            (
                r.info.account,
                r.info.message_id,
                () if r.info.private else [(ln.record.kind, ln.record.id) for ln in r.links],
            )
            for r in requests
        )

    def _new_links_written(
        self, messages: Iterable[tuple[str, str, Iterable[tuple[str, str]]]]
    ) -> None:
        """``_new_messages_written`` of (account, Message-ID, linked record keys) each."""
        batch: WriteBatch | None = getattr(self._local, "batch", None)
        if batch is None:
            return
        written = [m for m in messages if m[1]]
        if len(batch.threads) + len(written) > MAX_CACHED_THREADS:
            self._forget_threads()
        batch.threads.update(((account, mid), set(keys)) for account, mid, keys in written)

    def query_links(
        self,
        account: str | None = None,
        email: str | None = None,
        record: tuple[str, str] | None = None,
        message_id: str | None = None,
    ) -> Iterator[LinkRow]:
        where: list[str] = []
        params: list[Any] = []
        if account is not None:
            where.append("m.account = ?")
            params.append(account)
        if email is not None:
            where.append("l.email = ?")
            params.append(email)
        if record is not None:
            where.append("l.kind = ? AND l.record_id = ?")
            params.extend(record)
        if message_id is not None:
            where.append("m.message_id = ? AND m.message_id <> ''")
            params.append(message_id)
        order = self._FILE_ORDER
        sql = f"""
            SELECT m.account, m.direction, m.message_id, m.subject, m.date,
                   coalesce(f.folder, ''), coalesce(f.file, ''),
                   l.kind, l.record_id, r.name, l.email, l.role, l.via
            FROM links l
            JOIN messages m ON m.pk = l.message_pk
            JOIN records r ON r.kind = l.kind AND r.id = l.record_id
            LEFT JOIN message_files f
              ON f.{order} = (SELECT min({order}) FROM message_files WHERE message_pk = m.pk)
        """
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY m.pk, l.kind, l.record_id, l.email"
        return self._iter_links(sql, params)

    def _iter_links(self, sql: str, params: list[Any]) -> Iterator[LinkRow]:
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
        for row in rows:
            yield {
                "account": row[0],
                "direction": row[1],
                "message_id": row[2],
                "subject": row[3],
                "date": row[4],
                "folder": row[5],
                "file": row[6],
                "record": {"kind": row[7], "id": row[8], "name": row[9], "email": row[10]},
                "role": row[11],
                "via": row[12],
            }

    def forget_missing(
        self, account: str, present_uniqs: Collection[str], folder: str | None = None
    ) -> int:
        present = set(present_uniqs)
        self._forget_threads()
        with self._write() as conn:
            sql = "SELECT uniq, message_pk FROM message_files WHERE account = ?"
            params: tuple[str, ...] = (account,)
            if folder is not None:
                sql += " AND folder = ?"
                params += (folder,)
            gone = [(u, pk) for u, pk in conn.execute(sql, params) if u not in present]
            conn.executemany(
                "DELETE FROM message_files WHERE account = ? AND uniq = ?",
                [(account, u) for u, _pk in gone],
            )
            conn.executemany(
                "DELETE FROM messages WHERE pk = ? AND NOT EXISTS"
                " (SELECT 1 FROM message_files WHERE message_pk = messages.pk)",
                [(pk,) for pk in {pk for _u, pk in gone}],
            )
        if gone:
            log.info("account=%s forgot %d message files no longer present", account, len(gone))
        return len(gone)

    def forget_account(self, account: str) -> int:
        self._forget_threads()
        with self._write() as conn:
            # message_files and links go with their message (ON DELETE CASCADE).
            return conn.execute("DELETE FROM messages WHERE account = ?", (account,)).rowcount

    # outbox

    @classmethod
    def _claim_sql(cls) -> str:
        """Due deliveries of one hook (parameters: hook, now, now, limit), oldest first.

        An earlier pending event of this hook sharing a record holds an event back, so one
        record's events arrive in order; event_records only keeps rows of events still pending
        somewhere, which keeps this check small. The earlier event's delivery is looked up by
        primary key in a scalar subquery rather than joined: as a join, PostgreSQL without
        fresh statistics (a backlog written in the last minute) planned it as a scan of every
        pending delivery per candidate, 300 ms per claim for 2,000 pending events instead of
        under 1 ms.
        """
        return (
            "SELECT d.event_pk, e.id, e.type, e.payload, d.attempts, d.since"
            " FROM deliveries d JOIN events e ON e.pk = d.event_pk"
            " WHERE d.hook = ? AND d.state = 'pending' AND d.next_at <= ?"
            " AND (d.lease_until IS NULL OR d.lease_until <= ?)"
            " AND NOT EXISTS (SELECT 1 FROM event_records r"
            "   JOIN event_records p ON p.record = r.record AND p.event_pk < r.event_pk"
            "   WHERE r.event_pk = d.event_pk AND (SELECT q.state FROM deliveries q"
            "     WHERE q.hook = d.hook AND q.event_pk = p.event_pk) = 'pending')"
            f" ORDER BY d.event_pk LIMIT ?{cls._SKIP_LOCKED}"
        )

    def claim_deliveries(
        self, hook: str, owner: str, limit: int, lease_seconds: float, now: float
    ) -> list[Delivery]:
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM hook_state WHERE hook = ?", (hook,)).fetchone():
                return []
            rows = conn.execute(
                self._claim_sql(),
                (hook, now, now, limit),
            ).fetchall()
            if not rows:
                return []
            conn.executemany(
                "UPDATE deliveries SET lease_owner = ?, lease_until = ?"
                " WHERE hook = ? AND event_pk = ?",
                [(owner, now + lease_seconds, hook, row[0]) for row in rows],
            )
        return [Delivery(int(r[0]), hook, r[1], r[2], r[3], int(r[4]), float(r[5])) for r in rows]

    def extend_lease(self, hook: str, owner: str, event_pks: Sequence[int], until: float) -> None:
        with self._write() as conn:
            conn.executemany(
                "UPDATE deliveries SET lease_until = ?"
                " WHERE hook = ? AND event_pk = ? AND lease_owner = ? AND state = 'pending'",
                [(until, hook, pk, owner) for pk in event_pks],
            )

    def finish_deliveries(self, hook: str, attempts: Sequence[Attempt]) -> None:
        if not attempts:
            return
        with self._write() as conn:
            conn.executemany(
                # A finished delivery keeps lease_owner: which worker delivered it.
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, next_at = ?,"
                " lease_owner = CASE WHEN ? THEN NULL ELSE lease_owner END,"
                " lease_until = NULL, last_error = ?, finished_at = ?"
                " WHERE hook = ? AND event_pk = ?",
                [
                    (
                        a.state,
                        a.next_at,
                        a.state == "pending",
                        a.error[:500],
                        a.at if a.state != "pending" else None,
                        hook,
                        a.event_pk,
                    )
                    for a in attempts
                ],
            )
            self._release_records(conn, [a.event_pk for a in attempts if a.state != "pending"])

    @staticmethod
    def _release_records(conn: Connection, event_pks: Iterable[int]) -> None:
        """Forget the record keys of events no hook is waiting for any more."""
        conn.executemany(
            "DELETE FROM event_records WHERE event_pk = ? AND NOT EXISTS"
            " (SELECT 1 FROM deliveries WHERE event_pk = ? AND state = 'pending')",
            [(pk, pk) for pk in event_pks],
        )

    def disable_hook(self, hook: str, reason: str, now: float) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO hook_state (hook, disabled_at, reason) VALUES (?, ?, ?)"
                " ON CONFLICT (hook) DO UPDATE SET disabled_at = excluded.disabled_at,"
                " reason = excluded.reason",
                (hook, now, reason[:500]),
            )

    def enable_hook(self, hook: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM hook_state WHERE hook = ?", (hook,)).rowcount > 0

    def disabled_hooks(self) -> dict[str, str]:
        with self._read() as conn:
            return {h: r for h, r in conn.execute("SELECT hook, reason FROM hook_state")}

    def outbox_rows(
        self, states: Collection[str], hook: str | None = None, limit: int | None = None
    ) -> Iterator[OutboxRow]:
        wanted = sorted(states)
        sql = (
            "SELECT e.id, e.type, d.hook, d.state, d.attempts, e.created_at, d.next_at,"
            " d.last_error, h.hook IS NOT NULL"
            " FROM deliveries d JOIN events e ON e.pk = d.event_pk"
            " LEFT JOIN hook_state h ON h.hook = d.hook"
            f" WHERE d.state IN ({', '.join('?' * len(wanted))})"
        )
        params: list[Any] = list(wanted)
        if hook is not None:
            sql += " AND d.hook = ?"
            params.append(hook)
        sql += " ORDER BY d.event_pk, d.hook"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
        for r in rows:
            yield {
                "id": r[0],
                "type": r[1],
                "hook": r[2],
                "state": r[3],
                "attempts": int(r[4]),
                "created": iso(r[5]),
                "next_attempt": iso(r[6]) if r[3] == "pending" else "",
                "last_error": r[7],
                "hook_disabled": bool(r[8]),
            }

    def _selected(
        self, conn: Connection, hook: str | None, event_ids: Collection[str]
    ) -> list[tuple[int, str]]:
        sql = (
            "SELECT d.event_pk, d.hook FROM deliveries d JOIN events e ON e.pk = d.event_pk"
            " WHERE d.state IN ('pending', 'dead')"
        )
        params: list[Any] = []
        if hook is not None:
            sql += " AND d.hook = ?"
            params.append(hook)
        if not event_ids:
            return [(int(pk), h) for pk, h in conn.execute(sql, params)]
        found: list[tuple[int, str]] = []
        for chunk in chunks(sorted(event_ids)):
            found += [
                (int(pk), h)
                for pk, h in conn.execute(
                    sql + f" AND e.id IN ({', '.join('?' * len(chunk))})", [*params, *chunk]
                )
            ]
        return found

    def retry_deliveries(self, hook: str | None, event_ids: Collection[str], now: float) -> int:
        with self._write() as conn:
            chosen = self._selected(conn, hook, event_ids)
            conn.executemany(
                "UPDATE deliveries SET state = 'pending', next_at = ?, since = ?,"
                " lease_owner = NULL, lease_until = NULL, finished_at = NULL"
                " WHERE event_pk = ? AND hook = ?",
                [(now, now, pk, h) for pk, h in chosen],
            )
            # A revived dead event takes its place in its records' order again.
            for pk in sorted({pk for pk, _h in chosen}):
                (records,) = conn.execute(
                    "SELECT records FROM events WHERE pk = ?", (pk,)
                ).fetchone()
                conn.executemany(
                    "INSERT INTO event_records (event_pk, record) VALUES (?, ?)"
                    " ON CONFLICT DO NOTHING",
                    [(pk, record) for record in records.split("\n") if record],
                )
        return len(chosen)

    def drop_deliveries(self, hook: str | None, event_ids: Collection[str]) -> int:
        with self._write() as conn:
            chosen = self._selected(conn, hook, event_ids)
            conn.executemany(
                "DELETE FROM deliveries WHERE event_pk = ? AND hook = ?",
                [(pk, h) for pk, h in chosen],
            )
            self._release_records(conn, {pk for pk, _h in chosen})
        return len(chosen)

    # unmatched addresses

    def unmatched_addresses(self, account: str | None = None) -> list[UnmatchedRow]:
        sql = (
            "SELECT m.account, u.email, count(*), min(m.indexed_at), max(m.indexed_at)"
            " FROM unmatched u JOIN messages m ON m.pk = u.message_pk"
        )
        params: list[Any] = []
        if account is not None:
            sql += " WHERE m.account = ?"
            params.append(account)
        sql += " GROUP BY m.account, u.email ORDER BY m.account, count(*) DESC, u.email"
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [
            {"account": r[0], "email": r[1], "messages": int(r[2]), "first": r[3], "last": r[4]}
            for r in rows
        ]

    def messages_for_emails(self, emails: Collection[str]) -> list[tuple[str, str]]:
        found: set[tuple[str, str]] = set()
        with self._read() as conn:
            for chunk in chunks(sorted(emails)):
                rows = conn.execute(
                    "SELECT f.account, min(f.uniq) FROM unmatched u"
                    " JOIN message_files f ON f.message_pk = u.message_pk"
                    f" WHERE u.email IN ({', '.join('?' * len(chunk))})"
                    " GROUP BY f.message_pk, f.account",
                    list(chunk),
                )
                found.update((a, u) for a, u in rows)
        return sorted(found)

    def forget_messages(self, keys: Collection[tuple[str, str]]) -> int:
        count = 0
        self._forget_threads()
        with self._write() as conn:
            for account, uniq in keys:
                count += conn.execute(
                    "DELETE FROM messages WHERE pk ="
                    " (SELECT message_pk FROM message_files WHERE account = ? AND uniq = ?)",
                    (account, uniq),
                ).rowcount
        return count
