"""The site secret that keys the trace header HMAC (see sentlink.trace)."""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

from sentlink.errors import SentlinkError

MIN_SECRET_BYTES = 16
_NEW_SECRET_BYTES = 32


def load_or_create_secret(path: Path) -> bytes:
    """The secret stored at ``path``, created (32 random bytes, hex, mode 0600) when missing.

    The key is the file's content without surrounding whitespace, so an admin may also put a
    secret of their own there. A secret others can read would let them forge trace headers,
    so such a file is refused rather than used.
    """
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    _create(path)
    return _read(path)


def _read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SentlinkError(f"{path}: site secret is not a regular file")
        if st.st_mode & 0o077:
            raise SentlinkError(
                f"{path}: site secret is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            key = f.read(65536).strip()
    finally:
        os.close(fd)
    if len(key) < MIN_SECRET_BYTES:
        raise SentlinkError(f"{path}: site secret shorter than {MIN_SECRET_BYTES} bytes")
    return key


def _create(path: Path) -> None:
    """Write a new secret so that no reader ever sees a partial file.

    The content goes to an O_EXCL temporary file first and is then hard-linked to ``path``;
    link(2) fails with EEXIST when another process created the secret meanwhile, and then
    that one wins and is read by the caller.
    """
    # The file is 0600; its directory (./var by default) may also hold the milter socket, which
    # Postfix's unprivileged smtpd must reach, so it is not made 0700.
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    content = secrets.token_hex(_NEW_SECRET_BYTES).encode("ascii") + b"\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
