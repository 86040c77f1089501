"""A milter that receives what sentlink's capture receives and does nothing with it: the ceiling
for any pymilter-based capture.

It negotiates exactly what ``sentlink.milter.session.SentlinkMilter`` negotiates: the same
callbacks (connect, envfrom, envrcpt, header, eoh, body without a reply; eom with one; hello,
data, unknown skipped), the same protocol options and the same actions. The decorators below
mirror sentlink's; :func:`check_same_negotiation` compares the resulting protocol mask with
sentlink's at start-up, so the two cannot drift apart unnoticed.

With ``--write MAILDIR`` it also keeps each message the minimal durable way, the I/O any
Maildir copy cannot avoid: create ``tmp/<uniq>`` with O_EXCL when MAIL FROM arrives, write every
header and body chunk as it arrives (CRLF -> LF: a Maildir holds LF line ends), and at end of
message fsync, link into ``cur/``, unlink the tmp name and fsync ``cur/``. None of sentlink's
logic (accounts, outbound policy, Message-ID, folder checks, ownership, quota).

Usage: ``python bench/receive_milter.py [--write MAILDIR] unix:/path/to/socket`` (or
``inet:PORT@HOST``); stops on SIGTERM/SIGINT (libmilter's own handling).
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

import Milter

from sentlink.milter.session import ACTIONS, SentlinkMilter

CONTINUE: int = Milter.CONTINUE
_F = TypeVar("_F", bound=Callable[..., int])
# pymilter's decorators keep the method's signature; Milter has no type information.
noreply = cast(Callable[[_F], _F], Milter.noreply)
nocallback = cast(Callable[[_F], _F], Milter.nocallback)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Maildir:
    """One Maildir's ``tmp/`` and ``cur/``, opened once and shared by every connection."""

    def __init__(self, path: Path) -> None:
        for sub in ("tmp", "new", "cur"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tmp_fd = os.open(path / "tmp", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.cur_fd = os.open(path / "cur", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # next() on itertools.count is atomic under the GIL: unique across connection threads.
        self._serial = itertools.count()
        self._suffix = f"P{os.getpid()}.{socket.gethostname()}"

    def new_uniq(self) -> str:
        return f"{int(time.time())}.Q{next(self._serial)}{self._suffix}"


class MessageFile:
    """One message being written into ``tmp/``, then linked into ``cur/``."""

    def __init__(self, maildir: Maildir) -> None:
        self._maildir = maildir
        self._uniq = maildir.new_uniq()
        self._fd: int | None = os.open(self._uniq, _NEW_FILE, 0o600, dir_fd=maildir.tmp_fd)

    def write(self, data: bytes) -> None:
        if self._fd is None:
            raise RuntimeError("write after finish or discard")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def finish(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            raise RuntimeError("finish after finish or discard")
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        maildir = self._maildir
        os.link(
            self._uniq,
            f"{self._uniq}:2,S",
            src_dir_fd=maildir.tmp_fd,
            dst_dir_fd=maildir.cur_fd,
            follow_symlinks=False,
        )
        os.unlink(self._uniq, dir_fd=maildir.tmp_fd)
        os.fsync(maildir.cur_fd)

    def discard(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
            os.unlink(self._uniq, dir_fd=self._maildir.tmp_fd)


class ReceiveMilter(Milter.Base):  # type: ignore[misc]
    """One object per connection; takes every callback sentlink's capture takes, answers only
    at end of message, always CONTINUE. With a Maildir, writes each message into it."""

    def __init__(self, maildir: Maildir | None = None) -> None:
        self._maildir = maildir
        self._file: MessageFile | None = None

    def negotiate(self, opts: list[int]) -> int:
        # As SentlinkMilter.negotiate: pymilter's negotiation from the decorators, and only
        # sentlink's actions.
        rc = int(super().negotiate(opts))
        if rc == CONTINUE:
            opts[0] &= ACTIONS
            self._actions = opts[0]
        return rc

    @noreply
    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        return CONTINUE

    @nocallback
    def hello(self, hostname: str) -> int:
        return CONTINUE

    @nocallback
    def data(self) -> int:
        return CONTINUE

    @nocallback
    def unknown(self, cmd: str) -> int:
        return CONTINUE

    @noreply
    def envfrom(self, mail_from: str, *params: str) -> int:
        self._discard()
        if self._maildir is not None:
            self._file = MessageFile(self._maildir)
        return CONTINUE

    @noreply
    def envrcpt(self, rcpt: str, *params: str) -> int:
        return CONTINUE

    @noreply
    def header(self, name: str, value: str) -> int:
        if self._file is not None:
            line = f"{name}: {value}\n".replace("\r\n", "\n")
            self._file.write(line.encode("utf-8", "surrogateescape"))
        return CONTINUE

    @noreply
    def eoh(self) -> int:
        if self._file is not None:
            self._file.write(b"\n")
        return CONTINUE

    @noreply
    def body(self, chunk: bytes) -> int:
        # A CRLF split across two chunks keeps its CR: good enough for a benchmark copy.
        if self._file is not None:
            self._file.write(chunk.replace(b"\r\n", b"\n"))
        return CONTINUE

    def eom(self) -> int:
        file, self._file = self._file, None
        if file is not None:
            file.finish()
        return CONTINUE

    def abort(self) -> int:
        self._discard()
        return CONTINUE

    def close(self) -> int:
        self._discard()
        return CONTINUE

    def _discard(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.discard()


def check_same_negotiation() -> None:
    """Fail unless this milter asks the MTA for exactly the steps sentlink's capture asks for."""
    ours, theirs = ReceiveMilter.protocol_mask(), SentlinkMilter.protocol_mask()
    if ours != theirs:
        raise SystemExit(
            f"receive_milter: protocol mask {ours:#x} differs from SentlinkMilter's {theirs:#x}"
        )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, metavar="MAILDIR", help="write each message here")
    parser.add_argument("socket", help="unix:/path or inet:PORT@HOST")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_same_negotiation()
    maildir = None if args.write is None else Maildir(args.write)
    # libmilter creates the unix socket with 0777 & ~umask: Postfix's unprivileged smtpd must
    # be able to connect. Files in the Maildir are created 0600 explicitly.
    os.umask(0)
    Milter.factory = lambda: ReceiveMilter(maildir)
    Milter.set_flags(ACTIONS)
    Milter.runmilter("bench-receive", args.socket, timeout=600)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
