"""Maildir delivery on the real file system: layout, safety, quota, full disk, moves, flags."""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sentlink.errors import CaptureError
from sentlink.maildir import (
    MaildirDelivery,
    Owner,
    ensure_folder,
    folder_path,
    list_messages,
    move_message,
    parse_flags,
    resolve_owner,
    set_flags,
    split_uniq,
)

ME = Owner(os.geteuid(), os.getegid())
OTHER = Owner(5000, 5000)
MESSAGE = b"From: alice@example.test\nTo: bob@example.test\nSubject: hi\n\nHello Bob.\n"

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and os.environ.get("CI") != "true",
    reason="needs root (chown to another uid, tmpfs mount); runs under CI=true",
)


def deliver(root: Path, data: bytes = MESSAGE, folder: str = "Sent", owner: Owner = ME) -> Path:
    with MaildirDelivery.start(root, folder, owner) as delivery:
        delivery.write(data)
        return delivery.commit()


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def message_files(root: Path) -> list[Path]:
    """Every file in any cur/ new/ tmp/ of the Maildir: where a message could be left."""
    return [p for p in all_files(root) if p.parent.name in ("cur", "new", "tmp")]


def test_committed_message_lands_in_sent_cur_with_seen_flag_size_and_mode_0600(
    tmp_path: Path,
) -> None:
    root = tmp_path / "alice"
    path = deliver(root)

    assert path.parent == root / ".Sent" / "cur"
    assert path.read_bytes() == MESSAGE
    match = re.fullmatch(r"(\d+\.M\d+P\d+Q\d+R[0-9a-f]+\.[^/:]+),S=(\d+):2,S", path.name)
    assert match, path.name
    assert int(match.group(2)) == len(MESSAGE) == path.stat().st_size
    assert split_uniq(path.name) == f"{match.group(1)},S={len(MESSAGE)}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list((root / ".Sent" / "tmp").iterdir()) == []
    assert list((root / ".Sent" / "new").iterdir()) == []


