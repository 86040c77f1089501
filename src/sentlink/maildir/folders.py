"""Opening (and creating) a Maildir and its Maildir++ folders safely; listing their messages."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sentlink.errors import CaptureError
from sentlink.maildir.names import folder_components, folder_dir_name, folder_path
from sentlink.maildir.safety import (
    DIR_FLAGS,
    NEW_FILE_FLAGS,
    Owner,
    capture_error,
    check_can_write_as,
    close_all,
    give_fd,
    open_or_create_dir,
)

log = logging.getLogger(__name__)

SUBDIRS = ("cur", "new", "tmp")
FOLDER_MARKER = "maildirfolder"
SUBSCRIPTIONS = "subscriptions"
# Dovecot's dotlock for the subscriptions file (file_dotlock_open): we write our new version
# into it with O_EXCL and rename it over the file, exactly as Dovecot does, so the two exclude
# each other. Dovecot treats a lock unchanged for 30 s as stale (SUBSCRIPTION_FILE_CHANGE_TIMEOUT).
_SUBSCRIPTIONS_LOCK = SUBSCRIPTIONS + ".lock"
_STALE_LOCK_SECONDS = 30
_LOCK_WAIT_SECONDS = 0.1
# Dovecot's subscriptions format version 2: this header, then one mailbox per line with its
# hierarchy levels separated by tabs. Without the header (version 1) names use the storage
# separator, "." for Maildir++.
_SUBSCRIPTIONS_V2 = "V\t2\n\n"


@dataclass
class OpenFolder:
    """Descriptors of a checked Maildir root and folder; close() when done."""

    root: Path
    path: Path
    root_fd: int
    folder_fd: int
    tmp_fd: int
    cur_fd: int
    new_fd: int

    def close(self) -> None:
        fds = {self.root_fd, self.folder_fd, self.tmp_fd, self.cur_fd, self.new_fd}
        close_all([fd for fd in fds if fd >= 0])
        self.root_fd = self.folder_fd = self.tmp_fd = self.cur_fd = self.new_fd = -1


def open_folder(root: Path, folder: str, owner: Owner) -> OpenFolder:
    """Check (creating what is missing) the Maildir ``root`` and its ``folder``.

    Every directory must be a real directory owned by ``owner.uid``; see safety.py.
    """
    check_can_write_as(owner)
    dir_name = folder_dir_name(folder)
    path = folder_path(root, folder)
    opened: list[int] = []
    try:
        root_fd = _open_root(root, owner)
        opened.append(root_fd)
        root_subdirs = [open_or_create_dir(d, root_fd, owner, root / d) for d in SUBDIRS]
        opened += root_subdirs
        if dir_name is None:
            cur_fd, new_fd, tmp_fd = root_subdirs
            return OpenFolder(root, path, root_fd, root_fd, tmp_fd, cur_fd, new_fd)
        close_all(opened[1:])
        del opened[1:]
        folder_fd = open_or_create_dir(dir_name, root_fd, owner, path)
        opened.append(folder_fd)
        cur_fd, new_fd, tmp_fd = (
            open_or_create_dir(d, folder_fd, owner, path / d) for d in SUBDIRS
        )
        opened += [cur_fd, new_fd, tmp_fd]
        if not _exists(FOLDER_MARKER, folder_fd):
            _complete_folder(root_fd, folder_fd, root, folder, owner)
        return OpenFolder(root, path, root_fd, folder_fd, tmp_fd, cur_fd, new_fd)
    except BaseException:
        close_all(opened)
        raise


def ensure_folder(root: Path, folder: str, owner: Owner) -> Path:
    """Create ``folder`` (and the Maildir) if missing, as Dovecot would; return its path.

    A new Maildir++ folder gets cur/ new/ tmp/, the empty ``maildirfolder`` marker that Dovecot
    and Courier expect in every folder, and an entry in the root's ``subscriptions`` so that IMAP
    clients show it. The marker is made last, so an interrupted creation is completed next time,
    and a folder that has it (made by Dovecot or by us) is never re-subscribed: a user who
    unsubscribed it keeps that choice.
    """
    open_folder(root, folder, owner).close()
    return folder_path(root, folder)


def list_messages(root: Path, folder: str) -> Iterator[Path]:
    """Message files in ``new/`` and ``cur/`` of a folder (regular files, no dotfiles).

    ``tmp/`` holds deliveries in progress and is skipped. A missing folder has no messages; a
    symlinked one is refused like everywhere else. Names are read eagerly per directory, so no
    descriptor stays open while the caller works on the files.
    """
    path = folder_path(root, folder)
    subdirs = {sub: path / sub for sub in ("new", "cur")}
    for sub, name in list_message_names(root, folder):
        yield subdirs[sub] / name


def list_message_names(root: Path, folder: str) -> Iterator[tuple[str, str]]:
    """``(subdirectory, file name)`` of each file :func:`list_messages` lists, without a path
    object per file: those cost more than the rest of a rescan of an unchanged folder."""
    dir_name = folder_dir_name(folder)
    for sub in ("new", "cur"):
        parts = [sub] if dir_name is None else [dir_name, sub]
        for name in _list_files(root, parts):
            yield sub, name


def _list_files(root: Path, parts: list[str]) -> list[str]:
    """Regular, non-dot files in ``root/parts...``, each level opened without following links."""
    opened: list[int] = []
    try:
        fd = _open_existing(str(root), None, root)
        where = root
        for part in parts:
            if fd is None:
                return []
            opened.append(fd)
            where = where / part
            fd = _open_existing(part, fd, where)
        if fd is None:
            return []
        opened.append(fd)
        with os.scandir(fd) as entries:
            return [
                e.name
                for e in entries
                if not e.name.startswith(".") and e.is_file(follow_symlinks=False)
            ]
    finally:
        close_all(opened)


def _open_existing(name: str, dir_fd: int | None, path: Path) -> int | None:
    """Open a directory without following a symlink; None if it does not exist."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CaptureError("unsafe", f"{path} is a symlink or not a directory") from exc
        raise capture_error(exc, "cannot list", path) from exc


