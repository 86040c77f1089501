"""What the store already knows about Maildir files, read in bulk for the watcher.

A periodic rescan of an unchanged mailbox must not open a single message file: it lists the
folder and takes the difference against the unique names the store has indexed for it. The
``Store`` interface answers one name at a time, so for SQLite this reads the store's tables
through its own read-only connection (WAL readers never block the writer). Other backends fall
back to per-file lookups and skip duplicate detection.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sentlink.errors import StoreError
from sentlink.store import Store

log = logging.getLogger("sentlink.watch")


@dataclass(frozen=True)
class KnownFile:
    uniq: str
    folder: str
    file: str  # relative to the account's Maildir root


class KnownFiles(Protocol):
    def folder_files(self, account: str, folder: str) -> dict[str, str] | None:
        """``{uniq: file}`` indexed in ``folder``, or None when the backend cannot list them."""

    def message_files(self, account: str, message_id: str) -> list[KnownFile]:
        """Every indexed file of the account's message with this Message-ID (oldest first)."""

    def account_uniqs(self, account: str) -> set[str] | None:
        """Every indexed unique name of the account (all folders), or None (unsupported)."""

    def close(self) -> None: ...


class NoBulkLookups:
    """For stores without a bulk query: per-file lookups, no duplicate detection."""

    def folder_files(self, account: str, folder: str) -> dict[str, str] | None:
        return None

    def message_files(self, account: str, message_id: str) -> list[KnownFile]:
        return []

    def account_uniqs(self, account: str) -> set[str] | None:
        return None

    def close(self) -> None:
        pass


class SqliteKnownFiles:
    """Read-only queries on the SQLite store's ``message_files`` and ``messages`` tables."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                conn = sqlite3.connect(
                    f"{self._path.resolve().as_uri()}?mode=ro",
                    uri=True,
                    timeout=30,
                    check_same_thread=False,
                )
            except sqlite3.Error as exc:
                raise StoreError(f"{self._path}: {exc}") from exc
            self._conn = conn
        return self._conn

    def folder_files(self, account: str, folder: str) -> dict[str, str] | None:
        with self._lock:
            try:
                rows = self._connect().execute(
                    "SELECT uniq, file FROM message_files WHERE account = ? AND folder = ?",
                    (account, folder),
                )
                return dict(rows.fetchall())
            except sqlite3.Error as exc:
                raise StoreError(f"{self._path}: {exc}") from exc

    def account_uniqs(self, account: str) -> set[str] | None:
        with self._lock:
            try:
                rows = self._connect().execute(
                    "SELECT uniq FROM message_files WHERE account = ?", (account,)
                )
                return {row[0] for row in rows}
            except sqlite3.Error as exc:
                raise StoreError(f"{self._path}: {exc}") from exc

    def message_files(self, account: str, message_id: str) -> list[KnownFile]:
        if not message_id:
            return []
        with self._lock:
            try:
                # `message_id <> ''` lets SQLite use the partial index messages_by_message_id;
                # CROSS JOIN keeps the message as the outer loop (files found through
                # message_files_by_message). Sorting in SQL made the planner scan every file.
                rows = (
                    self._connect()
                    .execute(
                        "SELECT f.rowid, f.uniq, f.folder, f.file FROM messages m"
                        " CROSS JOIN message_files f ON f.message_pk = m.pk"
                        " WHERE m.account = ? AND m.message_id = ? AND m.message_id <> ''",
                        (account, message_id),
                    )
                    .fetchall()
                )
            except sqlite3.Error as exc:
                raise StoreError(f"{self._path}: {exc}") from exc
        return [KnownFile(u, f, p) for _rowid, u, f, p in sorted(rows)]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def known_files_for(store: Store) -> KnownFiles:
    """The bulk reader matching ``store``'s backend."""
    from sentlink.store.sqlite import SqliteStore

    if isinstance(store, SqliteStore):
        return SqliteKnownFiles(store.path)
    log.info("store has no bulk lookups: rescans look files up one by one, no duplicate check")
    return NoBulkLookups()
