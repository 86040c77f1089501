"""Maildir++ quota: the ``maildirsize`` file in the Maildir root (Courier's maildirquota).

The first line defines the quota, ``<bytes>S,<count>C`` (either part may be missing); every
following line is a ``<bytes> <count>`` delta, and their sum is the mailbox usage. The file sits
in the root even when delivering into a folder: the quota covers the whole mailbox. Dovecot and
Courier write and recalculate it; a delivery agent only checks it and appends its own delta.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sentlink.errors import CaptureError
from sentlink.maildir.safety import capture_error

log = logging.getLogger(__name__)

QUOTA_FILE = "maildirsize"
_MAX_READ = 1 << 20  # Courier recalculates past 5120 bytes; anything near this is not a quota file


@dataclass(frozen=True)
class Quota:
    """Limits (0 = none, as Dovecot writes them) and current usage of one mailbox."""

    max_bytes: int
    max_count: int
    bytes_used: int
    count_used: int

    def refuses(self, size: int) -> bool:
        if self.max_bytes and self.bytes_used + size > self.max_bytes:
            return True
        return bool(self.max_count and self.count_used + 1 > self.max_count)


def parse_maildirsize(text: str) -> Quota:
    """Parse the file's text; ValueError when it is not in the maildirsize format."""
    lines = text.splitlines()
    if not lines:
        raise ValueError("empty file")
    max_bytes = max_count = 0
    for part in lines[0].split(","):
        part = part.strip()
        if part.endswith("S") and part[:-1].isdigit():
            max_bytes = int(part[:-1])
        elif part.endswith("C") and part[:-1].isdigit():
            max_count = int(part[:-1])
        elif part:
            raise ValueError(f"bad quota definition {lines[0]!r}")
    bytes_used = count_used = 0
    for line in lines[1:]:
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"bad usage line {line!r}")
        bytes_used += int(fields[0])  # deltas may be negative (expunges)
        count_used += int(fields[1])
    return Quota(max_bytes, max_count, bytes_used, count_used)


def read_quota(root_fd: int, root: Path) -> Quota | None:
    """The mailbox quota, or None when there is none (no file) or it cannot be parsed."""
    # Most mailboxes have no quota file: one faccessat() answers that without an exception.
    if not os.access(QUOTA_FILE, os.F_OK, dir_fd=root_fd, follow_symlinks=False):
        return None
    path = root / QUOTA_FILE
    try:
        fd = os.open(QUOTA_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise capture_error(exc, "cannot read", path) from exc
    try:
        data = os.read(fd, _MAX_READ)
    except OSError as exc:
        raise capture_error(exc, "cannot read", path) from exc
    finally:
        os.close(fd)
    try:
        return parse_maildirsize(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        log.warning("%s: not a Maildir++ quota file, ignoring the quota: %s", path, exc)
        return None


def check_quota(root_fd: int, root: Path, size: int) -> bool:
    """Raise CaptureError("quota") if a message of ``size`` bytes would exceed the quota.

    Returns whether a quota file exists (then the delivery must be added to it).
    """
    quota = read_quota(root_fd, root)
    if quota is not None and quota.refuses(size):
        raise CaptureError(
            "quota",
            f"{root}: over Maildir++ quota ({quota.bytes_used} + {size} bytes of "
            f"{quota.max_bytes or 'unlimited'}, {quota.count_used} messages of "
            f"{quota.max_count or 'unlimited'})",
        )
    return quota is not None


def add_to_quota(root_fd: int, root: Path, size: int) -> None:
    """Append this delivery's delta in one O_APPEND write, so concurrent writers never mix."""
    path = root / QUOTA_FILE
    try:
        fd = os.open(
            QUOTA_FILE, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd
        )
    except FileNotFoundError:
        return  # recalculation replaces the file by rename; a missing one is rebuilt from disk
    except OSError as exc:
        log.warning("%s: cannot add a delivery to the quota file: %s", path, exc.strerror)
        return
    try:
        os.write(fd, f"{size} 1\n".encode("ascii"))
    except OSError as exc:
        # The message is filed; Dovecot/Courier recalculate a quota file that is off.
        log.warning("%s: cannot add a delivery to the quota file: %s", path, exc.strerror)
    finally:
        os.close(fd)
