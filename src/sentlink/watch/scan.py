"""Reconcile Maildir folders against the store: handle every message file not yet indexed.

An unchanged folder costs one directory listing and one set difference against the unique names
the store has indexed for it: no message file is opened (``watch.known``).
"""

from __future__ import annotations

import gc
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import TypeVar

from sentlink.config.models import AccountConfig, Config
from sentlink.errors import CaptureError
from sentlink.linker import Linker
from sentlink.maildir import folder_path, list_messages, split_uniq
from sentlink.maildir.folders import list_message_names
from sentlink.maildir.names import folder_dir_name
from sentlink.model import Direction
from sentlink.store import MessageRows, SaveRequest, Store
from sentlink.watch.handler import (
    MessageHandler,
    Outcome,
    QuickStaged,
    RowsStaged,
    Staged,
    WatchPolicy,
    relative,
)
from sentlink.watch.known import KnownFiles, known_files_for
from sentlink.watch.prepare import (
    Packed,
    Prepared,
    Preparer,
    packed_candidates,
    packed_thread_refs,
    unpack,
)
from sentlink.watch.readahead import ReadAhead
from sentlink.watch.worker import PrepareWorker, WorkerGone

log = logging.getLogger("sentlink.watch")

_T = TypeVar("_T")

# Allocations between two runs of the garbage collector during a scan (fewer_gc_passes).
GC_GEN0 = 50_000

# A folder with at least this many new files has them read and judged in a worker process
# (watch/prepare.py, _pipeline): below it, starting the process costs more than it saves.
PARALLEL_FROM = 2000
# Messages written to the store together in such a folder (MessageHandler.save_many).
_WRITE_GROUP = 100
# Files per worker job, and jobs in flight ahead of the file being handled.
_CHUNK = 256
_PREPARE_AHEAD = 3
# Read-ahead (watch/readahead.py): chunks asked for ahead of the file being handled.
_WARM_AHEAD = 5


@dataclass(frozen=True)
class FolderRef:
    """One watched Maildir folder of one account, and the direction of the mail it holds."""

    account: AccountConfig
    folder: str
    direction: Direction

    @property
    def path(self) -> Path:
        return folder_path(self.account.maildir, self.folder)


@dataclass
class ScanSummary:
    seen: int = 0
    linked: int = 0
    already: int = 0
    skipped: int = 0
    failed: int = 0
    moved: int = 0
    duplicates_removed: int = 0
    duplicates_trashed: int = 0
    by_status: dict[str, int] = field(default_factory=dict)

    def add(self, status: str) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if status == "linked":
            self.linked += 1
        elif status == "already":
            self.already += 1
        elif status in ("error", "failed"):
            self.failed += 1
        else:
            self.skipped += 1

    def add_outcome(self, outcome: Outcome) -> None:
        self.add(outcome.status)
        self.moved += int(outcome.moved)
        self.duplicates_removed += outcome.removed
        self.duplicates_trashed += outcome.trashed

    def as_dict(self) -> dict[str, object]:
        return {
            "seen": self.seen,
            "linked": self.linked,
            "already": self.already,
            "skipped": self.skipped,
            "failed": self.failed,
            "moved": self.moved,
            "duplicates_removed": self.duplicates_removed,
            "duplicates_trashed": self.duplicates_trashed,
            "by_status": dict(sorted(self.by_status.items())),
        }


def sent_folders(accounts: Sequence[AccountConfig]) -> list[FolderRef]:
    """Each account's Sent folder: what the capture entrances and IMAP clients write to."""
    return [FolderRef(a, a.sent_folder, "sent") for a in accounts]


def watched_folders(
    config: Config, accounts: Sequence[AccountConfig] | None = None
) -> list[FolderRef]:
    """``watch.folders`` of every account, plus its Sent folder (capture copies land there)."""
    refs = []
    for account in config.accounts if accounts is None else accounts:
        names = list(dict.fromkeys((*config.watch.folders, account.sent_folder)))
        for name in names:
            direction: Direction = "sent" if name == account.sent_folder else "received"
            refs.append(FolderRef(account, name, direction))
    return refs


