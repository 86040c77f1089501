"""``sentlink serve``: run the configured components; SIGHUP reloads, SIGTERM/SIGINT stop.

Each component is a small object with ``start``, ``stop``, ``alive`` and ``reload``. A reload
(SIGHUP) loads and validates the file again; a bad file is refused and the old configuration
stays in force (logged). A good one is handed to each component, which applies what it can
without dropping connections: the milter swaps the collaborators new SMTP sessions get, the
watcher restarts over the new folder list (the Maildir is the queue, so nothing is lost).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Protocol

from sentlink import sysexits
from sentlink.capture import Counters
from sentlink.config.models import Config
from sentlink.errors import ConfigError, SentlinkError
from sentlink.linker import Linker
from sentlink.sdnotify import Notifier
from sentlink.secret import load_or_create_secret
from sentlink.store import Store, open_store
from sentlink.watch import FolderWatcher, WatchPolicy, watched_folders

log = logging.getLogger("sentlink.serve")

# How long SIGTERM waits for in-flight work (an SMTP session's copy, a link) before exiting.
STOP_TIMEOUT = 20.0
# How often serve refreshes its status file for `sentlink status`.
STATUS_INTERVAL = 5.0


class Component(Protocol):
    name: str

    def start(self) -> None: ...

    def alive(self) -> bool: ...

    def reload(self, config: Config) -> None: ...

    def stop(self, timeout: float) -> None: ...


class MilterComponent:
    """libmilter's main loop in a thread, so the main thread keeps Python's signal handling."""

    name = "milter"

    def __init__(self, config: Config, secret: bytes, counters: Counters) -> None:
        from sentlink.milter.session import DepsHolder

        self._config = config
        self._secret = secret
        self._counters = counters
        self._stop = threading.Event()
        self._holder = DepsHolder()
        self._thread = threading.Thread(target=self._run, name="sentlink-milter", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        from sentlink.milter.runner import run_milter

        try:
            run_milter(
                self._config,
                self._stop,
                counters=self._counters,
                secret=self._secret,
                holder=self._holder,
            )
        except BaseException as exc:  # reported to the main thread
            self.error = exc
            log.error("milter failed: %s", exc)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def reload(self, config: Config) -> None:
        from sentlink.accounts import Accounts
        from sentlink.milter.session import deps_from_config

        if config.milter is None:
            log.warning("reload: the milter: section was removed; restart to stop the milter")
            return
        old = self._config.milter
        if old is not None and config.milter.listen != old.listen:
            log.warning("reload: milter.listen changed; it takes effect after a restart")
        try:
            current = self._holder.current
        except RuntimeError:
            log.warning("reload: the milter is not running; nothing to apply")
            return
        self._holder.replace(
            deps_from_config(
                config.milter,
                accounts=Accounts(config.accounts),
                writer=current.writer,
                secret=current.secret,
                counters=self._counters,
            )
        )
        self._config = config

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)


class WatcherComponent:
    """The Sent-folder watcher; a reload restarts it over the new accounts."""

    name = "watcher"

    def __init__(self, config: Config, store: Store, secret: bytes | None = None) -> None:
        self._store = store
        self._secret = secret
        self._watcher = self._build(config)

    def _build(self, config: Config) -> FolderWatcher:
        return FolderWatcher(
            watched_folders(config),
            self._store,
            Linker(self._store, config),
            config.watch.rescan_seconds,
            WatchPolicy.from_config(config, self._secret),
        )

    @property
    def watcher(self) -> FolderWatcher:
        return self._watcher

    def start(self) -> None:
        self._watcher.start()

    def alive(self) -> bool:
        return self._watcher.alive()

    def reload(self, config: Config) -> None:
        self._watcher.stop()
        self._watcher = self._build(config)
        self._watcher.start()

    def stop(self, timeout: float) -> None:
        self._watcher.stop(timeout)


def build_components(
    config: Config,
    store: Store,
    secret: bytes,
    counters: Counters,
    *,
    with_milter: bool,
    with_watcher: bool,
    with_proxy: bool = True,
    with_outbox: bool = True,
    config_path: Path | None = None,
) -> list[Component]:
    """Every component this configuration asks for, in start order.

    With a capture entrance in this process and the configuration file at hand, the watcher
    runs as a child process at a lower priority (see sentlink.watch_process).
    """
    components: list[Component] = []
    if with_outbox and config.hooks:
        from sentlink.outbox import OutboxComponent

        components.append(OutboxComponent(config, store))
    capturing = (with_milter and config.milter is not None) or (
        with_proxy and config.proxy is not None
    )
    if with_watcher and capturing and config_path is not None:
        from sentlink.watch_process import WatcherProcessComponent

        components.append(WatcherProcessComponent(config_path, config))
    elif with_watcher:
        components.append(WatcherComponent(config, store, secret))
    if with_milter and config.milter is not None:
        components.append(MilterComponent(config, secret, counters))
    if with_proxy and config.proxy is not None:
        from sentlink.proxy.component import ProxyComponent

        components.append(ProxyComponent(config, secret, counters))
    return components


def serve(
    config: Config,
    with_milter: bool = True,
    with_watcher: bool = True,
    reload_config: Callable[[], Config] | None = None,
    with_proxy: bool = True,
    with_outbox: bool = True,
    config_path: Path | None = None,
    status_file: Path | None = None,
    with_metrics: bool = True,
) -> int:
    """Run until SIGTERM/SIGINT; returns a sysexits code. ``reload_config`` serves SIGHUP.

    ``config_path`` lets the watcher run as a child process; ``status_file`` overrides where the
    state for ``sentlink status`` goes (the watcher child writes its own).
    """
    try:
        secret = load_or_create_secret(config.site_secret_file)
        store = open_store(config.store.url)
    except (SentlinkError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return sysexits.TEMPFAIL if isinstance(exc, OSError) else sysexits.CONFIG
    stopping = threading.Event()
    reloading = threading.Event()
    wake = threading.Event()

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stopping.set()
        wake.set()

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        reloading.set()
        wake.set()

    handlers = {signal.SIGTERM: on_stop, signal.SIGINT: on_stop, signal.SIGHUP: on_hup}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    notifier = Notifier(os.environ)
    counters = Counters()
    try:
        components = build_components(
            config,
            store,
            secret,
            counters,
            with_milter=with_milter,
            with_watcher=with_watcher,
            with_proxy=with_proxy,
            with_outbox=with_outbox,
            config_path=config_path,
        )
        if with_metrics and config.metrics is not None:
            from sentlink.serve_metrics import MetricsComponent

            components.append(MetricsComponent(config, store, counters, components))
    except (ConfigError, OSError) as exc:
        problems = exc.problems if isinstance(exc, ConfigError) else [f"metrics: {exc}"]
        for problem in problems:
            log.error("cannot start: %s", problem)
        store.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        return sysexits.CONFIG
    code = sysexits.OK
    try:
        for component in components:
            component.start()
        names = ",".join(c.name for c in components) or "nothing"
        log.info("serving: %s; accounts=%d", names, len(config.accounts))
        notifier.ready(f"serving {names}")
        tick = min(1.0, notifier.watchdog_interval or 1.0)
        next_ping = time.monotonic()
        started, next_status = time.time(), 0.0
        while not stopping.is_set():
            if time.monotonic() >= next_status:
                publish_status(status_file or config.status_file, components, counters, started)
                next_status = time.monotonic() + STATUS_INTERVAL
            wake.wait(tick)
            wake.clear()
            if notifier.watchdog_interval and time.monotonic() >= next_ping:
                notifier.watchdog()
                next_ping = time.monotonic() + notifier.watchdog_interval
            if reloading.is_set():
                reloading.clear()
                config = reload(config, components, reload_config, notifier)
            dead = [c for c in components if not c.alive()]
            if dead and not stopping.is_set():
                log.error("%s stopped unexpectedly", ", ".join(c.name for c in dead))
                code = sysexits.SOFTWARE
                break
    finally:
        notifier.stopping()
        for component in reversed(components):
            component.stop(STOP_TIMEOUT)
        store.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def publish_status(
    path: Path, components: list[Component], counters: Counters, started: float
) -> None:
    from sentlink.status import serve_state, write_state

    try:
        write_state(path, serve_state(components, counters, started))
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)


def reload(
    config: Config,
    components: list[Component],
    reload_config: Callable[[], Config] | None,
    notifier: Notifier,
) -> Config:
    """Apply a new configuration, or keep the old one when the new file is invalid."""
    if reload_config is None:
        log.warning("SIGHUP: no configuration file to reload")
        return config
    notifier.reloading()
    try:
        new = reload_config()
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused: %s", problem)
        log.error("SIGHUP: the new configuration is invalid; keeping the running one")
        notifier.ready()
        return config
    except OSError as exc:
        log.error("SIGHUP: cannot read the configuration (%s); keeping the running one", exc)
        notifier.ready()
        return config
    if new.store != config.store or new.site_secret_file != config.site_secret_file:
        log.warning("reload: store and site_secret_file changes take effect after a restart")
    for component in components:
        component.reload(new)
    log.info("SIGHUP: configuration reloaded; accounts=%d", len(new.accounts))
    notifier.ready()
    return new
