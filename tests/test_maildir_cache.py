"""Folder descriptors kept open between deliveries: reuse, recheck by name, bounds, closing."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from sentlink.errors import CaptureError
from sentlink.maildir import FolderCache, MaildirDelivery, Owner, list_messages

ME = Owner(os.geteuid(), os.getegid())
MESSAGE = b"From: alice@example.test\nSubject: hi\n\nHello.\n"

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and os.environ.get("CI") != "true",
    reason="needs root (chown to another uid); runs under CI=true",
)


def deliver(root: Path, folders: FolderCache, folder: str = "Sent") -> Path:
    with MaildirDelivery.start(root, folder, ME, folders) as delivery:
        delivery.write(MESSAGE)
        return delivery.commit()


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_second_copy_into_a_folder_reuses_its_checked_descriptors(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    with FolderCache() as folders:
        first = folders.lease(root, "Sent", ME)
        first.close()
        second = folders.lease(root, "Sent", ME)
        second.close()

        assert second.folder is first.folder
        assert fd_is_open(second.folder.cur_fd)
        assert len(folders) == 1


def test_copies_through_the_cache_land_in_cur_like_uncached_ones(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    with FolderCache() as folders:
        paths = [deliver(root, folders) for _ in range(3)] + [deliver(root, folders, "INBOX")]

    assert [p.parent for p in paths] == [root / ".Sent" / "cur"] * 3 + [root / "cur"]
    assert all(p.read_bytes() == MESSAGE for p in paths)
    assert list((root / ".Sent" / "tmp").iterdir()) == []
    assert (root / ".Sent" / "maildirfolder").exists()


def test_folder_deleted_between_copies_is_created_again_and_gets_the_copy(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    with FolderCache() as folders:
        deliver(root, folders)
        shutil.rmtree(root / ".Sent")
        path = deliver(root, folders)

    assert path.parent == root / ".Sent" / "cur" and path.exists()
    assert (root / ".Sent" / "maildirfolder").exists()


def test_folder_renamed_and_replaced_gets_the_copy_not_the_old_directory(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    with FolderCache() as folders:
        deliver(root, folders)
        (root / ".Sent").rename(root / ".Old")
        path = deliver(root, folders)

    assert path.parent == root / ".Sent" / "cur" and path.exists()
    assert len(list(list_messages(root, "Old"))) == 1
    assert len(list(list_messages(root, "Sent"))) == 1


def test_cur_replaced_inside_a_cached_folder_gets_the_copy(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    with FolderCache() as folders:
        deliver(root, folders)
        (root / ".Sent" / "cur").rename(root / ".Sent" / "cur.old")
        path = deliver(root, folders)

    assert path.parent == root / ".Sent" / "cur" and path.exists()


def test_cached_folder_swapped_for_a_symlink_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    elsewhere = tmp_path / "elsewhere"
    with FolderCache() as folders:
        deliver(root, folders)
        (root / ".Sent").rename(elsewhere)
        (root / ".Sent").symlink_to(elsewhere)
        with pytest.raises(CaptureError) as caught:
            deliver(root, folders)

    assert caught.value.reason == "unsafe"
    assert len(list((elsewhere / "cur").iterdir())) == 1  # only the copy from before the swap


@needs_root
def test_cached_folder_given_to_another_owner_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    with FolderCache() as folders:
        deliver(root, folders)
        os.chown(root / ".Sent" / "tmp", 5000, 5000)
        with pytest.raises(CaptureError) as caught:
            deliver(root, folders)

    assert caught.value.reason == "unsafe"
    assert list((root / ".Sent" / "tmp").iterdir()) == []


def test_least_recently_used_folder_is_closed_past_the_bound(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    with FolderCache(max_folders=2) as folders:
        leases = {}
        for name in ("Sent", "Drafts", "Sent", "Archive"):
            lease = folders.lease(root, name, ME)
            lease.close()
            leases[name] = lease

        assert len(folders) == 2
        assert leases["Drafts"].folder.cur_fd == -1  # evicted and closed
        assert fd_is_open(leases["Sent"].folder.cur_fd)
        assert fd_is_open(leases["Archive"].folder.cur_fd)


def test_folder_in_use_at_close_stays_open_until_its_delivery_ends(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    folders = FolderCache()
    delivery = MaildirDelivery.start(root, "Sent", ME, folders)
    idle = folders.lease(root, "Drafts", ME)
    idle.close()
    folders.close()

    assert idle.folder.cur_fd == -1
    delivery.write(MESSAGE)
    path = delivery.commit()
    assert path.read_bytes() == MESSAGE
    assert len(folders) == 0
    # After close() leases still work, but nothing is kept.
    late = folders.lease(root, "Sent", ME)
    late.close()
    assert late.folder.cur_fd == -1


def test_folder_idle_past_max_idle_is_closed_at_the_next_lease(tmp_path: Path) -> None:
    now = [1000.0]
    root = tmp_path / "alice"
    with FolderCache(max_idle=60.0, clock=lambda: now[0]) as folders:
        old = folders.lease(root, "Sent", ME)
        old.close()
        now[0] += 61.0
        folders.lease(root, "Drafts", ME).close()

        assert old.folder.cur_fd == -1
        assert len(folders) == 1


def test_concurrent_copies_with_evictions_all_land_once(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    names = ("Sent", "Drafts", "Archive")
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for i in range(30):
                deliver(root, folders, names[(index + i) % len(names)])
        except BaseException as exc:
            errors.append(exc)

    with FolderCache(max_folders=1) as folders:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

    assert errors == []
    assert sum(len(list(list_messages(root, name))) for name in names) == 6 * 30
    for name in names:
        assert list((root / f".{name}" / "tmp").iterdir()) == []