def relative_file(ref: FolderRef, path: Path) -> str:
    return relative(path, ref.account.maildir)


def needs_linking(store: Store, ref: FolderRef, path: Path, record_moves: bool = True) -> bool:
    """True for a file the store has not indexed. For one it has, keep its location current.

    Clients rename a message file to change its flags (``:2,S`` -> ``:2,RS``) and move it between
    folders; the unique name before ``:2,`` stays, so the message is the same one.
    """
    uniq = split_uniq(path.name)
    where = store.message_location(ref.account.name, uniq)
    if where is None:
        return True
    file = relative_file(ref, path)
    if record_moves and where != (ref.folder, file):
        store.move_message(ref.account.name, uniq, ref.folder, file)
    return False


def handle_one(
    handler: MessageHandler, ref: FolderRef, path: Path, prepared: Prepared | None = None
) -> Outcome:
    """Handle one file; a failure is logged and reported, never raised (the rescan retries)."""
    return _guarded(ref, path, lambda: handler.handle(ref.account, ref.folder, path, prepared))


def _guarded(ref: FolderRef, path: str | Path, work: Callable[[], _T]) -> _T | Outcome:
    """``work()`` on one file, its failure logged and turned into an outcome."""
    try:
        return work()
    except FileNotFoundError:
        # A client renamed it (flag change) or moved it away meanwhile: the rescan sees it again.
        return Outcome("vanished", ref.folder)
    except CaptureError as exc:
        if exc.reason == "io" and "gone" in str(exc):
            return Outcome("vanished", ref.folder)
        log.warning(
            "account=%s file=%s not handled: %s", ref.account.name, os.path.basename(path), exc
        )
        return Outcome("error", ref.folder)
    except Exception as exc:  # one bad file must not stop the watcher
        log.warning(
            "account=%s file=%s not handled: %s", ref.account.name, os.path.basename(path), exc
        )
        return Outcome("error", ref.folder)


def pending_files(
    store: Store,
    ref: FolderRef,
    known: KnownFiles,
    record_moves: bool = True,
    on_large: Callable[[], None] | None = None,
) -> list[str]:
    """Message files of ``ref`` that the store has not indexed yet, as path strings (a path
    object per file cost more than the rest of listing a folder never indexed). Indexed files
    renamed or moved in by a client get their new location recorded (unless ``record_moves``
    is false).
    ``on_large`` is called as soon as the folder looks like a large job: one the store has
    never indexed a file of, holding files, is listed; or one with PARALLEL_FROM new files.

    The files come in the order of their names. Maildir writers start a name with the delivery
    time, so that is the order the mail arrived in: a reply is handled after the message it
    answers and finds its thread links, whatever order the directory lists them in. It is also
    the order of the store's file key, which is then appended to instead of written at random
    places, and, on a disk filled by deliveries, about the order the files were written in
    (a cold reconcile reads them with fewer seeks)."""
    if not ref.path.is_dir():
        return []
    indexed = known.folder_files(ref.account.name, ref.folder)
    if on_large is not None and indexed == {} and _holds_files(ref.path):
        on_large()
        on_large = None
    if indexed is None:
        listing = list_messages(ref.account.maildir, ref.folder)
        found = [p for p in listing if needs_linking(store, ref, p, record_moves)]
        return [str(p) for p in sorted(found, key=attrgetter("name"))]
    pending: list[tuple[str, str]] = []
    elsewhere: set[str] | None = None
    # Names, not paths: a path object per file cost most of a rescan of an unchanged folder.
    # A file's name relative to the Maildir, as the store keeps it: "cur/NAME", ".Sent/cur/NAME".
    dir_name = folder_dir_name(ref.folder)
    prefix = "" if dir_name is None else dir_name + "/"
    subdirs = {sub: f"{ref.path}/{sub}/" for sub in ("new", "cur")}
    for sub, name in list_message_names(ref.account.maildir, ref.folder):
        uniq = split_uniq(name)
        file = indexed.get(uniq)
        if file is None:
            path = subdirs[sub] + name
            if elsewhere is None:  # read once, and only when a folder has new names
                elsewhere = known.account_uniqs(ref.account.name) or set()
            # New here, or moved in from another folder by a client (then only recorded).
            if uniq not in elsewhere or needs_linking(store, ref, Path(path), record_moves):
                pending.append((name, path))
        elif record_moves and file != (here := f"{prefix}{sub}/{name}"):
            store.move_message(ref.account.name, uniq, ref.folder, here)
    if on_large is not None and len(pending) >= PARALLEL_FROM:
        on_large()
    pending.sort(key=itemgetter(0))
    return [path for _name, path in pending]


