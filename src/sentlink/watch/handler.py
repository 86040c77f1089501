"""One new message file in a watched folder: rules, self-sent filing, duplicates, linking.

The steps, for a file whose Maildir unique name the store has not indexed:

1. read and parse the header section once (size-capped; the body is never parsed);
2. user rules, then in INBOX the built-in self-sent rule, decide on a move, flags and linking;
3. the move is a rename() into the target folder's ``cur/`` (atomic: the message is always in
   exactly one folder; retried when a client renames the file meanwhile, see maildir/moves.py);
4. in the Sent folder, copies with the same Message-ID and body are reduced to one visible copy;
5. the message is indexed and linked: direction ``sent`` in the account's Sent folder (To/Cc/Bcc),
   ``received`` elsewhere (From/Cc).

A failure leaves the file where it is, unindexed: the next rescan tries again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from sentlink.config.models import AccountConfig
from sentlink.headers import HeaderBlock, StrPath
from sentlink.linker import Linker, LinkResult
from sentlink.maildir import find_message, folder_path, move_message, resolve_owner, set_flags
from sentlink.maildir.cache import FolderCache
from sentlink.maildir.moves import sync_dirs
from sentlink.maildir.names import merge_flags, parse_flags, split_uniq
from sentlink.maildir.safety import Owner
from sentlink.model import Direction, Link, MessageInfo
from sentlink.store import MessageRows, SaveRequest, Store, StoreError
from sentlink.watch.duplicates import Copy, body_hash, resolve
from sentlink.watch.known import KnownFile, KnownFiles
from sentlink.watch.policy import WatchPolicy
from sentlink.watch.prepare import (
    Packed,
    Prepared,
    Preparer,
    direction_of,
    kept_headers,
    packed_date,
    packed_draft,
)
from sentlink.watch.rules import Decision, MessageFacts

__all__ = [
    "MessageHandler",
    "Outcome",
    "Plan",
    "Staged",
    "WatchPolicy",
    "direction_of",
    "relative",
]

log = logging.getLogger("sentlink.watch")

# Store writes per transaction while handling many files (a reconcile, a burst of events): a
# commit per message would cost more than indexing it, and each commit writes every index page
# its messages touched (a random Message-ID lands on a different page of its index each time),
# so fewer, larger commits write the hot pages fewer times. Half a second bounds how long the
# write lock is held and how much a crash makes the next rescan redo; a reconcile reaches it
# first. Replaying a 100,000-message reconcile's main process, commits every 10,000 writes
# rather than 2,000 cost 3-6 us less per message.
BATCH_WRITES = 10_000
BATCH_SECONDS = 0.5


@dataclass(frozen=True)
class Outcome:
    """What happened to one file. ``status`` is the linker's, or vanished/error/duplicate."""

    status: str
    folder: str
    moved: bool = False
    removed: int = 0  # our duplicate copies deleted
    trashed: int = 0  # foreign duplicate copies flagged T


@dataclass(frozen=True)
class Staged:
    """A message handled up to its store write (see :meth:`MessageHandler.stage`)."""

    info: MessageInfo
    links: list[Link]
    result: LinkResult
    headers: HeaderBlock
    path: Path  # where the file is now (moved, flagged)
    moved: bool
    trashed: int
    forget: tuple[KnownFile, ...]  # indexed duplicate copies deleted


# What MessageHandler.stage_packed gives: the write, the plan's outcome, the headers kept; or,
# when rows say it all, the rows and the status.
QuickStaged = tuple[SaveRequest, LinkResult, HeaderBlock]
RowsStaged = tuple[MessageRows, str]


@dataclass(frozen=True)
class Plan:
    """What ``--dry-run`` shows for one file."""

    account: str
    folder: str
    file: str
    message_id: str
    decision: Decision
    direction: Direction

    def describe(self) -> str:
        return self.decision.describe()

    def as_dict(self) -> dict[str, object]:
        return {
            "account": self.account,
            "folder": self.folder,
            "file": self.file,
            "message_id": self.message_id,
            "reasons": list(self.decision.reasons),
            "move": self.decision.move,
            "flags": self.decision.flags,
            "link": self.decision.link,
            "direction": self.direction,
        }


def relative(path: StrPath, root: Path) -> str:
    # String prefix first: pathlib's relative_to costs more than the rest of indexing a file.
    text, prefix = str(path), str(root) + "/"
    if text.startswith(prefix) and len(text) > len(prefix):
        return text[len(prefix) :]
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return text


