"""SQLite schema as an ordered list of migrations, applied once each via ``PRAGMA user_version``.

Migrations are only ever appended: step N brings a database from version N-1 to N. A database
newer than this code knows is refused rather than written with an older idea of the schema.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence

from sentlink.errors import StoreError

log = logging.getLogger("sentlink.store")

Migration = tuple[str, ...]  # statements run in one transaction

MIGRATIONS: tuple[Migration, ...] = (
    # 1: records, messages (one row per message, keyed by Message-ID within an account), the
    # Maildir files that hold them (keyed by unique name), and links.
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
            pk INTEGER PRIMARY KEY,
            account TEXT NOT NULL,
            message_id TEXT NOT NULL,
            direction TEXT NOT NULL CHECK (direction IN ('sent', 'received')),
            subject TEXT NOT NULL,
            date TEXT NOT NULL,
            private INTEGER NOT NULL DEFAULT 0,
            indexed_at TEXT NOT NULL
        )""",
        # Partial: messages without a Message-ID are told apart by their files only.
        """CREATE UNIQUE INDEX messages_by_message_id ON messages (account, message_id)
            WHERE message_id <> ''""",
        """CREATE TABLE message_files (
            account TEXT NOT NULL,
            uniq TEXT NOT NULL,
            message_pk INTEGER NOT NULL REFERENCES messages (pk) ON DELETE CASCADE,
            folder TEXT NOT NULL,
            file TEXT NOT NULL,
            PRIMARY KEY (account, uniq)
        )""",
        "CREATE INDEX message_files_by_message ON message_files (message_pk)",
        """CREATE TABLE links (
            message_pk INTEGER NOT NULL REFERENCES messages (pk) ON DELETE CASCADE,
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
    # 2: the outbox (events written with the links, one delivery per hook), hooks a receiver
    # disabled (410 Gone), and addresses that matched no record (crm.unmatched: review).
    (
        """CREATE TABLE events (
            pk INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL,
            payload TEXT NOT NULL,
            records TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL
        )""",
        # Record keys of events some hook still waits for: what orders deliveries per record.
        """CREATE TABLE event_records (
            event_pk INTEGER NOT NULL REFERENCES events (pk) ON DELETE CASCADE,
            record TEXT NOT NULL,
            PRIMARY KEY (event_pk, record)
        )""",
        "CREATE INDEX event_records_by_record ON event_records (record, event_pk)",
        """CREATE TABLE deliveries (
            event_pk INTEGER NOT NULL REFERENCES events (pk) ON DELETE CASCADE,
            hook TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'dead')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at REAL NOT NULL,
            since REAL NOT NULL,
            lease_owner TEXT,
            lease_until REAL,
            last_error TEXT NOT NULL DEFAULT '',
            finished_at REAL,
            PRIMARY KEY (hook, event_pk)
        )""",
        "CREATE INDEX deliveries_due ON deliveries (hook, state, event_pk)",
        "CREATE INDEX deliveries_by_event ON deliveries (event_pk)",
        """CREATE TABLE hook_state (
            hook TEXT PRIMARY KEY,
            disabled_at REAL NOT NULL,
            reason TEXT NOT NULL DEFAULT ''
        )""",
        """CREATE TABLE unmatched (
            message_pk INTEGER NOT NULL REFERENCES messages (pk) ON DELETE CASCADE,
            email TEXT NOT NULL,
            PRIMARY KEY (message_pk, email)
        )""",
        "CREATE INDEX unmatched_by_email ON unmatched (email)",
    ),
)


def schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Apply the steps the database has not seen; returns how many ran.

    Each step and its version bump commit together (``user_version`` lives in the database
    header and is transactional), under ``BEGIN IMMEDIATE`` so two processes starting at once
    cannot both run a step: the second re-reads the version after the first commits.
    """
    applied = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = schema_version(conn)
            if version > len(migrations):
                raise StoreError(
                    f"database schema version {version} is newer than this sentlink knows "
                    f"({len(migrations)})"
                )
            if version == len(migrations):
                conn.execute("COMMIT")
                return applied
            for statement in migrations[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1:d}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied += 1
        log.info("store schema migrated to version %d", version + 1)
