"""The watcher trusts the disk: downtime and lost inotify events are made up by one rescan."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sentlink.config.models import Config
from sentlink.linker import Linker
from sentlink.store import Store
from sentlink.watch import FolderWatcher, WatchPolicy, watched_folders
from test_watch_inbox import ALICE, SECRET, drop, files, mail, make_config

MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:.1f}s")
        time.sleep(0.05)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    (tmp_path / "site.secret").write_bytes(SECRET)
    (tmp_path / "site.secret").chmod(0o600)
    return make_config(tmp_path)


@pytest.fixture
def store(config: Config) -> Iterator[Store]:
    from sentlink.model import Record
    from sentlink.store import open_store

    s = open_store(config.store.url)
    s.upsert_record(Record("contact", "c-bob", "Bob", ("bob@customer.test",)))
    yield s
    s.close()


def indexed(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM message_files").fetchone()[0])


def test_a_thousand_messages_delivered_while_stopped_are_handled_by_one_rescan(
    config: Config, store: Store, tmp_path: Path
) -> None:
    def watcher() -> FolderWatcher:
        return FolderWatcher(
            watched_folders(config),
            store,
            Linker(store, config),
            3600,
            WatchPolicy.from_config(config, SECRET),
        )

    first = watcher()
    first.start()
    wait_for(lambda: first.rescans == 1)
    first.stop()
    box = tmp_path / "alice"
    for n in range(1000):
        if n % 4 == 0:  # self-sent, fetched back: goes to Sent
            drop(box, "INBOX", mail(f"s{n}@x", frm=ALICE, to="bob@customer.test"))
        else:
            drop(box, "INBOX", mail(f"r{n}@x"))
    second = watcher()
    second.start()
    try:
        wait_for(lambda: second.rescans == 1)
    finally:
        second.stop()
    summary = second.last_summary
    assert summary is not None
    assert (summary.seen, summary.moved, summary.failed) == (1000, 250, 0)
    assert second.rescans == 1
    assert (len(files(box, "INBOX")), len(files(box, "Sent"))) == (750, 250)
    assert indexed(tmp_path / "s.db") == 1000


def require_root() -> None:
    if os.geteuid() == 0 and os.access(MAX_QUEUED, os.W_OK):
        return
    reason = "lowering fs.inotify.max_queued_events needs root"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true forbids skipping: {reason}", pytrace=False)
    pytest.skip(reason)


def test_lost_inotify_events_are_handled_by_an_immediate_rescan_and_the_gap_logged(
    tmp_path: Path,
) -> None:
    require_root()
    (tmp_path / "site.secret").write_bytes(SECRET)
    (tmp_path / "site.secret").chmod(0o600)
    config = tmp_path / "sentlink.yaml"
    config.write_text(
        f"""store: {{url: "sqlite:///{tmp_path}/s.db"}}
site_secret_file: {tmp_path}/site.secret
accounts: [{{name: alice, addresses: [{ALICE}], maildir: {tmp_path}/alice}}]
watch: {{rescan_seconds: 3600}}
"""
    )
    log_path = tmp_path / "watch.log"
    original = MAX_QUEUED.read_text()
    # The limit is read when an inotify instance is created: lower it only until the watcher
    # has its own, so other processes on this host keep the normal queue.
    MAX_QUEUED.write_text("64\n")
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sentlink", "-c", str(config), "watch"],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        try:
            wait_for(lambda: "rescan: seen=0" in log_path.read_text(), 30)
        finally:
            MAX_QUEUED.write_text(original)
        box = tmp_path / "alice"
        # The watcher is paused while the files land, so its 64-event queue overflows for sure
        # (a fast reader on an idle machine could otherwise keep up).
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            for n in range(2000):
                drop(box, "Sent", mail(f"b{n}@x", frm=ALICE, to="bob@customer.test"), flags="S")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        wait_for(lambda: indexed(tmp_path / "s.db") == 2000, 60)
        # The rescan logs its summary after its last commit, not before.
        wait_for(lambda: "rescan after inotify overflow" in log_path.read_text(), 30)
        text = log_path.read_text()
        assert "inotify queue overflowed: events were lost; rescanning now" in text
        gap = re.search(r"rescan after inotify overflow: (\d+) files had been missed", text)
        assert gap is not None and int(gap.group(1)) > 0, text[-2000:]
    finally:
        proc.terminate()
        proc.wait(20)
    assert proc.returncode == 0, log_path.read_text()[-2000:]
