"""What the store already knows about Maildir files, read in bulk for the watcher.

A periodic rescan of an unchanged mailbox must not open a single message file: it lists the
folder and takes the difference against the unique names the store has indexed for it. The
lookups go through the store's own connection of the calling thread, so inside a write batch
they see the rows the batch has not committed yet (store/batch.py).
"""

from __future__ import annotations

from typing import Protocol

from sentlink.store import IndexedFile, Store

KnownFile = IndexedFile


class KnownFiles(Protocol):
    def folder_files(self, account: str, folder: str) -> dict[str, str] | None:
        """``{uniq: file}`` indexed in ``folder``, or None when the backend cannot list them."""

    def message_files(self, account: str, message_id: str) -> list[KnownFile]:
        """Every indexed file of the account's message with this Message-ID (oldest first)."""

    def account_uniqs(self, account: str) -> set[str] | None:
        """Every indexed unique name of the account (all folders), or None (unsupported)."""

    def close(self) -> None: ...


class StoreKnownFiles:
    """The store's bulk lookups."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def folder_files(self, account: str, folder: str) -> dict[str, str] | None:
        return self._store.folder_files(account, folder)

    def account_uniqs(self, account: str) -> set[str] | None:
        return self._store.account_uniqs(account)

    def message_files(self, account: str, message_id: str) -> list[KnownFile]:
        return self._store.message_files(account, message_id)

    def close(self) -> None:
        pass


def known_files_for(store: Store) -> KnownFiles:
    """The bulk reader for ``store``."""
    return StoreKnownFiles(store)
