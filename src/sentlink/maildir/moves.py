"""Moving messages between folders and changing their flags, as IMAP servers do: by rename().

A rename within one file system is atomic, so a message is always in exactly one folder, and the
unique name is kept, so everything keyed by it (the link store) stays valid. IMAP clients rename
files at any moment to change flags (``new/X`` -> ``cur/X:2,S`` -> ``cur/X:2,RS``); when our
source name has vanished we look the unique name up again in ``new/`` and ``cur/`` and retry,
as Dovecot does for its own renames. The target name can only exist if it is this very message
(same unique name and flags), so rename() replacing it loses nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from sentlink.errors import CaptureError
from sentlink.maildir.cache import FolderCache, lease_folder
from sentlink.maildir.names import (
    INFO_SEPARATOR,
    merge_flags,
    normalize_flags,
    parse_flags,
    split_uniq,
)
from sentlink.maildir.safety import Owner, capture_error, fsync_dir

log = logging.getLogger(__name__)

_ATTEMPTS = 5


def move_message(
    src: Path,
    dest_root: Path,
    dest_folder: str,
    owner: Owner,
    add_flags: str = "",
    unsynced: set[Path] | None = None,
    folders: FolderCache | None = None,
) -> Path:
    """Move a message file into ``dest_folder``'s ``cur/``, keeping its unique name.

    The flags are the file's current ones plus ``add_flags``. The destination is checked (and
    created) like a delivery's. Raises CaptureError("io") if the message is gone, and for a
    destination on another file system (no atomic rename there).

    Both directories are fsynced so the rename survives a crash; with ``unsynced`` given they
    are added to it instead, for one :func:`sync_dirs` over many moves. The rename is atomic
    either way (the message is in exactly one folder); until the sync a crash may undo it.
    With ``folders`` given, the destination's checked descriptors come from (and stay in) it.
    """
    normalize_flags(add_flags)  # invalid flags are a caller's bug: fail before touching anything
    uniq = split_uniq(src.name)
    lease = lease_folder(dest_root, dest_folder, owner, folders)
    dest = lease.folder
    try:
        current = src
        for _ in range(_ATTEMPTS):
            name = f"{uniq}{INFO_SEPARATOR}{merge_flags(parse_flags(current.name), add_flags)}"
            try:
                _check_regular_file(current)
                os.rename(current, name, dst_dir_fd=dest.cur_fd)
            except FileNotFoundError:
                current = _find_or_fail(current, uniq)
                continue
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    raise CaptureError(
                        "io", f"cannot move {current} to {dest.path}: another file system"
                    ) from exc
                raise capture_error(exc, "cannot move", current) from exc
            if unsynced is None:
                _sync(dest.cur_fd, dest.path / "cur")
                _sync_dir_path(current.parent)
            else:
                unsynced.update((dest.path / "cur", current.parent))
            return dest.path / "cur" / name
        raise CaptureError("io", f"{src}: renamed by others {_ATTEMPTS} times while moving it")
    finally:
        lease.close()


def sync_dirs(paths: Iterable[Path]) -> None:
    """fsync each directory (the moves :func:`move_message` left unsynced); failures are
    logged, as for a single move."""
    for path in paths:
        _sync_dir_path(path)


def set_flags(path: Path, flags: str) -> Path:
    """Give a message exactly ``flags`` (moving it from ``new/`` to ``cur/``); the new path."""
    flags = normalize_flags(flags)
    uniq = split_uniq(path.name)
    cur = path.parent.parent / "cur"
    current = path
    for _ in range(_ATTEMPTS):
        target = cur / f"{uniq}{INFO_SEPARATOR}{flags}"
        if current == target:
            return target
        try:
            os.rename(current, target)
        except FileNotFoundError:
            current = _find_or_fail(current, uniq)
            continue
        except OSError as exc:
            raise capture_error(exc, "cannot rename", current) from exc
        return target
    raise CaptureError("io", f"{path}: renamed by others {_ATTEMPTS} times while flagging it")


def find_message(folder_dir: Path, uniq: str) -> Path | None:
    """The file of the message with unique name ``uniq`` in a folder's new/ or cur/, if any."""
    prefix = uniq + INFO_SEPARATOR
    for sub in ("new", "cur"):
        try:
            with os.scandir(folder_dir / sub) as entries:
                for entry in entries:
                    if entry.name == uniq or entry.name.startswith(prefix):
                        return folder_dir / sub / entry.name
        except FileNotFoundError:
            continue
    return None


def _find_or_fail(missing: Path, uniq: str) -> Path:
    found = find_message(missing.parent.parent, uniq)
    if found is None:
        raise CaptureError("io", f"{missing}: message is gone (expunged or moved by a client)")
    log.debug("%s was renamed to %s meanwhile", missing.name, found.name)
    return found


def _check_regular_file(path: Path) -> None:
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise CaptureError("unsafe", f"{path} is not a regular file: refusing to move it")


def _sync(fd: int, path: Path) -> None:
    try:
        fsync_dir(fd, path)
    except CaptureError as exc:
        log.warning("moved without a durable directory entry: %s", exc)


def _sync_dir_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("cannot fsync %s: %s", path, exc.strerror)
        return
    try:
        _sync(fd, path)
    finally:
        os.close(fd)
