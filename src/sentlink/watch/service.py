"""The running watcher: watchdog events as hints, a worker thread, and periodic rescans."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from sentlink.errors import SentlinkError
from sentlink.linker import Linker
from sentlink.maildir import ensure_folder, resolve_owner
from sentlink.store import Store
from sentlink.watch.scan import FolderRef, ScanSummary, link_one, needs_linking, scan_folders

log = logging.getLogger("sentlink.watch")

_STOP = object()


class _Hints(FileSystemEventHandler):
    """Turns created / moved-into events under ``new/`` and ``cur/`` into queue entries.

    Postfix virtual(8) and getmail deliver with link() (a created event in new/), dovecot-lda and
    most Python code with rename() from tmp/ (a moved event): both are handled; tmp/ is ignored.
    """

    def __init__(self, ref: FolderRef, sink: queue.Queue[object]) -> None:
        self._ref = ref
        self._sink = sink

    def _offer(self, raw: str | bytes) -> None:
        path = Path(raw.decode() if isinstance(raw, bytes) else raw)
        in_folder = path.parent.name in ("new", "cur") and path.parent.parent == self._ref.path
        if in_folder and not path.name.startswith("."):
            self._sink.put((self._ref, path))

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._offer(event.src_path)

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._offer(event.dest_path)


class FolderWatcher:
    """Links what lands in the watched folders, in one worker thread (the store's only writer)."""

    def __init__(
        self,
        refs: Sequence[FolderRef],
        store: Store,
        linker: Linker,
        rescan_seconds: float,
    ) -> None:
        self._refs = list(refs)
        self._store = store
        self._linker = linker
        self._rescan_seconds = rescan_seconds
        self._queue: queue.Queue[object] = queue.Queue()
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._worker: threading.Thread | None = None
        self._rescan_now = threading.Event()
        self.last_rescan: float | None = None
        self.last_summary: ScanSummary | None = None
        self.rescans = 0

    def prepare_folders(self) -> list[FolderRef]:
        """Create missing watched folders; a folder that cannot be made safe is left out."""
        ready = []
        for ref in self._refs:
            try:
                ensure_folder(ref.account.maildir, ref.folder, resolve_owner(ref.account.owner))
            except (SentlinkError, OSError) as exc:
                log.error("account=%s folder=%s not watched: %s", ref.account.name, ref.folder, exc)
                continue
            ready.append(ref)
        return ready

    def start(self) -> None:
        refs = self.prepare_folders()
        observer = Observer()
        for ref in refs:
            observer.schedule(_Hints(ref, self._queue), str(ref.path), recursive=True)
        observer.start()
        self._observer = observer
        self._refs = refs
        self._worker = threading.Thread(target=self._run, name="sentlink-watch", daemon=True)
        self._worker.start()

    def alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def request_rescan(self) -> None:
        self._rescan_now.set()
        self._queue.put(None)

    def stop(self, timeout: float = 10.0) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
            self._observer = None
        if self._worker is not None:
            self._queue.put(_STOP)
            self._worker.join(timeout)
            self._worker = None

    def _rescan(self) -> None:
        started = time.monotonic()
        try:
            summary = scan_folders(self._refs, self._store, self._linker)
        except Exception as exc:  # e.g. the store is down: retry next time
            log.error("rescan failed: %s", exc)
            return
        self.rescans += 1
        self.last_rescan = time.time()
        self.last_summary = summary
        log.info(
            "rescan: seen=%d linked=%d skipped=%d failed=%d in %.2fs",
            summary.seen,
            summary.linked,
            summary.skipped,
            summary.failed,
            time.monotonic() - started,
        )

    def _run(self) -> None:
        self._rescan()  # startup reconcile: whatever arrived while we were down
        deadline = time.monotonic() + self._rescan_seconds
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if self._rescan_now.is_set() or time.monotonic() >= deadline:
                self._rescan_now.clear()
                self._rescan()
                deadline = time.monotonic() + self._rescan_seconds
                continue
            if isinstance(item, tuple):
                self._link_hint(*item)

    def _link_hint(self, ref: FolderRef, path: Path) -> None:
        try:
            if needs_linking(self._store, ref, path):
                status = link_one(self._linker, ref, path)
                log.debug("account=%s file=%s %s", ref.account.name, path.name, status)
        except Exception as exc:  # the rescan retries; the watcher keeps running
            log.warning("account=%s file=%s not linked: %s", ref.account.name, path.name, exc)
