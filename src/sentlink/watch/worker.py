"""The reconcile's worker process, which prepares chunks of message files (watch/prepare.py)
while the main process moves files and writes the store (watch/scan.py).

Two pipes and no thread: the main process writes jobs to one and, when it needs a chunk's
results, reads them from the other itself; it keeps a few jobs ahead, so it seldom waits. The
worker answers jobs in the order they came. The results pipe is enlarged to hold the answers
to the jobs ahead, so the worker never waits for the main process to read.

(multiprocessing's ProcessPoolExecutor, used before, passes jobs and results through two threads
of the main process, each needing the interpreter lock while the main thread works: the worker
then stalled on a full pipe until the reading thread got its turn, and both threads' work was
billed to the busier main process.)

The worker exits when the jobs pipe ends: when the main process closes it, or dies.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import signal
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from sentlink.config.models import AccountConfig
from sentlink.watch.prepare import Packed, Preparer, prepare_chunk

log = logging.getLogger("sentlink.watch")

# Bytes the results pipe holds: the answers to several chunks of 256 files (about 90 KB each)
# rather than the 64 KB of a default pipe. Linux allows an unprivileged process up to 1 MB
# (/proc/sys/fs/pipe-max-size); where it cannot be set, the worker may wait for the reader.
RESULTS_PIPE_BYTES = 1 << 20

Job = tuple[int, Preparer | None, AccountConfig, str, list[str]]  # number, preparer, where, paths
Answer = tuple[int, list[Packed | None] | None, str]  # job number, results or None, error


class WorkerGone(Exception):
    """The worker process failed a job, or is gone."""


class PrepareWorker:
    """The worker process, seen from the main process: jobs in, results out in the same order.
    ``preparer`` is given to the process once, when it starts; a job naming none uses it."""

    def __init__(self, preparer: Preparer | None, gc_gen0: int = 0) -> None:
        # spawn, not fork: the watcher has threads (watchdog, metrics) a fork would copy in
        # whatever state they are in.
        context = multiprocessing.get_context("spawn")
        job_reader, self._jobs = context.Pipe(duplex=False)
        self._results, result_writer = context.Pipe(duplex=False)
        with contextlib.suppress(OSError, AttributeError):
            import fcntl

            fcntl.fcntl(result_writer.fileno(), fcntl.F_SETPIPE_SZ, RESULTS_PIPE_BYTES)
        self._process: BaseProcess = context.Process(
            target=serve,
            args=(job_reader, result_writer, preparer, gc_gen0),
            name="sentlink-prepare",
            daemon=True,
        )
        try:
            self._process.start()
        except BaseException:
            self._jobs.close()
            self._results.close()
            raise
        finally:
            job_reader.close()  # the worker's ends: this process keeps none of them open
            result_writer.close()
        self._sent = 0
        self._answered = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def submit(
        self, preparer: Preparer | None, account: AccountConfig, folder: str, paths: Sequence[str]
    ) -> int:
        """Send the job preparing ``paths``; its number, for :meth:`result`. Raises
        WorkerGone."""
        number = self._sent
        job: Job = (number, preparer, account, folder, list(paths))
        try:
            self._jobs.send(job)
        except (OSError, ValueError) as exc:  # closed, or the worker is gone (EPIPE)
            raise WorkerGone(f"cannot send a job: {exc}") from None
        self._sent += 1
        return number

    def result(self, number: int) -> list[Packed | None]:
        """The results of job ``number``, the oldest not yet taken (jobs are answered in the
        order they were sent); waits for them. Raises WorkerGone."""
        if number != self._answered:
            raise WorkerGone(f"job {number} asked for before job {self._answered}")
        try:
            answer: Answer = self._results.recv()
        except (EOFError, OSError, ValueError) as exc:
            gone = str(exc) or "end of its results"
            raise WorkerGone(f"the worker process is gone ({gone})") from None
        answered, results, error = answer
        self._answered += 1
        if answered != number or results is None:
            raise WorkerGone(error or f"job {answered} answered in place of job {number}")
        return results

    def close(self) -> None:
        """End the jobs (the process exits when it sees that, or when it finds no one reading
        its results), without waiting for it: the caller has what it needs, and whoever waits
        for the scan should not wait for that too. A thread reaps the process once it is gone."""
        self._jobs.close()
        self._results.close()
        threading.Thread(target=self._process.join, name="sentlink-reap", daemon=True).start()


def serve(jobs: Connection, results: Connection, preparer: Preparer | None, gc_gen0: int) -> None:
    """The worker process's program: answer jobs until the jobs pipe ends.

    With ``gc_gen0``, the garbage collector runs as seldom as in the main process's scan.
    SIGINT is ignored: a Ctrl-C at the terminal reaches the whole process group, and the main
    process, which handles it, then closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if gc_gen0:
        gc.set_threshold(gc_gen0, *gc.get_threshold()[1:])
    while True:
        try:
            job: Job = jobs.recv()
        except (EOFError, OSError):
            return  # closed by the main process, or it is gone
        number, sent, account, folder, paths = job
        answer: Answer
        chosen = sent or preparer
        if chosen is None:
            answer = (number, None, "the worker process was started without a preparer")
        else:
            try:
                answer = (number, prepare_chunk(chosen, account, folder, paths), "")
            except Exception as exc:
                answer = (number, None, f"{type(exc).__name__}: {exc}")
        try:
            results.send(answer)
        except OSError:  # the main process stopped reading (EPIPE), or is gone
            return
