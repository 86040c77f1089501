"""SQLite backend: WAL, a busy timeout, foreign keys, one connection per thread.

The watcher links from its worker thread while the CLI or the metrics endpoint read from
others; SQLite connections must not be shared between threads mid-statement, so each thread
gets its own (WAL lets readers proceed while one writer commits). Every write transaction starts
with ``BEGIN IMMEDIATE`` so a writer takes the lock up front and waits out ``busy_timeout``
instead of failing with SQLITE_BUSY when upgrading a read lock.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sentlink.errors import StoreError
from sentlink.store import MessageRows, SaveRequest
from sentlink.store.batch import Finish
from sentlink.store.schema import MIGRATIONS, migrate
from sentlink.store.sql import Connection, SqlStore

log = logging.getLogger("sentlink.store")

BUSY_TIMEOUT_MS = 5000
CACHE_KIB = 32768
# WAL pages after which a commit copies the WAL back into the database file (a checkpoint, with
# an fsync): SQLite's default, and the bound inside a batch. A reconcile's commit dirties a few
# hundred index pages; at the default nearly every other commit checkpointed, writing the same
# hot pages again each time. Inside a batch the WAL may grow to about 64 MB instead.
CHECKPOINT_PAGES = 1000
BATCH_CHECKPOINT_PAGES = 16384


def sqlite_path(url: str) -> Path:
    """``sqlite:///var/x.db`` -> ``var/x.db`` (relative to cwd); ``sqlite:////var/x.db`` -> abs."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise StoreError(f"bad SQLite URL {url!r}: expected sqlite:///PATH or sqlite:////ABSPATH")
    path = url[len(prefix) :]
    if path == ":memory:" or "?" in path:
        raise StoreError(f"bad SQLite URL {url!r}: a file path is required, without options")
    return Path(path)