def test_new_maildir_is_created_private_with_cur_new_tmp(tmp_path: Path) -> None:
    root = tmp_path / "var" / "mail" / "alice"
    deliver(root)

    for directory in (root, root / ".Sent"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        for sub in ("cur", "new", "tmp"):
            assert (directory / sub).is_dir()


def test_folder_marker_and_subscription_are_created_once(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    ensure_folder(root, "Sent", ME)
    ensure_folder(root, "Sent", ME)
    deliver(root)

    marker = root / ".Sent" / "maildirfolder"
    assert marker.is_file()
    assert marker.stat().st_size == 0
    assert (root / "subscriptions").read_text() == "Sent\n"
    assert not (root / "subscriptions.lock").exists()


def held_subscriptions_lock(tmp_path: Path, content: str, age: float = 0.0) -> tuple[Path, Path]:
    """A Maildir root whose subscriptions lock someone else holds, last changed ``age`` s ago."""
    root = tmp_path / "alice"
    root.mkdir()
    lock = root / "subscriptions.lock"
    lock.write_text(content)
    if age:
        then = time.time() - age
        os.utime(lock, (then, then))
    return root, lock


def test_subscription_waits_briefly_for_a_lock_held_for_a_moment(tmp_path: Path) -> None:
    # Dovecot, or another copy creating the same folder at the same moment, holds the lock
    # for a write and a rename.
    root, lock = held_subscriptions_lock(tmp_path, "")
    releaser = threading.Timer(0.03, lock.unlink)
    releaser.start()
    try:
        ensure_folder(root, "Sent", ME)
    finally:
        releaser.join()
    assert (root / "subscriptions").read_text() == "Sent\n"
    assert (root / ".Sent" / "maildirfolder").is_file()


def test_subscription_held_off_by_a_fresh_lock_is_made_by_the_next_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, lock = held_subscriptions_lock(tmp_path, "someone else's")
    with caplog.at_level(logging.INFO, logger="sentlink.maildir"):
        ensure_folder(root, "Sent", ME)
    assert (root / ".Sent" / "cur").is_dir()  # the folder is usable: copies go in
    assert not (root / "subscriptions").exists()
    assert not (root / ".Sent" / "maildirfolder").exists()  # the marker says "done"
    assert lock.read_text() == "someone else's"  # never taken over while fresh
    assert any("subscribing Sent later" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    lock.unlink()
    ensure_folder(root, "Sent", ME)
    assert (root / "subscriptions").read_text() == "Sent\n"
    assert (root / ".Sent" / "maildirfolder").is_file()


def test_stale_subscriptions_lock_is_removed_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, lock = held_subscriptions_lock(tmp_path, "left by a crash", age=60)  # Dovecot: 30 s
    with caplog.at_level(logging.WARNING, logger="sentlink.maildir"):
        ensure_folder(root, "Sent", ME)
    assert (root / "subscriptions").read_text() == "Sent\n"
    assert not lock.exists()
    assert any("stale lock" in r.getMessage() for r in caplog.records)


def test_subscription_is_appended_to_existing_entries_in_dovecots_v2_format(
    tmp_path: Path,
) -> None:
    root = tmp_path / "alice"
    ensure_folder(root, "INBOX", ME)
    (root / "subscriptions").write_text("V\t2\n\nINBOX\nArchive\tOld")

    ensure_folder(root, "Sent/2024", ME)

    assert (root / ".Sent.2024" / "maildirfolder").is_file()
    assert (root / "subscriptions").read_text() == "V\t2\n\nINBOX\nArchive\tOld\nSent\t2024\n"


def test_folder_created_by_the_imap_server_is_not_resubscribed(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    ensure_folder(root, "INBOX", ME)
    for sub in ("cur", "new", "tmp"):
        (root / ".Sent" / sub).mkdir(parents=True)
    (root / ".Sent" / "maildirfolder").touch()

    deliver(root)

    assert not (root / "subscriptions").exists()


def test_folder_names_map_to_maildir_plus_plus_directories(tmp_path: Path) -> None:
    assert folder_path(tmp_path, "INBOX") == tmp_path
    assert folder_path(tmp_path, "") == tmp_path
    assert folder_path(tmp_path, "Sent") == tmp_path / ".Sent"
    assert folder_path(tmp_path, "Sent/Archive") == tmp_path / ".Sent.Archive"
    # Dovecot stores non-ASCII names in modified UTF-7 (RFC 3501 5.1.3).
    assert folder_path(tmp_path, "Envoyés") == tmp_path / ".Envoy&AOk-s"
    assert folder_path(tmp_path, "R&D") == tmp_path / ".R&-D"


@pytest.mark.parametrize("name", ["../etc", "Sent/../..", "/Sent", "Sent.", "a\nb"])
def test_folder_names_that_could_leave_the_maildir_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(CaptureError) as caught:
        MaildirDelivery.start(tmp_path / "alice", name, ME)
    assert caught.value.reason == "unsafe"


def test_symlinked_sent_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    elsewhere = tmp_path / "elsewhere"
    ensure_folder(root, "INBOX", ME)
    ensure_folder(elsewhere, "INBOX", ME)
    (root / ".Sent").symlink_to(elsewhere)

    with pytest.raises(CaptureError) as caught:
        deliver(root)

    assert caught.value.reason == "unsafe"
    assert str(root / ".Sent") in str(caught.value)
    assert message_files(elsewhere) == []


def test_symlinked_tmp_directory_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    ensure_folder(root, "Sent", ME)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / ".Sent" / "tmp").rmdir()
    (root / ".Sent" / "tmp").symlink_to(elsewhere)

    with pytest.raises(CaptureError) as caught:
        deliver(root)

    assert caught.value.reason == "unsafe"
    assert list(elsewhere.iterdir()) == []


def test_symlinked_maildir_root_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    ensure_folder(real, "INBOX", ME)
    (tmp_path / "alice").symlink_to(real)

    with pytest.raises(CaptureError) as caught:
        deliver(tmp_path / "alice")

    assert caught.value.reason == "unsafe"
    assert not (real / ".Sent").exists()


@needs_root
def test_mailbox_owned_by_another_uid_is_refused_with_both_uids_named(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    ensure_folder(root, "INBOX", ME)
    os.chown(root, 5000, 5000)

    with pytest.raises(CaptureError) as caught:
        deliver(root)

    assert caught.value.reason == "unsafe"
    assert str(root) in str(caught.value)
    assert "5000" in str(caught.value)
    assert str(ME.uid) in str(caught.value)
    assert not (root / ".Sent").exists()


@needs_root
def test_root_process_writes_every_file_owned_by_the_mailbox_owner(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    path = deliver(root, owner=OTHER)

    created = [root, *root.rglob("*")]
    assert path in created
    assert {root / "subscriptions", root / ".Sent" / "maildirfolder"} <= set(created)
    assert {(p.lstat().st_uid, p.lstat().st_gid) for p in created} == {(5000, 5000)}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@needs_root
def test_concurrent_first_deliveries_into_a_new_mailbox_all_succeed(tmp_path: Path) -> None:
    # Several SMTP sessions file the first copies of a mailbox at once: one creates and chowns
    # each directory while the others already look at it.
    import threading

    root = tmp_path / "new-mailbox"
    errors: list[BaseException] = []
    paths: list[Path] = []

    def one() -> None:
        try:
            paths.append(deliver(root, owner=OTHER))
        except BaseException as exc:
            errors.append(exc)

    for _ in range(5):
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        root = tmp_path / f"new-mailbox-{len(paths)}"
    assert errors == []
    assert len(paths) == 40 and all(p.exists() for p in paths)


@needs_root
def test_unprivileged_process_refuses_to_write_for_another_owner(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to uid 5000, then try to write a mailbox owned by root
        outcome = b"no error"
        try:
            os.setgroups([])
            os.setgid(5000)
            os.setuid(5000)
            MaildirDelivery.start(root, "Sent", Owner(0, 0))
        except CaptureError as exc:
            outcome = exc.reason.encode()
        except BaseException as exc:  # reported to the parent, whatever it is
            outcome = repr(exc).encode()
        finally:
            os.write(write_end, outcome)
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read()
    os.waitpid(pid, 0)

    assert outcome == b"permission"
    assert not root.exists()


def test_owner_specs_resolve_to_uid_and_gid() -> None:
    assert resolve_owner(None) == ME
    assert resolve_owner("5000:5001") == Owner(5000, 5001)
    assert resolve_owner("root") == Owner(0, 0)
    for bad in ("no-such-user-sentlink", "5000:x"):
        with pytest.raises(CaptureError) as caught:
            resolve_owner(bad)
        assert caught.value.reason == "unsafe"


def test_quota_exceeded_refuses_the_copy_and_leaves_no_file(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    ensure_folder(root, "Sent", ME)
    quota = f"1000S\n{1000 - len(MESSAGE) + 1} 3\n"
    (root / "maildirsize").write_text(quota)

    with pytest.raises(CaptureError) as caught:
        deliver(root)

    assert caught.value.reason == "quota"
    assert message_files(root) == []
    assert (root / "maildirsize").read_text() == quota


def test_message_count_quota_refuses_the_copy(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    ensure_folder(root, "Sent", ME)
    (root / "maildirsize").write_text("0S,3C\n100 2\n50 1\n")

    with pytest.raises(CaptureError) as caught:
        deliver(root)

    assert caught.value.reason == "quota"
    assert message_files(root) == []


def test_filed_message_size_is_appended_to_maildirsize(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    ensure_folder(root, "Sent", ME)
    (root / "maildirsize").write_text("100000S,10C\n500 2\n")

    deliver(root)

    assert (root / "maildirsize").read_text() == f"100000S,10C\n500 2\n{len(MESSAGE)} 1\n"


def test_without_maildirsize_there_is_no_quota_and_none_is_created(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    deliver(root, data=b"x" * 100_000)

    assert not (root / "maildirsize").exists()


def test_unparseable_maildirsize_means_no_quota_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "alice"
    ensure_folder(root, "Sent", ME)
    (root / "maildirsize").write_text("lots\nof garbage here\n")

    with caplog.at_level(logging.WARNING, logger="sentlink.maildir"):
        path = deliver(root)

    assert path.is_file()
    assert any("maildirsize" in r.getMessage() for r in caplog.records)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], check=True
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@needs_root
def test_full_disk_fails_the_copy_without_a_partial_file(tiny_disk: Path) -> None:
    root = tiny_disk / "alice"
    deliver(root)  # the Maildir and a first message fit

    with pytest.raises(CaptureError) as caught:
        deliver(root, data=MESSAGE + b"x" * 200_000)

    assert caught.value.reason == "disk_full"
    assert str(root / ".Sent" / "tmp") in str(caught.value)
    assert len(list((root / ".Sent" / "cur").iterdir())) == 1
    assert list((root / ".Sent" / "tmp").iterdir()) == []


def test_abort_removes_the_tmp_file_and_may_be_repeated(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    delivery = MaildirDelivery.start(root, "Sent", ME)
    delivery.write(MESSAGE)
    assert delivery.tmp_path.is_file()

    delivery.abort()
    delivery.abort()

    assert message_files(root) == []


def test_exception_inside_the_with_block_aborts_the_delivery(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    with pytest.raises(RuntimeError), MaildirDelivery.start(root, "Sent", ME) as delivery:
        delivery.write(MESSAGE)
        raise RuntimeError("client went away")

    assert message_files(root) == []


def test_commit_files_flags_sorted_and_inbox_delivery_uses_the_root(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    with MaildirDelivery.start(root, "INBOX", ME) as delivery:
        delivery.write(MESSAGE)
        path = delivery.commit(flags="TSF")

    assert path.parent == root / "cur"
    assert parse_flags(path.name) == "FST"
    assert not (root / "maildirfolder").exists()


def test_move_message_keeps_the_unique_name_and_merges_flags(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    with MaildirDelivery.start(root, "INBOX", ME) as delivery:
        delivery.write(MESSAGE)
        src = delivery.commit(flags="F")

    moved = move_message(src, root, "Sent", ME, add_flags="S")

    assert moved == root / ".Sent" / "cur" / f"{split_uniq(src.name)}:2,FS"
    assert moved.read_bytes() == MESSAGE
    assert not src.exists()
    assert (root / ".Sent" / "maildirfolder").is_file()


def test_move_message_follows_a_flag_rename_made_by_a_client_meanwhile(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    (root / "new").mkdir(parents=True)
    stale = root / "new" / "1700000000.M1P2Q3R4.host,S=10"
    stale.write_bytes(MESSAGE)
    # An IMAP client reads the message: new/X -> cur/X:2,RS, after we listed it as new/X.
    ensure_folder(root, "INBOX", ME)
    stale.rename(root / "cur" / f"{stale.name}:2,RS")

    moved = move_message(stale, root, "Sent", ME, add_flags="S")

    assert moved == root / ".Sent" / "cur" / f"{stale.name}:2,RS"
    assert moved.read_bytes() == MESSAGE
    assert list(list_messages(root, "INBOX")) == []


def test_move_of_a_vanished_message_raises_io(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    ensure_folder(root, "INBOX", ME)

    with pytest.raises(CaptureError) as caught:
        move_message(root / "cur" / "123.M1P1Q1R1.host:2,S", root, "Sent", ME)

    assert caught.value.reason == "io"


def test_set_flags_renames_into_cur_and_follows_a_client_rename(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    ensure_folder(root, "INBOX", ME)
    path = root / "new" / "1700000000.M1P2Q3R4.host"
    path.write_bytes(MESSAGE)

    flagged = set_flags(path, "TS")
    assert flagged == root / "cur" / f"{path.name}:2,ST"

    flagged.rename(root / "cur" / f"{path.name}:2,RST")
    assert set_flags(flagged, "S") == root / "cur" / f"{path.name}:2,S"
    assert [p.name for p in list_messages(root, "INBOX")] == [f"{path.name}:2,S"]


def test_parse_flags_reads_the_info_part() -> None:
    assert parse_flags("1.M1P1Q1R1.host,S=5:2,FS") == "FS"
    assert parse_flags("1.M1P1Q1R1.host,S=5:2,") == ""
    assert parse_flags("1.M1P1Q1R1.host") == ""
    assert split_uniq("1.M1P1Q1R1.host,S=5:2,FS") == "1.M1P1Q1R1.host,S=5"


def test_list_messages_yields_new_and_cur_but_not_tmp_or_dotfiles(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    ensure_folder(root, "Sent", ME)
    sent = root / ".Sent"
    for name in ("new/a", "cur/b:2,S", "tmp/c", "cur/.hidden", "new/.d"):
        (sent / name).write_bytes(MESSAGE)

    assert sorted(p.relative_to(sent).as_posix() for p in list_messages(root, "Sent")) == [
        "cur/b:2,S",
        "new/a",
    ]
    assert list(list_messages(root, "Missing")) == []


def test_unique_names_differ_across_1000_rapid_deliveries(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    paths = [deliver(root, data=b"Subject: %d\n\n" % i) for i in range(1000)]

    assert len({split_uniq(p.name) for p in paths}) == 1000
    assert len(list((root / ".Sent" / "cur").iterdir())) == 1000
