"""The watcher: Maildir folders are the durable queue; this feeds what lands there to the linker.

Events (inotify through watchdog) are hints only: watchdog drops events when the kernel queue
overflows, so a rescan at start and every ``watch.rescan_seconds`` reconciles against the store.
"""

from __future__ import annotations

from sentlink.watch.handler import MessageHandler, WatchPolicy
from sentlink.watch.scan import (
    FolderRef,
    ScanSummary,
    scan_folders,
    sent_folders,
    watched_folders,
)
from sentlink.watch.service import FolderWatcher

__all__ = [
    "FolderRef",
    "FolderWatcher",
    "MessageHandler",
    "ScanSummary",
    "WatchPolicy",
    "scan_folders",
    "sent_folders",
    "watched_folders",
]