def _holds_files(folder: Path) -> bool:
    """Whether ``new/`` or ``cur/`` has an entry besides dotfiles (reads one directory block)."""
    for sub in ("new", "cur"):
        try:
            with os.scandir(folder / sub) as entries:
                if any(not e.name.startswith(".") for e in entries):
                    return True
        except OSError:
            continue
    return False


@contextmanager
def default_handler(store: Store, linker: Linker) -> Iterator[MessageHandler]:
    known = known_files_for(store)
    try:
        yield MessageHandler(store, linker, WatchPolicy(), known)
    finally:
        known.close()


def scan_folders(
    refs: Sequence[FolderRef],
    store: Store,
    linker: Linker,
    progress: Callable[[int], None] | None = None,
    handler: MessageHandler | None = None,
    pending: dict[FolderRef, list[str]] | None = None,
    parallel_from: int = PARALLEL_FROM,
    workers: Workers | None = None,
) -> ScanSummary:
    """Handle every message not yet in the store. ``progress`` is called once per new file;
    ``pending`` is what :func:`pending_by_folder` found, when the caller listed already. A
    folder with ``parallel_from`` new files or more is prepared in a worker process (that of
    ``workers`` when given, started already perhaps)."""
    if handler is None:
        with default_handler(store, linker) as made:
            return scan_folders(
                refs, store, linker, progress, made, pending, parallel_from, workers
            )
    if workers is None:
        with Workers(handler.preparer) as made_workers:
            return scan_folders(
                refs, store, linker, progress, handler, pending, parallel_from, made_workers
            )
    summary = ScanSummary()
    with fewer_gc_passes(), handler.batch():
        try:
            for ref in refs:
                paths = (
                    pending[ref]
                    if pending is not None
                    else pending_files(store, ref, handler.known)
                )
                parallel = len(paths) >= parallel_from
                steps = _pipeline(
                    workers if parallel else None,
                    handler.preparer,
                    ref,
                    paths,
                    linker.prime,
                )
                if parallel:
                    _handle_in_groups(handler, ref, steps, summary, progress)
                    continue
                for path, packed in steps:
                    summary.seen += 1
                    prepared = None if packed is None else unpack(packed)
                    summary.add_outcome(handle_one(handler, ref, Path(path), prepared))
                    if progress is not None:
                        progress(1)
        finally:
            handler.flush()
    return summary


@contextmanager
def fewer_gc_passes() -> Iterator[None]:
    """Run the garbage collector's youngest generation every GC_GEN0 allocations, not 700.

    A scan allocates a few objects per header field and address and keeps few of them, while
    the process holds large long-lived caches (the store's records, the folder listings) that
    each pass reaching the older generations walks again. With CPython's default, unpickling a
    worker's results cost 32 us per message against 4 with the collector off; a reconcile of
    20,000 messages ran 8,800-9,100 msg/s before this and 9,800-10,500 after. Reference counting
    still frees everything at once; only reference cycles wait longer.
    """
    previous = gc.get_threshold()
    gc.set_threshold(GC_GEN0, *previous[1:])
    try:
        yield
    finally:
        gc.set_threshold(*previous)


