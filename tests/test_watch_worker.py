"""The reconcile's worker process (watch/worker.py): jobs answered in order with what preparing
in-process gives, and nothing lost when it fails or dies; it ends with the main process."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sentlink.linker import LinkFilter
from sentlink.watch.policy import WatchPolicy
from sentlink.watch.prepare import Preparer, prepare_chunk
from sentlink.watch.worker import PrepareWorker, WorkerGone
from test_watch_inbox import ALICE, SECRET, drop, mail, make_config
from test_watch_parallel import PARALLEL, SERIAL, run, state, twins


def gone(pid: int, seconds: float = 10.0) -> bool:
    """Whether process ``pid`` has exited (a zombie counts: it runs no more) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if status in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def test_jobs_are_answered_in_order_with_what_preparing_here_gives(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    preparer = Preparer(WatchPolicy.from_config(config, SECRET), LinkFilter(config))
    alice = config.accounts[0]
    box = tmp_path / "alice"
    paths = [str(drop(box, "INBOX", mail(f"m{n}@x", frm=f"u{n}@customer.test"))) for n in range(6)]
    paths.append(str(box / "cur" / "vanished:2,S"))  # fails on its own: None
    paths.append(str(drop(box, "INBOX", mail("self@x", frm=ALICE, to="bob@customer.test"))))
    worker = PrepareWorker(preparer)
    try:
        numbers = [worker.submit(None, alice, "INBOX", paths[i : i + 3]) for i in (0, 3, 6)]
        numbers.append(worker.submit(preparer, alice, "INBOX", paths[:2]))  # its own preparer
        with pytest.raises(WorkerGone, match="before job 0"):
            worker.result(numbers[1])  # answers come in order only
        got = [worker.result(n) for n in numbers]
    finally:
        worker.close()
    expected = [prepare_chunk(preparer, alice, "INBOX", paths[i : i + 3]) for i in (0, 3, 6)]
    assert got == [*expected, expected[0][:2]]
    vanished, self_sent = got[2]
    assert vanished is None  # fails on its own: the main process reports it
    assert self_sent is not None and self_sent[2] is not None and self_sent[2].move == "Sent"


def test_a_worker_started_without_a_preparer_fails_its_jobs_not_the_caller(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    worker = PrepareWorker(None)
    try:
        number = worker.submit(None, config.accounts[0], "INBOX", ["x"])
        with pytest.raises(WorkerGone, match="without a preparer"):
            worker.result(number)
    finally:
        worker.close()


def test_closing_ends_the_process_and_it_is_reaped(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    worker = PrepareWorker(Preparer(WatchPolicy.from_config(config, SECRET), LinkFilter(config)))
    pid = worker.pid
    assert pid is not None and not gone(pid, 0.2)
    worker.close()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not Path(f"/proc/{pid}").exists()  # exited, and waited for (no zombie left)
    with pytest.raises(WorkerGone):
        worker.submit(None, config.accounts[0], "INBOX", ["x"])


STARTER = """
import os, sys
from sentlink.watch.worker import PrepareWorker

if __name__ == "__main__":
    worker = PrepareWorker(None)
    print(worker.pid, flush=True)
    sys.stdin.readline()
    os._exit(0)  # no clean-up: as if killed
"""


def test_the_worker_exits_when_the_main_process_is_gone(tmp_path: Path) -> None:
    script = tmp_path / "starter.py"
    script.write_text(STARTER)
    main = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert main.stdout is not None and main.stdin is not None
    pid = int(main.stdout.readline())
    try:
        assert not gone(pid, 0.5)
        main.stdin.write("\n")
        main.stdin.flush()
        assert main.wait(10) == 0
        assert gone(pid)  # the end of the jobs pipe ended it
    finally:
        if not gone(pid, 0):
            os.kill(pid, signal.SIGKILL)


def test_a_worker_killed_mid_reconcile_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The main process prepares the files of the jobs the worker did not answer: the
    reconcile ends where one at a time does, with a warning."""
    serial, parallel = twins(tmp_path, "")
    expected = run(serial, SERIAL)
    result = PrepareWorker.result
    answered = [0]

    def kill_after_first(self: PrepareWorker, number: int) -> object:
        if answered[0] == 1:
            assert self.pid is not None
            os.kill(self.pid, signal.SIGKILL)
            assert gone(self.pid)
        answered[0] += 1
        return result(self, number)

    monkeypatch.setattr(PrepareWorker, "result", kill_after_first)
    monkeypatch.setattr("sentlink.watch.scan._CHUNK", 16)
    with caplog.at_level(logging.WARNING, logger="sentlink.watch"):
        got = run(parallel, PARALLEL)
    assert answered[0] >= 2
    assert any("worker process failed" in r.getMessage() for r in caplog.records)
    assert got == expected
    assert state(tmp_path / "two") == state(tmp_path / "one")


def test_a_worker_that_cannot_start_leaves_the_reconcile_to_the_main_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    serial, parallel = twins(tmp_path, "")
    expected = run(serial, SERIAL)

    def cannot_start(self: PrepareWorker, *args: object) -> None:
        raise OSError("no more processes")

    monkeypatch.setattr(PrepareWorker, "__init__", cannot_start)
    with caplog.at_level(logging.WARNING, logger="sentlink.watch"):
        assert run(parallel, PARALLEL) == expected
    assert any("no more processes" in r.getMessage() for r in caplog.records)
    assert state(tmp_path / "two") == state(tmp_path / "one")
