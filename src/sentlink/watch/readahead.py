"""Cold-cache read-ahead for a reconcile, in a small process of its own.

A file read for the first time since boot costs disk reads (its inode, then its first block)
that would stall whoever reads it first, and the kernel's CPU work for them: about 25 us per
file here. Warming the files a few chunks ahead of the worker that parses them overlaps the
waiting; doing it in its own process also takes that CPU off the reconcile's main process, which
writes the store and is the busier one. The kernel spreads the three processes over the cores.

Against four read-ahead threads inside the main process (100,000 messages, cold cache), the main
process's CPU fell from 109 to about 80 us per message: the threads' system calls, and the GIL
hand-overs between them and the main thread, were all billed there.

The parent writes NUL-separated paths to the child's standard input, without ever blocking
(``ReadAhead.hint``); the child opens each and asks for its first bytes with
``POSIX_FADV_WILLNEED``, which starts the read without waiting for it or copying the data. The
child exits at end of input, so also when the parent dies. This file is also the child's
program: it runs it with ``python -I -S``, so it imports nothing beyond the standard library.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("sentlink.watch")

# Bytes of each file asked for: what the header reader's first read takes (headers.py).
READ_AHEAD_BYTES = 16384
# Threads in the child: an open() of a cold file waits for its inode, so several overlap that.
_THREADS = 4
_JOB = 32
# Files of a job checked for being cached already (see warm).
_PROBES = 2
# Hints queued in the parent while the pipe is full; beyond this, hints are dropped (a hint
# only saves time: the reader reads the file anyway).
_MAX_PENDING = 1 << 20
_PIPE_SIZE = 1 << 20


class ReadAhead:
    """The read-ahead process, started by :meth:`start`; a context manager stopping it."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._fd = -1
        self._pending = b""
        self.failed = False

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The process's id while it runs."""
        return None if self._proc is None else self._proc.pid

    def start(self) -> bool:
        """Start the process unless it runs already; False when it cannot run."""
        if self._proc is not None or self.failed:
            return not self.failed
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(Path(__file__).resolve())],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                close_fds=True,
            )
        except Exception as exc:  # no interpreter to run (embedded, removed): read without it
            log.info("no read-ahead process: %s", exc)
            self.failed = True
            return False
        assert proc.stdin is not None
        self._proc, self._fd = proc, proc.stdin.fileno()
        os.set_blocking(self._fd, False)
        with contextlib.suppress(OSError, AttributeError):
            import fcntl

            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        return True

    def hint(self, paths: Sequence[str | Path]) -> None:
        """Ask for ``paths`` to be read into the page cache soon; never blocks."""
        if self.failed or (self._proc is None and not self.start()):
            return
        if len(self._pending) < _MAX_PENDING:
            # One encoding per chunk: os.fsencode per path was 4% of the main process's CPU.
            text = "\0".join(map(str, paths)) + "\0"
            self._pending += text.encode(sys.getfilesystemencoding(), "surrogateescape")
        self._flush()

    def _flush(self) -> None:
        while self._pending and self._fd >= 0:
            try:
                written = os.write(self._fd, self._pending)
            except BlockingIOError:
                return  # the child is behind: the rest goes with the next hint
            except OSError as exc:  # the child is gone (EPIPE): read without it
                log.info("read-ahead process stopped: %s", exc)
                self.failed = True
                self._pending = b""
                return
            self._pending = self._pending[written:]

    def close(self) -> None:
        """Stop the process: its hints are of no use once the reconcile is over."""
        proc, self._proc, self._fd = self._proc, None, -1
        self._pending = b""
        if proc is None:
            return
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def warm(paths: Sequence[bytes]) -> None:
    """Have the start of each file read into the page cache. Opening it reads its inode (the
    thread waits for that); POSIX_FADV_WILLNEED then starts reading the data without waiting
    for it. A file renamed or gone meanwhile is skipped: its reader sees that itself.

    When the first files of ``paths`` are in the cache already, the rest are assumed to be too
    (a warm start, or a mailbox read recently): opening them all would cost about 7 us of CPU
    per file for nothing."""
    probes = paths[:_PROBES]
    if probes and all(_cached(p) for p in probes):
        return
    for path in paths:
        fd = _open(path)
        if fd is None:
            continue
        try:
            os.posix_fadvise(fd, 0, READ_AHEAD_BYTES, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _open(path: bytes) -> int | None:
    # O_NONBLOCK: a FIFO among the files would otherwise wait for a writer forever.
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None


def _cached(path: bytes) -> bool:
    """Whether the file's first byte can be read without waiting for the disk (RWF_NOWAIT:
    EAGAIN otherwise). False where that cannot be told, and for a file that cannot be read."""
    fd = _open(path)
    if fd is None:
        return False
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except OSError:  # BlockingIOError: not cached; EOPNOTSUPP: cannot tell
        return False
    finally:
        os.close(fd)
    return True


def main() -> int:
    """The child: warm the NUL-separated paths arriving on standard input, until its end.

    While every job's first files are found cached, the jobs are probed right here, and a warm
    one costs those probes alone: handing each to a thread cost more than the probes (about
    1 us per file of a warm reconcile, on the CPUs the reconcile's two processes need). From
    the first job found cold on, the threads probe: opening a file not cached waits for the
    disk."""
    tail = b""
    probing_here = True
    with ThreadPoolExecutor(_THREADS) as pool:
        while True:
            try:
                data = os.read(0, 1 << 16)
            except InterruptedError:
                continue
            if not data:
                return 0
            *paths, tail = (tail + data).split(b"\0")
            for start in range(0, len(paths), _JOB):
                job = paths[start : start + _JOB]
                if probing_here:
                    if all(_cached(p) for p in job[:_PROBES]):
                        continue
                    probing_here = False
                pool.submit(warm, job)


if __name__ == "__main__":
    sys.exit(main())
