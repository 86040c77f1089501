"""PostgreSQL backend (psycopg 3): one database shared by several MTA nodes.

The queries are the shared ones in ``sentlink.store.sql``; this module adds connections (one
per thread, like the SQLite backend), the PostgreSQL spelling of the schema, and migrations
serialized by an advisory lock so nodes starting together apply each step once. Outbox claims
use ``FOR UPDATE SKIP LOCKED``: concurrent workers take disjoint rows without waiting.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from sentlink.errors import StoreError
from sentlink.model import Link, MessageInfo, Record
from sentlink.store import NewEvent
from sentlink.store.batch import Finish
from sentlink.store.sql import Connection, Cursor, SqlStore

log = logging.getLogger("sentlink.store")

# Any fixed number: the key of the advisory lock held while migrating.
_MIGRATION_LOCK = 0x73656E746C696E6B  # "sentlink"

PG_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: as schema.MIGRATIONS[0]; message_files gets a serial for "first file" (SQLite's rowid).
    (
        """CREATE TABLE records (
            kind TEXT NOT NULL CHECK (kind IN ('contact', 'lead')),
            id TEXT NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (kind, id)
        )""",
        """CREATE TABLE record_emails (
            kind TEXT NOT NULL,
            id TEXT NOT NULL,
            email TEXT NOT NULL,
            position INTEGER NOT NULL,
            PRIMARY KEY (kind, id, email),
            FOREIGN KEY (kind, id) REFERENCES records (kind, id) ON DELETE CASCADE
        )""",
        "CREATE INDEX record_emails_by_email ON record_emails (email)",
        """CREATE TABLE messages (
            pk BIGSERIAL PRIMARY KEY,
            account TEXT NOT NULL,
            message_id TEXT NOT NULL,
            direction TEXT NOT NULL CHECK (direction IN ('sent', 'received')),
            subject TEXT NOT NULL,
            date TEXT NOT NULL,
            private INTEGER NOT NULL DEFAULT 0,
            indexed_at TEXT NOT NULL
        )""",
        """CREATE UNIQUE INDEX messages_by_message_id ON messages (account, message_id)
            WHERE message_id <> ''""",
        """CREATE TABLE message_files (
            seq BIGSERIAL,
            account TEXT NOT NULL,
            uniq TEXT NOT NULL,
            message_pk BIGINT NOT NULL REFERENCES messages (pk) ON DELETE CASCADE,
            folder TEXT NOT NULL,
            file TEXT NOT NULL,
            PRIMARY KEY (account, uniq)
        )""",
        "CREATE INDEX message_files_by_message ON message_files (message_pk)",
        """CREATE TABLE links (
            message_pk BIGINT NOT NULL REFERENCES messages (pk) ON DELETE CASCADE,
            kind TEXT NOT NULL,
            record_id TEXT NOT NULL,
            email TEXT NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('to', 'cc', 'bcc', 'from')),
            via TEXT NOT NULL CHECK (via IN ('address', 'thread')),
            PRIMARY KEY (message_pk, kind, record_id),
            FOREIGN KEY (kind, record_id) REFERENCES records (kind, id) ON DELETE CASCADE
        )""",
        "CREATE INDEX links_by_record ON links (kind, record_id)",
        "CREATE INDEX links_by_email ON links (email)",
    ),
    # 2: as schema.MIGRATIONS[1].
    (
        """CREATE TABLE events (
            pk BIGSERIAL PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL,
            payload TEXT NOT NULL,
            records TEXT NOT NULL DEFAULT '',
            created_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE event_records (
            event_pk BIGINT NOT NULL REFERENCES events (pk) ON DELETE CASCADE,
            record TEXT NOT NULL,
            PRIMARY KEY (event_pk, record)
        )""",
        "CREATE INDEX event_records_by_record ON event_records (record, event_pk)",
        """CREATE TABLE deliveries (
            event_pk BIGINT NOT NULL REFERENCES events (pk) ON DELETE CASCADE,
            hook TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'dead')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at DOUBLE PRECISION NOT NULL,
            since DOUBLE PRECISION NOT NULL,
            lease_owner TEXT,
            lease_until DOUBLE PRECISION,
            last_error TEXT NOT NULL DEFAULT '',
            finished_at DOUBLE PRECISION,
            PRIMARY KEY (hook, event_pk)
        )""",
        "CREATE INDEX deliveries_due ON deliveries (hook, state, event_pk)",
        "CREATE INDEX deliveries_by_event ON deliveries (event_pk)",
        """CREATE TABLE hook_state (
            hook TEXT PRIMARY KEY,
            disabled_at DOUBLE PRECISION NOT NULL,
            reason TEXT NOT NULL DEFAULT ''
        )""",
        """CREATE TABLE unmatched (
            message_pk BIGINT NOT NULL REFERENCES messages (pk) ON DELETE CASCADE,
            email TEXT NOT NULL,
            PRIMARY KEY (message_pk, email)
        )""",
        "CREATE INDEX unmatched_by_email ON unmatched (email)",
    ),
)


@functools.lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (the shared SQL has no literal ``?`` or ``%``)."""
    return sql.replace("?", "%s")


