"""``sentlink serve``: start the configured components, stop them cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from sentlink import sysexits
from sentlink.capture import Counters
from sentlink.config.models import Config
from sentlink.errors import SentlinkError
from sentlink.linker import Linker
from sentlink.secret import load_or_create_secret
from sentlink.store import open_store
from sentlink.watch import FolderWatcher, sent_folders

log = logging.getLogger("sentlink.serve")


class MilterThread:
    """libmilter's main loop in a thread, so the main thread keeps Python's signal handling."""

    def __init__(self, config: Config, secret: bytes, counters: Counters) -> None:
        self._config = config
        self._secret = secret
        self._counters = counters
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sentlink-milter", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        from sentlink.milter.runner import run_milter

        try:
            run_milter(self._config, self._stop, counters=self._counters, secret=self._secret)
        except BaseException as exc:  # reported to the main thread
            self.error = exc
            log.error("milter failed: %s", exc)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


def serve(config: Config, with_milter: bool = True, with_watcher: bool = True) -> int:
    """Run until a signal; returns a sysexits code."""
    try:
        secret = load_or_create_secret(config.site_secret_file)
        store = open_store(config.store.url)
    except (SentlinkError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return sysexits.TEMPFAIL if isinstance(exc, OSError) else sysexits.CONFIG
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    counters = Counters()
    watcher: FolderWatcher | None = None
    milter_thread: MilterThread | None = None
    code = sysexits.OK
    try:
        if with_watcher:
            watcher = FolderWatcher(
                sent_folders(config.accounts),
                store,
                Linker(store, config),
                config.watch.rescan_seconds,
            )
            watcher.start()
        if with_milter and config.milter is not None:
            milter_thread = MilterThread(config, secret, counters)
            milter_thread.start()
        log.info(
            "serving: milter=%s watcher=%s accounts=%d",
            "on" if milter_thread else "off",
            "on" if watcher else "off",
            len(config.accounts),
        )
        while not stopping.wait(0.5):
            if milter_thread is not None and not milter_thread.alive():
                log.error("milter stopped unexpectedly: %s", milter_thread.error)
                code = sysexits.SOFTWARE if milter_thread.error is None else sysexits.TEMPFAIL
                break
    finally:
        if milter_thread is not None:
            milter_thread.stop()
        if watcher is not None:
            watcher.stop()
        store.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
