"""Reconcile Maildir folders against the store: link every message file not yet indexed."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sentlink.config.models import AccountConfig
from sentlink.linker import Linker
from sentlink.maildir import folder_path, list_messages, split_uniq
from sentlink.model import Direction
from sentlink.store import Store

log = logging.getLogger("sentlink.watch")


@dataclass(frozen=True)
class FolderRef:
    """One watched Maildir folder of one account, and the direction of the mail it holds."""

    account: AccountConfig
    folder: str
    direction: Direction

    @property
    def path(self) -> Path:
        return folder_path(self.account.maildir, self.folder)


@dataclass
class ScanSummary:
    seen: int = 0
    linked: int = 0
    already: int = 0
    skipped: int = 0
    failed: int = 0
    by_status: dict[str, int] = field(default_factory=dict)

    def add(self, status: str) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if status == "linked":
            self.linked += 1
        elif status == "already":
            self.already += 1
        elif status in ("error", "failed"):
            self.failed += 1
        else:
            self.skipped += 1

    def as_dict(self) -> dict[str, object]:
        return {
            "seen": self.seen,
            "linked": self.linked,
            "already": self.already,
            "skipped": self.skipped,
            "failed": self.failed,
            "by_status": dict(sorted(self.by_status.items())),
        }


def sent_folders(accounts: Sequence[AccountConfig]) -> list[FolderRef]:
    """Each account's Sent folder: what the capture entrances and IMAP clients write to."""
    return [FolderRef(a, a.sent_folder, "sent") for a in accounts]


def link_one(linker: Linker, ref: FolderRef, path: Path) -> str:
    """Link one file; a failure is logged and reported, never raised (the next rescan retries)."""
    try:
        result = linker.link_file(ref.account, ref.folder, path, ref.direction)
    except FileNotFoundError:
        # A client renamed it (flag change) or moved it away meanwhile: the rescan sees it again.
        return "vanished"
    except Exception as exc:  # one bad file must not stop the watcher
        log.warning("account=%s file=%s link failed: %s", ref.account.name, path.name, exc)
        return "error"
    return result.status


def relative_file(ref: FolderRef, path: Path) -> str:
    try:
        return str(path.relative_to(ref.account.maildir))
    except ValueError:
        return str(path)


def needs_linking(store: Store, ref: FolderRef, path: Path) -> bool:
    """True for a file the store has not indexed. For one it has, keep its location current.

    Clients rename a message file to change its flags (``:2,S`` -> ``:2,RS``) and move it between
    folders; the unique name before ``:2,`` stays, so the message is the same one.
    """
    uniq = split_uniq(path.name)
    where = store.message_location(ref.account.name, uniq)
    if where is None:
        return True
    file = relative_file(ref, path)
    if where != (ref.folder, file):
        store.move_message(ref.account.name, uniq, ref.folder, file)
    return False


def pending_files(store: Store, ref: FolderRef) -> Iterable[Path]:
    """Message files of ``ref`` that the store has not indexed yet."""
    if not ref.path.is_dir():
        return
    for path in list_messages(ref.account.maildir, ref.folder):
        if needs_linking(store, ref, path):
            yield path


def scan_folders(
    refs: Sequence[FolderRef],
    store: Store,
    linker: Linker,
    progress: Callable[[int], None] | None = None,
) -> ScanSummary:
    """Link every message not yet in the store. ``progress`` is called once per file."""
    summary = ScanSummary()
    for ref in refs:
        for path in pending_files(store, ref):
            summary.seen += 1
            summary.add(link_one(linker, ref, path))
            if progress is not None:
                progress(1)
    return summary


def count_files(refs: Sequence[FolderRef]) -> int:
    """How many message files the folders hold (for a progress bar's length)."""
    return sum(
        sum(1 for _ in list_messages(r.account.maildir, r.folder)) for r in refs if r.path.is_dir()
    )