class _PgConnection:
    """The small sqlite3-like surface ``SqlStore`` uses, over a psycopg connection."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor:
        return self.conn.execute(_pg(sql), tuple(params))

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> None:
        rows = [tuple(p) for p in params]
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(_pg(sql), rows)


class PostgresStore(SqlStore):
    _FILE_ORDER = "seq"
    _SKIP_LOCKED = " FOR UPDATE OF d SKIP LOCKED"

    def __init__(self, url: str) -> None:
        self._url = url
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[psycopg.Connection[Any]] = []
        self._closed = False
        with self._errors():
            self._migrate()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            # psycopg's messages name host and database, never the password.
            raise StoreError(f"postgresql: {str(exc).strip()}") from exc

    def _conn(self) -> _PgConnection:
        conn: _PgConnection | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.conn.closed:
            return conn
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
        raw = psycopg.connect(self._url, autocommit=True, application_name="sentlink")
        with self._lock:
            self._connections.append(raw)
        conn = _PgConnection(raw)
        self._local.conn = conn
        return conn

    @staticmethod
    def _pg_conn(conn: Connection) -> psycopg.Connection[Any]:
        assert isinstance(conn, _PgConnection)
        return conn.conn

    @contextmanager
    def _transaction(self, conn: Connection) -> Iterator[None]:
        with self._pg_conn(conn).transaction():
            yield

    def _begin(self, conn: Connection) -> Finish:
        block = self._pg_conn(conn).transaction()
        tx = block.__enter__()

        def finish(commit: bool) -> None:
            if commit:
                block.__exit__(None, None, None)
            else:
                rollback = psycopg.Rollback(tx)
                block.__exit__(type(rollback), rollback, None)

        return finish

    @contextmanager
    def _savepoint(self, conn: Connection) -> Iterator[None]:
        # psycopg makes a nested transaction() a SAVEPOINT.
        with self._pg_conn(conn).transaction():
            yield

    def _batch_settings(self, conn: Connection, on: bool, transactions: int) -> None:
        pass  # the server's own checkpoint settings apply

    def _in_transaction(self, conn: Connection) -> bool:
        return self._pg_conn(conn).info.transaction_status == TransactionStatus.INTRANS

    def _migrate(self) -> None:
        conn = self._conn()
        with conn.conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS sentlink_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM sentlink_schema").fetchone()
            if row is None:
                conn.execute("INSERT INTO sentlink_schema (version) VALUES (0)")
            version = 0 if row is None else int(row[0])
            if version > len(PG_MIGRATIONS):
                raise StoreError(
                    f"database schema version {version} is newer than this sentlink knows "
                    f"({len(PG_MIGRATIONS)})"
                )
            for step in range(version, len(PG_MIGRATIONS)):
                for statement in PG_MIGRATIONS[step]:
                    conn.execute(statement)
                conn.execute("UPDATE sentlink_schema SET version = ?", (step + 1,))
                log.info("store schema migrated to version %d", step + 1)

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute("SELECT version FROM sentlink_schema").fetchone()[0])

    def save_message(
        self,
        info: MessageInfo,
        links: Sequence[Link],
        events: Sequence[NewEvent] = (),
        unmatched: Sequence[str] = (),
        new_records: Sequence[Record] = (),
    ) -> bool:
        # Two nodes indexing the same message at once: the loser's insert violates a unique key;
        # run it again and it sees the winner's row (an "already indexed" answer).
        for attempt in (1, 2):
            try:
                return super().save_message(info, links, events, unmatched, new_records)
            except StoreError as exc:
                if attempt == 2 or not isinstance(exc.__cause__, pg_errors.UniqueViolation):
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
