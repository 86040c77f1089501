"""Who a mailbox belongs to, and opening its directories without following symlinks.

Sentlink often runs as root and writes into directories its users control. Like Postfix's
virtual(8) and local(8), which refuse to deliver through symlinks and into mailboxes the
recipient does not own, every directory is opened with O_NOFOLLOW and its owner checked on the
open descriptor (fstat), and all later work is relative to those descriptors, so a directory
swapped for a symlink after the check is never followed.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from sentlink.errors import CaptureError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Owner:
    """The uid and gid that own a mailbox and every file written into it."""

    uid: int
    gid: int


def resolve_owner(spec: str | None) -> Owner:
    """``None`` -> the process user; ``"uid:gid"`` numeric; anything else a user name."""
    if spec is None:
        return Owner(os.geteuid(), os.getegid())
    uid_text, colon, gid_text = spec.partition(":")
    if colon:
        if uid_text.isdigit() and gid_text.isdigit():
            return Owner(int(uid_text), int(gid_text))
        raise CaptureError("unsafe", f"mailbox owner {spec!r}: expected a user name or uid:gid")
    try:
        entry = pwd.getpwnam(spec)
    except KeyError:
        raise CaptureError("unsafe", f"mailbox owner {spec!r}: no such user") from None
    return Owner(entry.pw_uid, entry.pw_gid)


def capture_error(exc: OSError, action: str, path: Path | str) -> CaptureError:
    """Map an OSError to the CaptureError reason the milter logs and counts."""
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM):
        reason = "permission"
    elif code == errno.EDQUOT:
        reason = "quota"
    elif code == errno.ENOSPC:
        reason = "disk_full"
    else:
        reason = "io"
    return CaptureError(reason, f"{action} {path}: {exc.strerror or exc}")


def needs_chown(owner: Owner) -> bool:
    return (owner.uid, owner.gid) != (os.geteuid(), os.getegid())


def check_can_write_as(owner: Owner) -> None:
    """Refuse early when files could not be given to ``owner``: only root may chown them."""
    euid = os.geteuid()
    if euid != 0 and owner.uid != euid:
        raise CaptureError(
            "permission",
            f"running as uid {euid}, cannot write files owned by uid {owner.uid}: "
            "run as root or as the mailbox owner",
        )


def give_fd(fd: int, owner: Owner, path: Path) -> None:
    """fchown a file we just created to the mailbox owner (when that is not us)."""
    if needs_chown(owner):
        try:
            os.fchown(fd, owner.uid, owner.gid)
        except OSError as exc:
            raise capture_error(exc, "cannot chown", path) from exc


def open_dir(name: str, dir_fd: int | None, owner: Owner, path: Path) -> int:
    """Open an existing directory; refuse symlinks, non-directories and other owners' dirs.

    Raises FileNotFoundError when it does not exist (callers decide whether to create it).
    """
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CaptureError(
                "unsafe", f"{path} is a symlink or not a directory: refusing to write there"
            ) from exc
        raise capture_error(exc, "cannot open", path) from exc
    uid = os.fstat(fd).st_uid
    if uid != owner.uid:
        os.close(fd)
        raise CaptureError(
            "unsafe", f"{path} is owned by uid {uid}, not by the mailbox owner uid {owner.uid}"
        )
    return fd


_CREATE_ATTEMPTS = 20


def _ours_mid_creation(name: str, dir_fd: int | None, owner: Owner) -> bool:
    if not needs_chown(owner):
        return False
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    # Still ours (not chowned yet), or chowned since open_dir looked: worth another look.
    return stat.S_ISDIR(st.st_mode) and st.st_uid in (os.geteuid(), owner.uid)


def open_or_create_dir(name: str, dir_fd: int | None, owner: Owner, path: Path) -> int:
    """``open_dir``, creating the directory first (mode 0700, owned by ``owner``) if missing."""
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            return open_dir(name, dir_fd, owner, path)
        except FileNotFoundError:
            pass
        except CaptureError:
            # Another thread or process may have just made it (mkdir, then chown): a directory
            # still owned by us, not yet by the mailbox owner. Give it a moment to be chowned.
            if not _ours_mid_creation(name, dir_fd, owner) or attempt == _CREATE_ATTEMPTS - 1:
                raise
            time.sleep(0.01)
            continue
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            continue  # created meanwhile: open what is there, with the same checks
        except OSError as exc:
            raise capture_error(exc, "cannot create", path) from exc
        if needs_chown(owner):
            try:
                # lchown: if the new directory were swapped for a symlink, chown the link itself.
                os.chown(name, owner.uid, owner.gid, dir_fd=dir_fd, follow_symlinks=False)
            except OSError as exc:
                raise capture_error(exc, "cannot chown", path) from exc
    raise CaptureError("io", f"cannot open {path}: it keeps disappearing")


def fsync_dir(fd: int, path: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise capture_error(exc, "cannot fsync", path) from exc


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()
