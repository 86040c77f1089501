"""Checked folder descriptors kept open between deliveries into the same folder.

Opening a folder with every check (folders.open_folder) costs about eight directory opens, fstats
and closes. A writer filing many copies into a few Sent folders keeps them open here instead and,
before lending them to the next delivery, checks that the paths still name the same directories
(lstat: same st_dev/st_ino, still owned by the mailbox owner). A folder that was removed,
renamed, replaced or given to another owner fails that check and is opened again with every
check, so a copy never lands in a directory Dovecot no longer shows, nor in one the owner lost.
As with a fresh open, all work is relative to the descriptors, so a symlink swapped in after the
check is never followed.

Descriptors are shared by concurrent deliveries; a folder dropped from the cache (least recently
used past ``max_folders``, idle past ``max_idle``, failed check, close()) is closed only once its
last delivery gives it back, so a descriptor number is never reused under a delivery in progress.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sentlink.maildir.folders import OpenFolder, open_folder
from sentlink.maildir.names import folder_dir_name
from sentlink.maildir.safety import Owner, check_can_write_as

_Key = tuple[Path, str, Owner]


@dataclass(frozen=True)
class _DirId:
    """Where a checked directory was found (name relative to ``parent``) and which it was."""

    name: str
    parent: int | None
    dev: int
    ino: int

    def still_there(self, uid: int) -> bool:
        try:
            st = os.stat(self.name, dir_fd=self.parent, follow_symlinks=False)
        except OSError:
            return False
        return st.st_ino == self.ino and st.st_dev == self.dev and st.st_uid == uid


class _Entry:
    """One cached folder: its descriptors, how to recheck them, and who is using them."""

    __slots__ = ("folder", "ids", "last_used", "retired", "users")

    def __init__(self, folder: OpenFolder, ids: tuple[_DirId, ...], now: float) -> None:
        self.folder = folder
        self.ids = ids
        self.users = 1
        self.retired = False
        self.last_used = now


class FolderLease:
    """A folder's descriptors lent to one delivery; close() gives them back (idempotent)."""

    def __init__(self, folder: OpenFolder, give_back: Callable[[], None]) -> None:
        self.folder = folder
        self._give_back: Callable[[], None] | None = give_back

    def close(self) -> None:
        give_back, self._give_back = self._give_back, None
        if give_back is not None:
            give_back()


def lease_folder(
    root: Path, folder: str, owner: Owner, folders: FolderCache | None = None
) -> FolderLease:
    """The checked folder from ``folders`` when given, else freshly opened (and closed after)."""
    if folders is not None:
        return folders.lease(root, folder, owner)
    opened = open_folder(root, folder, owner)
    return FolderLease(opened, opened.close)


class FolderCache:
    """Open, checked Maildir folders by (root, folder, owner); thread-safe, bounded, LRU.

    ``close()`` (or garbage collection, or interpreter exit) closes every folder not in use and
    the rest as their deliveries finish; leases taken afterwards are simply not cached.
    """

    def __init__(
        self,
        max_folders: int = 32,
        max_idle: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_folders < 1:
            raise ValueError("max_folders must be at least 1")
        self._max_folders = max_folders
        # Idle folders are let go so that an unmounted or deleted mailbox is not held open.
        self._max_idle = max_idle
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._closed = [False]
        self._finalizer = weakref.finalize(
            self, _retire_all, self._lock, self._entries, self._closed
        )

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def lease(self, root: Path, folder: str, owner: Owner) -> FolderLease:
        check_can_write_as(owner)
        key = (root, folder, owner)
        now = self._clock()
        with self._lock:
            self._drop_idle(now)
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.users += 1
                entry.last_used = now
        if entry is not None:
            try:
                valid = all(ident.still_there(owner.uid) for ident in entry.ids)
            except BaseException:
                self._give_back(entry)
                raise
            if valid:
                return self._lent(entry)
            with self._lock:
                self._retire(key, entry)
            self._give_back(entry)
        opened = open_folder(root, folder, owner)  # every check, creating what is missing
        try:
            entry = _Entry(opened, _identify(opened, folder), now)
        except BaseException:
            opened.close()
            raise
        with self._lock:
            if self._closed[0]:
                entry.retired = True  # after close(): serve it, but do not keep it
            else:
                old = self._entries.pop(key, None)
                if old is not None:
                    self._retire(key, old)
                self._entries[key] = entry
                while len(self._entries) > self._max_folders:
                    oldest_key, oldest = next(iter(self._entries.items()))
                    self._retire(oldest_key, oldest)
        return self._lent(entry)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> FolderCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _lent(self, entry: _Entry) -> FolderLease:
        return FolderLease(entry.folder, lambda: self._give_back(entry))

    def _give_back(self, entry: _Entry) -> None:
        with self._lock:
            entry.users -= 1
            if entry.users == 0 and entry.retired:
                entry.folder.close()

    def _retire(self, key: _Key, entry: _Entry) -> None:
        """Drop ``entry`` from the cache (lock held); close it now if nobody uses it."""
        if self._entries.get(key) is entry:
            del self._entries[key]
        if not entry.retired:
            entry.retired = True
            if entry.users == 0:
                entry.folder.close()

    def _drop_idle(self, now: float) -> None:
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.last_used < self._max_idle:
                return
            self._retire(key, entry)


def _retire_all(
    lock: threading.Lock, entries: OrderedDict[_Key, _Entry], closed: list[bool]
) -> None:
    with lock:
        closed[0] = True
        for entry in entries.values():
            entry.retired = True
            if entry.users == 0:
                entry.folder.close()
        entries.clear()


def _identify(opened: OpenFolder, folder: str) -> tuple[_DirId, ...]:
    """The directories a delivery writes through, and how to find them again by name."""

    def ident(name: str, parent: int | None, fd: int) -> _DirId:
        st = os.fstat(fd)
        return _DirId(name, parent, st.st_dev, st.st_ino)

    ids = [ident(str(opened.root), None, opened.root_fd)]
    dir_name = folder_dir_name(folder)
    if dir_name is not None:
        ids.append(ident(dir_name, opened.root_fd, opened.folder_fd))
    ids.append(ident("cur", opened.folder_fd, opened.cur_fd))
    ids.append(ident("tmp", opened.folder_fd, opened.tmp_fd))
    return tuple(ids)