def _handle_in_groups(
    handler: MessageHandler,
    ref: FolderRef,
    steps: Iterator[tuple[str, Packed | None]],
    summary: ScanSummary,
    progress: Callable[[int], None] | None,
) -> None:
    """Handle files as :func:`handle_one` does, writing them to the store in groups.

    Each file is staged (moved, planned) in order and its write held back with the group's.
    A file whose handling reads what a held-back write would change is staged only after the
    group is written: one sharing a Message-ID with it (duplicates), one naming it in
    In-Reply-To/References (thread links), one not prepared (its ids are not known yet); and a
    file that creates a lead is written at once (the next ones must find the lead). So each
    file is handled as it would be one at a time.
    """
    group: list[tuple[str, SaveRequest | MessageRows, Staged | QuickStaged | RowsStaged]] = []
    ids: set[str] = set()

    def save(requested: list[SaveRequest | MessageRows]) -> Sequence[bool | Exception]:
        """The answers for the group's writes, in order: runs of rows and of requests, each
        run written together (the order of the writes is the order of the files). A request
        that rows can say is written as rows: the group is then usually one run."""
        items = [
            item if isinstance(item, MessageRows) else MessageRows.of(item) or item
            for item in requested
        ]
        answers: list[bool | Exception] = []
        start = 0
        while start < len(items):
            rows = isinstance(items[start], MessageRows)
            end = start + 1
            while end < len(items) and isinstance(items[end], MessageRows) == rows:
                end += 1
            run = items[start:end]
            try:
                if rows:
                    answers += handler.save_rows([i for i in run if isinstance(i, MessageRows)])
                else:
                    answers += handler.save_many([i for i in run if isinstance(i, SaveRequest)])
            except Exception as exc:  # each one's StoreError is reported: this is a bug
                answers += [exc] * len(run)
            start = end
        return answers

    def write() -> None:
        answers = save([item for _p, item, _s in group])
        for (path, _item, staged), answer in zip(group, answers, strict=True):
            if isinstance(answer, Exception):
                log.warning(
                    "account=%s file=%s not handled: %s",
                    ref.account.name,
                    os.path.basename(path),
                    answer,
                )
                summary.add_outcome(Outcome("error", ref.folder))
            elif isinstance(staged, Staged):
                summary.add_outcome(handler.complete(staged, answer))
            elif isinstance(staged[0], MessageRows):
                summary.add(handler.complete_rows(staged, answer, path))
            else:
                summary.add(handler.complete_packed(staged, answer, path))
        group.clear()
        ids.clear()

    def stage(
        path: str, packed: Packed | None
    ) -> Outcome | tuple[SaveRequest | MessageRows, Staged | QuickStaged | RowsStaged]:
        if packed is not None:
            quick = handler.stage_packed(ref.account, ref.folder, path, packed)
            if quick is not None:
                return quick[0], quick
        prepared = None if packed is None else unpack(packed)
        staged = handler.stage(ref.account, ref.folder, Path(path), prepared)
        return staged if isinstance(staged, Outcome) else (handler.request(staged), staged)

    for path, packed in steps:
        summary.seen += 1
        if group and (packed is None or packed[3] in ids or any(r in ids for r in packed[6])):
            write()
        done = _guarded(ref, path, lambda: stage(path, packed))  # noqa: B023 (called at once)
        if isinstance(done, Outcome):
            summary.add_outcome(done)
        else:
            item, staged = done
            group.append((path, item, staged))
            if isinstance(item, MessageRows):
                message_id, new_records = item.message_id, False
            else:
                message_id, new_records = item.info.message_id, bool(item.new_records)
            if message_id:
                ids.add(message_id)
            if new_records or len(group) >= _WRITE_GROUP:
                write()
        if progress is not None:
            progress(1)
    if group:
        write()


