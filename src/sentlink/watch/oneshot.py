"""``sentlink watch --once`` and ``--dry-run``: one reconcile of the watched folders, then exit.

The command line draws the progress bar and prints; this module only does the work, so the same
reconcile runs in tests and benchmarks without a terminal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sentlink.config.models import AccountConfig, Config
from sentlink.linker import Linker
from sentlink.store import Store
from sentlink.watch.handler import MessageHandler, Plan, WatchPolicy
from sentlink.watch.known import known_files_for
from sentlink.watch.scan import (
    PARALLEL_FROM,
    FolderRef,
    ScanSummary,
    Workers,
    pending_by_folder,
    scan_folders,
    watched_folders,
)

log = logging.getLogger("sentlink.watch")


@dataclass(frozen=True)
class Unreadable:
    """A file ``--dry-run`` could not read (vanished or unreadable)."""

    account: str
    folder: str
    file: str
    error: str

    def describe(self) -> str:
        return f"cannot read: {self.error}"

    def as_dict(self) -> dict[str, object]:
        return {
            "account": self.account,
            "folder": self.folder,
            "file": self.file,
            "error": self.error,
        }


class Reconcile:
    """One pass over the watched folders of ``accounts``; use as a context manager."""

    def __init__(
        self,
        config: Config,
        accounts: Sequence[AccountConfig],
        store: Store,
        secret: bytes | None,
    ) -> None:
        self.refs = watched_folders(config, accounts)
        self._store = store
        self._linker = Linker(store, config)
        self._known = known_files_for(store)
        self._handler = MessageHandler(
            store, self._linker, WatchPolicy.from_config(config, secret), self._known
        )
        self._workers = Workers(self._handler.preparer)

    def __enter__(self) -> Reconcile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._workers.close()
        self._known.close()

    def pending(self, record_moves: bool = True) -> dict[FolderRef, list[str]]:
        """New files per folder (a directory listing and a set difference per folder). A folder
        that looks like a large job starts the helper processes of ``run`` already, unless
        ``record_moves`` is false (``--dry-run``: nothing will be run)."""
        on_large = self._workers.start if record_moves else None
        return pending_by_folder(self.refs, self._store, self._known, record_moves, on_large)

    def run(
        self,
        pending: dict[FolderRef, list[str]],
        progress: Callable[[int], None] | None = None,
        parallel_from: int = PARALLEL_FROM,
    ) -> ScanSummary:
        """Handle the ``pending`` files; a folder with ``parallel_from`` of them or more is
        prepared in a worker process (watch/scan.py)."""
        return scan_folders(
            self.refs,
            self._store,
            self._linker,
            progress,
            self._handler,
            pending,
            parallel_from,
            self._workers,
        )

    def explain(self, pending: dict[FolderRef, list[str]]) -> Iterator[Plan | Unreadable]:
        """What ``run`` would do with each file, changing nothing."""
        for ref, paths in pending.items():
            for name in paths:
                path = Path(name)
                try:
                    yield self._handler.explain(ref.account, ref.folder, path)
                except OSError as exc:
                    yield Unreadable(
                        ref.account.name,
                        ref.folder,
                        str(path.relative_to(ref.account.maildir)),
                        exc.strerror or str(exc),
                    )
