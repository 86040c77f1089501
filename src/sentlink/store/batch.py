"""Batched writes: many messages per transaction during a reconcile, each still all-or-nothing.

One transaction per message costs one commit per message (SQLite: a WAL append and a lock
hand-over; PostgreSQL: a round trip and a WAL flush), more than indexing the message itself.
Inside ``Store.batch()`` the writes of the calling thread share one transaction, committed every
``max_writes`` writes or ``max_seconds`` (checked after each write) and when the block ends.
Each write (one ``save_message``: the message row, its file, links, unmatched addresses and
outbox rows) runs in its own savepoint, so a failing one leaves none of its rows and the batch
goes on; reads on the same thread see the batch's rows.

A crash before a commit loses that batch's index rows and outbox rows together, never a message:
the Maildir is the queue, and the next rescan indexes and links those files again. Hooks given
as ``before_commit`` run first: the watcher fsyncs there the directories its renames touched, so
no committed row can name a file whose move a crash could still undo.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sentlink.model import Record

if TYPE_CHECKING:
    from sentlink.store.sql import Connection

Finish = Callable[[bool], None]  # commit (True) or roll back (False) the open transaction


@dataclass
class WriteBatch:
    """The open batch of one thread."""

    max_writes: int
    max_seconds: float
    hooks: list[Callable[[], None]] = field(default_factory=list)
    conn: Connection | None = None  # the connection the open transaction is on
    finish: Finish | None = None  # set while a transaction is open
    writes: int = 0
    started: float = 0.0
    # records_by_email answers while the transaction is open. With SQLite nobody else can
    # change records meanwhile (the batch holds the write lock); with PostgreSQL a record
    # another node commits is seen from the next batch on, at most max_seconds later.
    # Cleared whenever this thread writes records.
    records: dict[str, list[Record]] = field(default_factory=dict)

    def begin(self, conn: Connection, finish: Finish) -> None:
        self.conn, self.finish = conn, finish
        self.writes = 0
        self.started = time.monotonic()
        self.records.clear()

    def due(self) -> bool:
        return self.writes >= self.max_writes or time.monotonic() - self.started >= self.max_seconds

    def end(self, commit: bool) -> None:
        """Commit (hooks first) or roll back the open transaction, if any."""
        finish, self.finish, self.conn = self.finish, None, None
        self.records.clear()
        if finish is None:
            return
        if commit:
            try:
                for hook in self.hooks:
                    hook()
            except BaseException:
                finish(False)
                raise
        finish(commit)
