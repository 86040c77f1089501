"""The reconcile's helper processes: the read-ahead process warms files ahead of their reader and
never holds up the main process; both helpers start while the folders are still being listed when
the listing shows a large job (watch/readahead.py, watch/scan.py ``Workers``)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from sentlink.store import open_store
from sentlink.watch.oneshot import Reconcile
from sentlink.watch.readahead import ReadAhead, warm
from test_watch_inbox import SECRET, drop, mail, make_config


def uncached_files(directory: Path, count: int) -> list[Path]:
    """Files written to disk and then dropped from the page cache."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        path = directory / f"m{n}"
        with path.open("wb") as fh:
            fh.write(os.urandom(8192))
            fh.flush()
            os.fsync(fh.fileno())
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        paths.append(path)
    return paths


def cached(path: Path) -> bool:
    """Whether the file's first page is in the page cache (a read that must not wait for I/O)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def wait_until(check: object, seconds: float = 10.0) -> bool:
    assert callable(check)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


def child_pids() -> set[int]:
    pids: set[int] = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            pids.update(
                map(int, Path(f"/proc/{os.getpid()}/task/{task}/children").read_text().split())
            )
        except OSError:
            continue
    return pids


def test_hinted_files_are_read_into_the_page_cache(tmp_path: Path) -> None:
    paths = uncached_files(tmp_path / "box", 40)
    assert not any(cached(p) for p in paths)  # the test's premise: nothing is cached yet
    with ReadAhead() as ahead:
        ahead.hint(paths)
        assert wait_until(lambda: all(cached(p) for p in paths))


def test_files_not_cached_after_a_warm_stretch_are_read_too(tmp_path: Path) -> None:
    """Warm jobs are probed and skipped; the first cold one after them is still read, and so
    is everything after it (a mailbox read recently, then its older, uncached part)."""
    warm_files = uncached_files(tmp_path / "warm", 64)  # two jobs' worth
    for path in warm_files:
        path.read_bytes()
    cold = uncached_files(tmp_path / "cold", 40)
    assert not any(cached(p) for p in cold)
    with ReadAhead() as ahead:
        ahead.hint(warm_files)
        ahead.hint(cold)
        assert wait_until(lambda: all(cached(p) for p in cold))


def test_missing_files_and_fifos_do_not_stop_the_read_ahead(tmp_path: Path) -> None:
    odd = tmp_path / "odd"
    odd.mkdir()
    fifo = odd / "fifo"
    os.mkfifo(fifo)  # opening one for reading would wait for a writer forever
    paths = uncached_files(tmp_path / "box", 5)
    with ReadAhead() as ahead:
        ahead.hint([odd / "gone", fifo, odd, *paths])
        assert wait_until(lambda: all(cached(p) for p in paths))


def test_a_hint_never_blocks_when_the_process_is_gone(tmp_path: Path) -> None:
    paths = [tmp_path / f"{'x' * 200}{n}" for n in range(5000)]
    with ReadAhead() as ahead:
        assert ahead.start()
        assert ahead.pid is not None
        os.kill(ahead.pid, signal.SIGKILL)
        started = time.monotonic()
        for _ in range(50):  # 50 MB of hints: far beyond what the pipe holds
            ahead.hint(paths)
        assert time.monotonic() - started < 5
        assert ahead.failed
    assert not readahead_running()


def test_closing_stops_the_process() -> None:
    ahead = ReadAhead()
    assert ahead.start()
    pid = ahead.pid
    assert pid is not None and readahead_running()
    ahead.close()
    assert ahead.pid is None and not readahead_running()
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped


def readahead_running() -> bool:
    for pid in child_pids():
        try:
            if b"readahead.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue  # exited meanwhile
    return False


def helpers_running() -> bool:
    """The worker process (multiprocessing's) and the read-ahead process are both running."""
    return bool(multiprocessing.active_children()) and readahead_running()


def no_helpers() -> bool:
    return not multiprocessing.active_children() and not readahead_running()


def test_listing_a_folder_never_indexed_starts_the_helpers(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    for n in range(3):
        drop(tmp_path / "alice", "INBOX", mail(f"m{n}@x"))
    store = open_store(config.store.url)
    try:
        with Reconcile(config, config.accounts, store, SECRET) as r:
            pending = r.pending(record_moves=False)  # --dry-run: nothing will run
            assert no_helpers()
            pending = r.pending()
            # Before run(): their start-up overlaps the listing. (Waiting a moment: a process
            # just started may show an empty command line while it is still in execve.)
            assert wait_until(helpers_running, 5.0)
            summary = r.run(pending)
        assert summary.as_dict()["seen"] == 3
        assert wait_until(no_helpers)
        with Reconcile(config, config.accounts, store, SECRET) as r:
            drop(tmp_path / "alice", "INBOX", mail("late@x"))
            assert [len(p) for p in r.pending().values()] == [1, 0]
            assert no_helpers()  # an indexed folder with one new file: no helpers
            r.run(r.pending())
    finally:
        store.close()


def test_a_job_whose_first_files_are_cached_is_taken_as_warm(tmp_path: Path) -> None:
    paths = uncached_files(tmp_path / "box", 6)
    for path in paths[:2]:
        path.read_bytes()  # cached now
    warm([os.fsencode(p) for p in paths])
    assert not any(cached(p) for p in paths[2:])  # skipped: the probes found a warm cache
    warm([os.fsencode(p) for p in reversed(paths)])
    assert wait_until(lambda: all(cached(p) for p in paths))  # the first was cold: all warmed


def test_without_an_interpreter_to_run_files_are_read_without_read_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    ahead = ReadAhead()
    ahead.hint(uncached_files(tmp_path / "box", 2))  # no error: a hint only saves time
    assert ahead.failed and ahead.pid is None
    ahead.close()