def _open_root(root: Path, owner: Owner) -> int:
    try:
        return open_or_create_dir(str(root), None, owner, root)
    except CaptureError as exc:
        if not isinstance(exc.__cause__, FileNotFoundError):
            raise
    # A missing parent (e.g. ./var/mail on a fresh install): create it with the usual umask
    # permissions, owned by us, like any mail spool parent; the Maildir itself is the owner's.
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise capture_error(exc, "cannot create", root.parent) from exc
    return open_or_create_dir(str(root), None, owner, root)


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _complete_folder(root_fd: int, folder_fd: int, root: Path, folder: str, owner: Owner) -> None:
    if not _subscribe(root_fd, root, folder_components(folder), owner):
        return  # subscriptions locked by Dovecot: leave the marker out, retry on the next call
    marker = folder_path(root, folder) / FOLDER_MARKER
    try:
        fd = os.open(FOLDER_MARKER, NEW_FILE_FLAGS, 0o600, dir_fd=folder_fd)
    except FileExistsError:
        return
    except OSError as exc:
        raise capture_error(exc, "cannot create", marker) from exc
    try:
        give_fd(fd, owner, marker)
    finally:
        os.close(fd)


def _subscribe(root_fd: int, root: Path, components: list[str], owner: Owner) -> bool:
    """Add the folder to Dovecot's ``subscriptions`` unless listed; False if it is locked."""
    lock_path = root / _SUBSCRIPTIONS_LOCK
    fd = _take_subscriptions_lock(root_fd, lock_path)
    if fd is None:
        # Retried with the next copy into this folder; nothing is lost meanwhile.
        log.info("%s: locked, subscribing %s later", lock_path, ".".join(components))
        return False
    renamed = False
    try:
        current = _read_subscriptions(root_fd, root / SUBSCRIPTIONS)
        v2 = current.startswith(_SUBSCRIPTIONS_V2)
        body = current[len(_SUBSCRIPTIONS_V2) :] if v2 else current
        entry = "\t".join(components) if v2 else ".".join(components)
        if entry in body.splitlines():
            return True
        if body and not body.endswith("\n"):
            body += "\n"
        text = (_SUBSCRIPTIONS_V2 if v2 else "") + body + entry + "\n"
        try:
            os.write(fd, text.encode("utf-8", errors="surrogateescape"))  # small: one write
            os.fsync(fd)
        except OSError as exc:
            raise capture_error(exc, "cannot write", lock_path) from exc
        give_fd(fd, owner, lock_path)
        try:
            os.rename(_SUBSCRIPTIONS_LOCK, SUBSCRIPTIONS, src_dir_fd=root_fd, dst_dir_fd=root_fd)
        except OSError as exc:
            raise capture_error(exc, "cannot replace", root / SUBSCRIPTIONS) from exc
        renamed = True
        return True
    finally:
        os.close(fd)
        if not renamed:
            _unlink_quietly(_SUBSCRIPTIONS_LOCK, root_fd)


def _take_subscriptions_lock(root_fd: int, lock_path: Path) -> int | None:
    """The lock file, created; None while someone else holds it. A holder (Dovecot, or
    another copy creating the same folder at the same moment) keeps it for a write and a
    rename: waited for up to _LOCK_WAIT_SECONDS. One older than _STALE_LOCK_SECONDS is
    removed."""
    deadline = time.monotonic() + _LOCK_WAIT_SECONDS
    stale_removed = False
    while True:
        try:
            return os.open(_SUBSCRIPTIONS_LOCK, NEW_FILE_FLAGS, 0o600, dir_fd=root_fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise capture_error(exc, "cannot create", lock_path) from exc
        try:
            age = time.time() - os.stat(_SUBSCRIPTIONS_LOCK, dir_fd=root_fd).st_mtime
        except FileNotFoundError:
            continue  # released meanwhile: try again at once
        if age >= _STALE_LOCK_SECONDS and not stale_removed:
            log.warning("%s: removing a stale lock (%d s old)", lock_path, age)
            _unlink_quietly(_SUBSCRIPTIONS_LOCK, root_fd)
            stale_removed = True
            continue
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


def _read_subscriptions(root_fd: int, path: Path) -> str:
    try:
        fd = os.open(SUBSCRIPTIONS, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise capture_error(exc, "cannot read", path) from exc
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError as exc:
        raise capture_error(exc, "cannot read", path) from exc
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", errors="surrogateescape")


def _unlink_quietly(name: str, dir_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
