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
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sentlink.addresses import normalize_address
from sentlink.errors import StoreError
from sentlink.model import Link, MessageInfo, Record, RecordKind
from sentlink.store import LinkRow
from sentlink.store.schema import MIGRATIONS, migrate

log = logging.getLogger("sentlink.store")

BUSY_TIMEOUT_MS = 5000
_CHUNK = 500  # bound on "IN (?, ...)" parameters per statement (SQLite's limit was 999)

_LINKS_QUERY = """
SELECT m.account, m.direction, m.message_id, m.subject, m.date,
       coalesce(f.folder, ''), coalesce(f.file, ''),
       l.kind, l.record_id, r.name, l.email, l.role, l.via
FROM links l
JOIN messages m ON m.pk = l.message_pk
JOIN records r ON r.kind = l.kind AND r.id = l.record_id
LEFT JOIN message_files f
  ON f.rowid = (SELECT min(rowid) FROM message_files WHERE message_pk = m.pk)
"""


def sqlite_path(url: str) -> Path:
    """``sqlite:///var/x.db`` -> ``var/x.db`` (relative to cwd); ``sqlite:////var/x.db`` -> abs."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise StoreError(f"bad SQLite URL {url!r}: expected sqlite:///PATH or sqlite:////ABSPATH")
    path = url[len(prefix) :]
    if path == ":memory:" or "?" in path:
        raise StoreError(f"bad SQLite URL {url!r}: a file path is required, without options")
    return Path(path)


class SqliteStore:
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

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._errors():
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    # records

    def upsert_record(self, record: Record) -> None:
        self.upsert_records([record])

    def upsert_records(self, records: Iterable[Record]) -> int:
        count = 0
        with self._write() as conn:
            for record in records:
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
                count += 1
        return count

    def records_by_email(self, email: str) -> list[Record]:
        with self._errors():
            keys = self._conn().execute(
                "SELECT DISTINCT kind, id FROM record_emails WHERE email = ?", (email,)
            )
            return self._load_records(keys.fetchall())

    def _load_records(self, keys: Iterable[tuple[str, str]]) -> list[Record]:
        conn = self._conn()
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
        with self._errors():
            row = (
                self._conn()
                .execute(
                    "SELECT folder, file FROM message_files WHERE account = ? AND uniq = ?",
                    (account, uniq),
                )
                .fetchone()
            )
        return None if row is None else (row[0], row[1])

    def move_message(self, account: str, uniq: str, folder: str, file: str) -> bool:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE message_files SET folder = ?, file = ? WHERE account = ? AND uniq = ?",
                (folder, file, account, uniq),
            )
            return cur.rowcount > 0

    def save_message(self, info: MessageInfo, links: Sequence[Link]) -> bool:
        with self._write() as conn:
            if conn.execute(
                "SELECT 1 FROM message_files WHERE account = ? AND uniq = ?",
                (info.account, info.uniq),
            ).fetchone():
                return False
            if info.message_id:
                row = conn.execute(
                    "SELECT pk FROM messages WHERE account = ? AND message_id = ?",
                    (info.account, info.message_id),
                ).fetchone()
                if row is not None:
                    # Another copy of an indexed message: remember the file, link nothing.
                    self._insert_file(conn, info, int(row[0]))
                    return False
            cur = conn.execute(
                "INSERT INTO messages"
                " (account, message_id, direction, subject, date, private, indexed_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    info.account,
                    info.message_id,
                    info.direction,
                    info.subject,
                    info.date,
                    int(info.private),
                    datetime.now(UTC).isoformat(timespec="seconds"),
                ),
            )
            pk = cur.lastrowid
            assert pk is not None
            self._insert_file(conn, info, pk)
            conn.executemany(
                "INSERT OR IGNORE INTO links (message_pk, kind, record_id, email, role, via)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(pk, ln.record.kind, ln.record.id, ln.email, ln.role, ln.via) for ln in links],
            )
            return True

    @staticmethod
    def _insert_file(conn: sqlite3.Connection, info: MessageInfo, pk: int) -> None:
        conn.execute(
            "INSERT INTO message_files (account, uniq, message_pk, folder, file)"
            " VALUES (?, ?, ?, ?, ?)",
            (info.account, info.uniq, pk, info.folder, info.file),
        )

    def linked_records_for_message_ids(
        self, account: str, message_ids: Sequence[str]
    ) -> list[Record]:
        ids = sorted({m for m in message_ids if m})
        keys: set[tuple[str, str]] = set()
        with self._errors():
            conn = self._conn()
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                marks = ", ".join("?" * len(chunk))
                rows = conn.execute(
                    "SELECT DISTINCT l.kind, l.record_id FROM messages m"
                    " JOIN links l ON l.message_pk = m.pk"
                    f" WHERE m.account = ? AND m.private = 0 AND m.message_id IN ({marks})",
                    (account, *chunk),
                )
                keys.update((k, r) for k, r in rows)
            return self._load_records(sorted(keys))

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
            where.append("m.message_id = ?")
            params.append(message_id)
        sql = _LINKS_QUERY
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY m.pk, l.kind, l.record_id, l.email"
        return self._iter_links(sql, params)

    def _iter_links(self, sql: str, params: list[Any]) -> Iterator[LinkRow]:
        with self._errors():
            for row in self._conn().execute(sql, params):
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
        with self._write() as conn:
            # message_files and links go with their message (ON DELETE CASCADE).
            return conn.execute("DELETE FROM messages WHERE account = ?", (account,)).rowcount