class Workers:
    """The processes helping a reconcile of large folders: one that prepares files (started on
    first use, or early by :meth:`start`; none on one CPU; watch/worker.py) and the read-ahead
    one."""

    def __init__(self, preparer: Preparer | None = None) -> None:
        self._worker: PrepareWorker | None = None
        self._readahead = ReadAhead()
        self.failed = False
        # Given to the worker process once, when it starts: jobs using it need not carry it.
        self._preparer = preparer

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop both processes (the worker is not waited for)."""
        self._readahead.close()
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def start(self) -> None:
        """Start both processes now, while the caller lists folders: the worker's start-up
        (an interpreter importing the watcher's modules, 0.2-0.3 s) then overlaps the listing."""
        if self._ready() is not None:
            self._readahead.start()

    def _ready(self) -> PrepareWorker | None:
        if self.failed:
            return None
        if self._worker is None:
            if len(os.sched_getaffinity(0)) < 2:
                self.failed = True  # one CPU: a second process would only take turns
                return None
            try:
                self._worker = PrepareWorker(self._preparer, GC_GEN0)
            except Exception as exc:  # cannot start the worker: work without it
                self._fail(exc)
                return None
        return self._worker

    def _fail(self, exc: Exception) -> None:
        if not self.failed:
            log.warning("preparing files in a worker process failed: %s", exc)
        self.failed = True
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def hint(self, paths: Sequence[str]) -> None:
        """Have ``paths`` read into the page cache ahead of their reader (a cold start)."""
        self._readahead.hint(paths)

    def submit(self, preparer: Preparer, ref: FolderRef, paths: Sequence[str]) -> int | None:
        """The number of the job preparing ``paths``, or None when there is no worker (the main
        process then prepares each file itself)."""
        worker = self._ready()
        if worker is None:
            return None
        try:
            # Strings: Path objects cost both processes more to send than the rest of the job.
            sent = None if preparer is self._preparer else preparer
            return worker.submit(sent, ref.account, ref.folder, paths)
        except WorkerGone as exc:
            self._fail(exc)
            return None

    def results(self, job: int | None, count: int) -> Sequence[Packed | None]:
        """The results of job ``job`` (taken in the order the jobs were submitted); Nones when
        there is none, or the worker failed it or is gone."""
        if job is None or self._worker is None:
            return [None] * count
        try:
            return self._worker.result(job)
        except WorkerGone as exc:  # the main process prepares the files
            self._fail(exc)
            return [None] * count


def _pipeline(
    workers: Workers | None,
    preparer: Preparer,
    ref: FolderRef,
    paths: Sequence[str],
    prime: Callable[[str, Iterable[str], Iterable[str]], None],
) -> Iterator[tuple[str, Packed | None]]:
    """``paths`` in order, each with what the worker prepared for it (None: not prepared;
    without ``workers``, nothing is).

    The worker runs a few chunks ahead of the file being handled, and the read-ahead process a
    few chunks ahead of the worker: with a cold cache each file costs disk reads (its inode,
    then its first block) that would otherwise stall whoever reads it first. ``prime`` gets
    each prepared chunk's candidate addresses and replied-to Message-IDs first: their records
    are looked up together.
    """
    if workers is None:
        yield from ((path, None) for path in paths)
        return
    chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    jobs: deque[int | None] = deque()
    warmed = submitted = 0
    for index, chunk in enumerate(chunks):
        while warmed < len(chunks) and warmed <= index + _WARM_AHEAD:
            workers.hint(chunks[warmed])
            warmed += 1
        while submitted < len(chunks) and submitted <= index + _PREPARE_AHEAD:
            jobs.append(workers.submit(preparer, ref, chunks[submitted]))
            submitted += 1
        results = workers.results(jobs.popleft(), len(chunk))
        # Generators: the store reads them only for what it has not loaded whole already.
        prime(
            ref.account.name,
            (e for p in results if p is not None for e in packed_candidates(p)),
            (r for p in results if p is not None for r in packed_thread_refs(p)),
        )
        yield from zip(chunk, results, strict=True)


def pending_by_folder(
    refs: Sequence[FolderRef],
    store: Store,
    known: KnownFiles,
    record_moves: bool = True,
    on_large: Callable[[], None] | None = None,
) -> dict[FolderRef, list[str]]:
    """New files per folder, listed up front (for a progress bar's length). ``on_large``: as
    for :func:`pending_files`, called at most once per folder."""
    return {ref: pending_files(store, ref, known, record_moves, on_large) for ref in refs}


def count_files(refs: Sequence[FolderRef]) -> int:
    """How many message files the folders hold (for a progress bar's length)."""
    return sum(
        sum(1 for _ in list_messages(r.account.maildir, r.folder)) for r in refs if r.path.is_dir()
    )