class MessageHandler:
    """Carries out the steps above for one file at a time (one worker thread calls it)."""

    def __init__(
        self, store: Store, linker: Linker, policy: WatchPolicy, known: KnownFiles
    ) -> None:
        self._store = store
        self._linker = linker
        self._policy = policy
        self._known = known
        self._preparer = Preparer(policy, linker.filter, linker.reads_sender)
        # Rows of duplicate copies we deleted, forgotten in one store call per folder.
        self._forget: dict[tuple[str, str], set[str]] = {}
        # Inside batch(): directories our renames changed, fsynced once before each commit, and
        # the checked target folders of moves, kept open until the batch ends.
        self._unsynced: set[Path] | None = None
        self._folders: FolderCache | None = None
        # Inside batch(): each account's mailbox owner, looked up once (a user name costs a
        # passwd lookup).
        self._owners: dict[str | None, Owner] = {}

    @property
    def known(self) -> KnownFiles:
        return self._known

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Handle many files with their store rows in shared transactions (store/batch.py).

        Moves fsync their two directories once per commit instead of per file, right before
        the commit: a committed row never names a file whose rename a crash could still undo
        (that would leave a self-sent message indexed but back in INBOX, never moved again).
        A crash before the commit loses the rows, and the next rescan finds each moved file in
        its new folder, or, if the rename was undone too, in its old one, and handles it again.
        """
        outer = self._unsynced
        if outer is None:
            self._unsynced = set()
            self._folders = FolderCache()
        try:
            with self._store.batch(BATCH_WRITES, BATCH_SECONDS, self._sync_moves):
                yield
        finally:
            if outer is None:
                try:
                    self._sync_moves()  # also when the commit failed: the renames are done
                finally:
                    self._unsynced = None
                    self._owners = {}
                    if self._folders is not None:
                        self._folders.close()
                        self._folders = None

    def _owner(self, spec: str | None) -> Owner:
        """``resolve_owner(spec)``; inside batch(), once per spec."""
        if self._unsynced is None:
            return resolve_owner(spec)
        owner = self._owners.get(spec)
        if owner is None:
            owner = self._owners[spec] = resolve_owner(spec)
        return owner

    def _sync_moves(self) -> None:
        if self._unsynced:
            dirs = sorted(self._unsynced)
            self._unsynced.clear()
            sync_dirs(dirs)

    @property
    def preparer(self) -> Preparer:
        """What reads and judges files for this handler (picklable: see watch/prepare.py)."""
        return self._preparer

    def explain(self, account: AccountConfig, folder: str, path: Path) -> Plan:
        """What :meth:`handle` would do with ``path``, changing nothing."""
        headers = self._preparer.read(path)
        decision, _facts = self._preparer.decide(account, folder, headers, path)
        target = decision.move or folder
        _info, _links, result = self._linker.plan(
            account, target, split_uniq(path.name), "", headers, direction_of(account, target)
        )
        return Plan(
            account.name,
            folder,
            relative(path, account.maildir),
            result.message_id,
            decision,
            direction_of(account, target),
        )

    def handle(
        self, account: AccountConfig, folder: str, path: Path, prepared: Prepared | None = None
    ) -> Outcome:
        """Handle one file not yet indexed; ``prepared`` is what ``Preparer.prepare`` gave for
        it, when a worker read it already. Raises FileNotFoundError when it vanished, and
        StoreError/CaptureError/OSError on failures (the caller logs; the rescan retries)."""
        staged = self.stage(account, folder, path, prepared)
        if isinstance(staged, Outcome):
            return staged
        saved = self._linker.save(
            staged.info, staged.links, staged.result, staged.headers, staged.path
        )
        return self.complete(staged, saved)

    def stage(
        self, account: AccountConfig, folder: str, path: Path, prepared: Prepared | None = None
    ) -> Outcome | Staged:
        """:meth:`handle` up to the store write: the outcome when there is nothing to write,
        else what to write. The caller writes it (``Linker.save``, or ``Linker.save_many``
        with others) and passes the answer to :meth:`complete`. Raises like ``handle``."""
        if prepared is None:
            prepared = self._preparer.prepare(account, folder, path)
        headers, decision = prepared.headers, prepared.decision
        facts = self._preparer.facts(headers)
        moved = False
        if decision.move is not None:
            owner = self._owner(account.owner)
            path = move_message(
                path,
                account.maildir,
                decision.move,
                owner,
                decision.flags,
                self._unsynced,
                self._folders,
            )
            log.info(
                "account=%s file=%s moved %s -> %s (%s)",
                account.name,
                path.name,
                folder,
                decision.move,
                ", ".join(decision.reasons),
            )
            folder, moved = decision.move, True
        elif decision.flags:
            path = set_flags(path, merge_flags(parse_flags(path.name), decision.flags))
        direction = direction_of(account, folder)
        uniq = split_uniq(path.name)
        info, links, result = self._linker.plan(
            account,
            folder,
            uniq,
            relative(path, account.maildir),
            headers,
            direction,
            prepared.draft,
        )
        if not decision.link and links:
            links = []
            result = LinkResult("skipped", ", ".join(decision.reasons), 0, info.message_id)
        trashed = 0
        forget: list[KnownFile] = []
        if direction == "sent" and info.message_id:

            def merge_links(survivor: KnownFile) -> None:
                # This copy goes, the indexed one stays: keep what only this one names (the
                # Bcc recipients of our capture copy), under the surviving copy's name.
                if result.status == "linked":
                    kept_info = replace(
                        info, uniq=survivor.uniq, folder=survivor.folder, file=survivor.file
                    )
                    self._linker.add_missing_links(kept_info, links, headers, path)

            kept, forget, trashed = self._deduplicate(
                account, folder, path, facts, info.message_id, merge_links
            )
            if kept is None:
                self._flush_forget_later(account.name, folder, [], forget)
                return Outcome("duplicate", folder, moved, removed=1 + len(forget), trashed=trashed)
            if kept != path:
                path = kept
                info = replace(info, file=relative(path, account.maildir))
        return Staged(info, links, result, headers, path, moved, trashed, tuple(forget))

    def stage_packed(
        self, account: AccountConfig, folder: str, path: str, packed: Packed
    ) -> RowsStaged | QuickStaged | None:
        """:meth:`stage` and :meth:`request` of the usual message of a reconcile, from what a
        worker packed (``Preparer.prepare_packed``): no rule's decision (no move, no flag,
        linked), and not a copy of a message already in this folder. None for any other
        message: then :meth:`stage` handles it. The same plan and request as there, without
        the steps that do nothing for such a message (a few us per message of a reconcile's
        main process). Most such messages are given as the rows to write and their status
        (``Linker.plan_rows``). Raises like :meth:`request`."""
        if packed[2] is not None:  # a rule or the self-sent rule decided something
            return None
        direction = direction_of(account, folder)
        message_id = packed[3]
        uniq = split_uniq(path.rpartition("/")[2])
        if direction == "sent" and message_id:
            for known in self._known.message_files(account.name, message_id):
                if known.folder == folder and known.uniq != uniq:
                    return None  # copies to reduce (_deduplicate)
        file = relative(path, account.maildir)
        date = packed_date(packed)
        if not (packed[7] or packed[9]):  # neither private nor ambiguous
            participants = packed[8]
            candidates = [(participants[i][0], participants[i][1]) for i in packed[11]]
            planned = self._linker.plan_rows(
                account.name,
                folder,
                uniq,
                file,
                direction,
                (packed[3], packed[4], date, packed[6], packed[10], candidates),
            )
            if planned is not None:
                return planned
        draft = packed_draft(packed, date)
        headers = kept_headers(packed)
        info, links, result = self._linker.plan(
            account, folder, uniq, file, headers, direction, draft
        )
        return self._linker.request(info, links, result, headers, path), result, headers

    def complete_packed(self, staged: QuickStaged, saved: bool, path: str) -> str:
        """The status of a message staged by :meth:`stage_packed`, as :meth:`complete` gives
        it for one staged by :meth:`stage`."""
        request, result, headers = staged
        info = request.info
        if not saved:
            if result.status == "linked":
                self._linker.add_missing_links(info, request.links, headers, path)
            return "already"
        if result.status == "linked":
            _log_linked(info.account, info.message_id, len(request.links), info.file)
        return result.status

    def complete_rows(self, staged: RowsStaged, saved: bool, path: str) -> str:
        """:meth:`complete_packed` for a message staged as rows."""
        rows, status = staged
        if not saved:
            if status == "linked":
                # Rows are staged only when no hook wants an event: no header is read for one.
                request = rows.request()
                self._linker.add_missing_links(
                    request.info, request.links, HeaderBlock((), False), path
                )
            return "already"
        if status == "linked":
            _log_linked(rows.account, rows.message_id, len(rows.links), rows.file)
        return status

    def save_rows(self, rows: Sequence[MessageRows]) -> list[bool | StoreError]:
        """Write messages staged as rows together (``Store.save_rows``)."""
        return self._store.save_rows(rows)

    def request(self, staged: Staged) -> SaveRequest:
        """What to write for a staged message. Raises OSError like ``Linker.save``."""
        return self._linker.request(
            staged.info, staged.links, staged.result, staged.headers, staged.path
        )

    def save_many(self, requests: Sequence[SaveRequest]) -> list[bool | StoreError]:
        """Write staged messages together (``Linker.save_many``)."""
        return self._linker.save_many(requests)

    def complete(self, staged: Staged, saved: bool) -> Outcome:
        """The outcome of a staged message, once ``Linker.save`` answered ``saved``."""
        info, result = staged.info, staged.result
        status = result.status if saved else "already"
        if not saved and result.status == "linked":
            # Another copy was indexed first; this one may name more records (its Bcc).
            self._linker.add_missing_links(info, staged.links, staged.headers, staged.path)
        if saved and result.status == "linked":
            _log_linked(info.account, info.message_id, len(staged.links), info.file)
        self._flush_forget_later(info.account, info.folder, [], list(staged.forget))
        return Outcome(
            status, info.folder, staged.moved, removed=len(staged.forget), trashed=staged.trashed
        )

    def _deduplicate(
        self,
        account: AccountConfig,
        folder: str,
        path: Path,
        facts: MessageFacts,
        message_id: str,
        before_delete: Callable[[KnownFile], None],
    ) -> tuple[Path | None, list[KnownFile], int]:
        """Reduce the copies of ``message_id`` in Sent to one visible copy.

        Returns the new file's path (None when it was deleted as a duplicate), the indexed
        copies deleted, and how many copies were flagged T. ``before_delete`` gets an indexed
        copy that stays when the new file is about to be deleted.
        """
        uniq = split_uniq(path.name)
        others: list[tuple[KnownFile, Path]] = []
        for known in self._known.message_files(account.name, message_id):
            if known.folder != folder or known.uniq == uniq:
                continue
            found = self._locate(account, known)
            if found is not None and "T" not in parse_flags(found.name):
                others.append((known, found))
        if not others:
            return path, [], 0
        mine = body_hash(path)
        same = [(k, p) for k, p in others if _same_body(p, mine)]
        if not same:
            log.info(
                "account=%s message_id=%s reused with a different body: all copies kept",
                account.name,
                message_id,
            )
            return path, [], 0
        copies = [Copy(p, self._is_ours(account, p), False) for _k, p in same]
        new = Copy(path, facts.trace_account == account.name, True)
        resolution = resolve([*copies, new], self._policy.keep)
        by_path = {p: k for k, p in same}
        forget: list[KnownFile] = []
        kept: Path | None = path
        if any(copy.new for copy in resolution.delete):
            gone = {copy.path for copy in resolution.delete}
            survivor = next((k for k, p in same if p not in gone), None)
            if survivor is not None:
                before_delete(survivor)
        for copy in resolution.delete:
            os.unlink(copy.path)
            log.info(
                "account=%s message_id=%s duplicate copy %s removed (ours; keep=%s)",
                account.name,
                message_id,
                copy.path.name,
                self._policy.keep,
            )
            if copy.new:
                kept = None
            else:
                forget.append(by_path[copy.path])
        for copy in resolution.trash:
            flagged = set_flags(copy.path, merge_flags(parse_flags(copy.path.name), "T"))
            log.info(
                "account=%s message_id=%s duplicate copy %s flagged T (not ours; keep=%s)",
                account.name,
                message_id,
                flagged.name,
                self._policy.keep,
            )
            if copy.new:
                kept = flagged
            else:
                k = by_path[copy.path]
                self._store.move_message(
                    account.name, k.uniq, folder, relative(flagged, account.maildir)
                )
        return kept, forget, len(resolution.trash)

    def _locate(self, account: AccountConfig, known: KnownFile) -> Path | None:
        path = account.maildir / known.file
        if path.exists():
            return path
        return find_message(folder_path(account.maildir, known.folder), known.uniq)

    def _is_ours(self, account: AccountConfig, path: Path) -> bool:
        try:
            headers = self._preparer.read(path)
        except OSError:
            return False
        return MessageFacts(headers, self._policy.secret).trace_account == account.name

    def _flush_forget_later(
        self, account: str, folder: str, uniqs: list[str], known: list[KnownFile]
    ) -> None:
        names = set(uniqs) | {k.uniq for k in known}
        if names:
            self._forget.setdefault((account, folder), set()).update(names)

    def flush(self) -> None:
        """Drop the store rows of the duplicate copies deleted since the last call."""
        pending, self._forget = self._forget, {}
        for (account, folder), gone in pending.items():
            indexed = self._known.folder_files(account, folder)
            if indexed is None:
                continue
            present = set(indexed) - gone
            self._store.forget_missing(account, present, folder)


def _log_linked(account: str, message_id: str, records: int, file: str) -> None:
    log.info(
        "account=%s message_id=%s linked records=%d file=%s", account, message_id, records, file
    )


def _same_body(path: Path, digest: str) -> bool:
    try:
        return body_hash(path) == digest
    except FileNotFoundError:
        return False
