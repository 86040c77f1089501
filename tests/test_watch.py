"""The Sent-folder watcher: startup reconcile, events as hints, flag renames, periodic rescan."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sentlink.config import load_config_text
from sentlink.config.models import Config
from sentlink.linker import Linker
from sentlink.model import Record
from sentlink.store import Store, open_store
from sentlink.watch import FolderWatcher, sent_folders


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:.1f}s")
        time.sleep(0.02)


def message(n: int, to: str = "bob@customer.test") -> bytes:
    return (
        f"From: alice@example.test\nTo: {to}\nSubject: n{n}\n"
        f"Message-ID: <m{n}@example.test>\n\nbody {n}\n"
    ).encode()


def deliver(folder: Path, name: str, data: bytes, sub: str = "new") -> Path:
    """Write into tmp/ and rename into new/ or cur/, as Maildir writers do."""
    tmp = folder / "tmp" / name
    tmp.write_bytes(data)
    dest = folder / sub / name
    os.rename(tmp, dest)
    return dest


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config_text(
        f"""
store: {{url: "sqlite:///{tmp_path}/s.db"}}
internal_domains: [example.test]
accounts:
  - name: alice
    addresses: [alice@example.test]
    maildir: {tmp_path}/alice
""",
        "test.yaml",
    )


@pytest.fixture
def store(config: Config) -> Iterator[Store]:
    s = open_store(config.store.url)
    s.upsert_record(Record("contact", "c1", "Bob", ("bob@customer.test",)))
    yield s
    s.close()


def linked_files(store: Store) -> list[str]:
    return sorted(row["file"] for row in store.query_links(account="alice"))


def make_watcher(config: Config, store: Store, rescan: float = 300) -> FolderWatcher:
    return FolderWatcher(sent_folders(config.accounts), store, Linker(store, config), rescan)


def test_messages_present_before_start_are_linked_by_the_startup_reconcile(
    config: Config, store: Store, tmp_path: Path
) -> None:
    watcher = make_watcher(config, store)
    sent = tmp_path / "alice/.Sent"
    watcher.prepare_folders()
    deliver(sent, "1.M1P1.h,S=10:2,S", message(1), sub="cur")
    watcher.start()
    try:
        wait_for(lambda: linked_files(store) == [".Sent/cur/1.M1P1.h,S=10:2,S"])
    finally:
        watcher.stop()
    assert watcher.rescans >= 1


def test_new_file_is_linked_from_its_event_without_waiting_for_a_rescan(
    config: Config, store: Store, tmp_path: Path
) -> None:
    watcher = make_watcher(config, store, rescan=3600)
    watcher.start()
    try:
        wait_for(lambda: watcher.rescans == 1)
        deliver(tmp_path / "alice/.Sent", "2.M1P1.h,S=10", message(2))
        wait_for(lambda: linked_files(store) == [".Sent/new/2.M1P1.h,S=10"])
        # A client marks it read: the same message under a new name, not a new message.
        os.rename(
            tmp_path / "alice/.Sent/new/2.M1P1.h,S=10",
            tmp_path / "alice/.Sent/cur/2.M1P1.h,S=10:2,S",
        )
        watcher.request_rescan()
        wait_for(lambda: linked_files(store) == [".Sent/cur/2.M1P1.h,S=10:2,S"])
    finally:
        watcher.stop()
    assert watcher.rescans == 2


def test_files_created_by_link_are_seen_too(config: Config, store: Store, tmp_path: Path) -> None:
    watcher = make_watcher(config, store, rescan=3600)
    watcher.start()
    try:
        wait_for(lambda: watcher.rescans == 1)
        sent = tmp_path / "alice/.Sent"
        (sent / "tmp/3.M1P1.h").write_bytes(message(3))
        os.link(sent / "tmp/3.M1P1.h", sent / "new/3.M1P1.h")  # Postfix virtual(8) style
        os.unlink(sent / "tmp/3.M1P1.h")
        wait_for(lambda: linked_files(store) == [".Sent/new/3.M1P1.h"])
    finally:
        watcher.stop()


def test_missed_events_are_caught_by_the_periodic_rescan(
    config: Config, store: Store, tmp_path: Path
) -> None:
    watcher = make_watcher(config, store, rescan=0.3)
    watcher.prepare_folders()
    watcher.start()
    watcher.stop()  # events while stopped are lost, as on inotify overflow
    deliver(tmp_path / "alice/.Sent", "4.M1P1.h", message(4))
    assert linked_files(store) == []
    watcher = make_watcher(config, store, rescan=0.3)
    watcher.start()
    try:
        wait_for(lambda: linked_files(store) == [".Sent/new/4.M1P1.h"])
        first = watcher.rescans
        wait_for(lambda: watcher.rescans > first, timeout=5)
    finally:
        watcher.stop()


def test_a_file_the_linker_cannot_read_does_not_stop_the_watcher(
    config: Config, store: Store, tmp_path: Path
) -> None:
    watcher = make_watcher(config, store, rescan=3600)
    watcher.start()
    try:
        wait_for(lambda: watcher.rescans == 1)
        sent = tmp_path / "alice/.Sent"
        # Reading this one fails (a symlink to a directory): the next message still gets linked.
        (sent / "new/5.M1P1.h").symlink_to(tmp_path)
        deliver(sent, "6.M1P1.h", message(6))
        wait_for(lambda: linked_files(store) == [".Sent/new/6.M1P1.h"])
    finally:
        watcher.stop()