class SqliteStore(SqlStore):
    """The ``Store`` interface on one SQLite database file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Addresses and subjects are personal data: create the file 0600 (SQLite gives its
            # -wal and -shm files the database file's permissions).
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror or exc}") from None
        with self._errors():
            migrate(self._conn(), MIGRATIONS)

    # connections and transactions

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,  # explicit BEGIN/COMMIT below
                check_same_thread=False,  # only so close() may run from another thread
            )
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"{self.path}: cannot use WAL journal mode (got {mode})")
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS:d}")
                conn.execute("PRAGMA foreign_keys = ON")
                # NORMAL in WAL mode never corrupts; a power cut may lose the last commits, which
                # the next rescan re-links from the Maildir (the durable queue).
                conn.execute("PRAGMA synchronous = NORMAL")
                # The indexes of a 100,000-message mailbox outgrow SQLite's default 2 MB page
                # cache; each lookup and insert then goes back to the OS for its pages. This is
                # an upper bound, filled only as pages are used.
                conn.execute(f"PRAGMA cache_size = -{CACHE_KIB:d}")
            except BaseException:
                conn.close()
                raise
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    @staticmethod
    def _sqlite(conn: Connection) -> sqlite3.Connection:
        assert isinstance(conn, sqlite3.Connection)
        return conn

    @contextmanager
    def _transaction(self, conn: Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._in_transaction(conn):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _begin(self, conn: Connection) -> Finish:
        conn.execute("BEGIN IMMEDIATE")

        def finish(commit: bool) -> None:
            if not self._in_transaction(conn):
                return
            if commit:
                try:
                    conn.execute("COMMIT")
                    return
                except sqlite3.Error:
                    if self._in_transaction(conn):
                        conn.execute("ROLLBACK")
                    raise
            conn.execute("ROLLBACK")

        return finish

    @contextmanager
    def _savepoint(self, conn: Connection) -> Iterator[None]:
        conn.execute("SAVEPOINT sentlink_write")
        try:
            yield
        except BaseException:
            if self._in_transaction(conn):
                conn.execute("ROLLBACK TO sentlink_write")
                conn.execute("RELEASE sentlink_write")
            raise
        conn.execute("RELEASE sentlink_write")

    def _batch_settings(self, conn: Connection, on: bool, transactions: int) -> None:
        # Back at the default, the next commit (of anyone) checkpoints the grown WAL: about
        # 50 ms after a 100,000-message reconcile. Not done here: the rows are committed
        # already, and whoever waits for them should not wait for the copy as well.
        pages = BATCH_CHECKPOINT_PAGES if on else CHECKPOINT_PAGES
        conn.execute(f"PRAGMA wal_autocheckpoint = {pages:d}")

    def _records_version(self, conn: Connection) -> object:
        # Changes when any other connection (another process: `sentlink crm import`, the
        # outbox worker) commits; this connection's own commits leave it alone.
        return int(conn.execute("PRAGMA data_version").fetchone()[0])

    def _in_transaction(self, conn: Connection) -> bool:
        return self._sqlite(conn).in_transaction

    # messages, many at once

    def save_messages(self, requests: Sequence[SaveRequest]) -> list[bool | StoreError]:
        # A reconcile's messages are nearly all new: then one savepoint and a few multi-row
        # statements write a whole group, where one by one each message costs a savepoint and
        # a handful of statements (each dearer when Python work runs between them). Anything
        # else (a file or Message-ID indexed already, which the unique keys refuse; repeats
        # within the group; new leads; a failing row) goes one by one, as save_message would,
        # each all-or-nothing.
        if (
            len(requests) > 1
            and not any(r.new_records for r in requests)
            and self._bulk_possible(
                [(r.info.account, r.info.uniq, r.info.message_id) for r in requests]
            )
        ):
            try:
                self._save_new(requests)
                return [True] * len(requests)
            except StoreError:
                pass  # the savepoint is rolled back: one by one, each fails on its own
        return super().save_messages(requests)

    def save_rows(self, rows: Sequence[MessageRows]) -> list[bool | StoreError]:
        # As save_messages, from plain values.
        if len(rows) > 1 and self._bulk_possible([(r.account, r.uniq, r.message_id) for r in rows]):
            try:
                self._save_new_rows(rows)
                return [True] * len(rows)
            except StoreError:
                pass
        return super().save_messages([r.request() for r in rows])  # one by one

    @staticmethod
    def _bulk_possible(keys: Sequence[tuple[str, str, str]]) -> bool:
        """One account, and no unique name or Message-ID twice: (account, uniq, Message-ID)."""
        account = keys[0][0]
        if any(k[0] != account for k in keys):
            return False
        ids = [k[2] for k in keys if k[2]]
        return len({k[1] for k in keys}) == len(keys) and len(set(ids)) == len(ids)

    def _save_new(self, requests: Sequence[SaveRequest]) -> None:
        """Write all of ``requests`` as new messages. A file or Message-ID indexed already
        violates a unique key: StoreError, and the savepoint leaves nothing written."""
        with self._write(len(requests)) as conn:
            self._insert_new(
                conn,
                [
                    (
                        i.account,
                        i.message_id,
                        i.direction,
                        i.subject,
                        i.date,
                        int(i.private),
                        i.uniq,
                        i.folder,
                        i.file,
                    )
                    for i in (r.info for r in requests)
                ],
                [
                    (n, ln.record.kind, ln.record.id, ln.email, ln.role, ln.via)
                    for n, r in enumerate(requests)
                    for ln in r.links
                ],
                [(n, e) for n, r in enumerate(requests) for e in r.unmatched],
            )
            for r in requests:
                for event in r.events:
                    self._insert_event(conn, event)
        self._new_messages_written(requests)

    def _save_new_rows(self, rows: Sequence[MessageRows]) -> None:
        """``_save_new`` of rows, without a savepoint: a message or file indexed already is
        found by the count of rows written, and what was written is then deleted again."""
        with self._write(len(rows), savepoint=False) as conn:
            self._insert_new(
                conn,
                [
                    (r.account, r.message_id, r.direction, r.subject, r.date, 0, *r[1:4])
                    for r in rows
                ],
                [(n, *link) for n, r in enumerate(rows) for link in r.links],
                [(n, e) for n, r in enumerate(rows) for e in r.unmatched],
                undo=True,
            )
        self._new_links_written(
            (r.account, r.message_id, [(link[0], link[1]) for link in r.links]) for r in rows
        )

    def _insert_new(
        self,
        conn: Connection,
        messages: Sequence[tuple[str, str, str, str, str, int, str, str, str]],
        links: Sequence[tuple[Any, ...]],
        unmatched: Sequence[tuple[int, str]],
        undo: bool = False,
    ) -> None:
        """Insert new messages, each (account, Message-ID, direction, subject, date, private,
        uniq, folder, file), their links, each (n, kind, record id, email, role, via), and
        unmatched addresses, each (n, email), where n is the message's position.

        A message or file indexed already violates a unique key: sqlite3.IntegrityError. With
        ``undo`` (no savepoint around the call), every row written is deleted again first, on
        that or any other error; if even that fails, the whole transaction is rolled back."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        # What INTEGER PRIMARY KEY would assign one by one (the batch holds the write lock).
        (last,) = conn.execute("SELECT coalesce(max(pk), 0) FROM messages").fetchone()
        first = int(last) + 1
        # With undo, refused rows are skipped and counted rather than raised: the statement
        # then needs no rollback of its own.
        skip = " ON CONFLICT DO NOTHING" if undo else ""
        try:
            written = conn.executemany(
                "INSERT INTO messages"
                " (pk, account, message_id, direction, subject, date, private, indexed_at)"
                f" VALUES (?, ?, ?, ?, ?, ?, ?, ?){skip}",
                [(first + n, *m[:6], now) for n, m in enumerate(messages)],
            ).rowcount
            written += conn.executemany(
                "INSERT INTO message_files (account, uniq, message_pk, folder, file)"
                f" VALUES (?, ?, ?, ?, ?){skip}",
                [(m[0], m[6], first + n, m[7], m[8]) for n, m in enumerate(messages)],
            ).rowcount
            if written != 2 * len(messages):
                raise sqlite3.IntegrityError("a message or file of the group is indexed already")
            if links:
                conn.executemany(
                    "INSERT INTO links (message_pk, kind, record_id, email, role, via)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [(first + link[0], *link[1:]) for link in links],
                )
            if unmatched:
                conn.executemany(
                    "INSERT INTO unmatched (message_pk, email)"
                    " VALUES (?, ?) ON CONFLICT DO NOTHING",
                    [(first + n, e) for n, e in unmatched],
                )
        except BaseException:
            if undo:
                try:
                    # The group's messages are those from ``first`` on; their files, links
                    # and unmatched addresses go with them (ON DELETE CASCADE).
                    conn.execute("DELETE FROM messages WHERE pk >= ?", (first,))
                except BaseException:
                    if self._in_transaction(conn):
                        conn.execute("ROLLBACK")  # the batch's writes are redone by a rescan
                    raise
            raise

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
