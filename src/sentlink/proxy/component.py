"""The proxy as a ``sentlink serve`` component: its event loop in a thread of its own."""

from __future__ import annotations

import logging
import threading

from sentlink.capture import Counters
from sentlink.config.models import Config
from sentlink.proxy.server import Reloads

log = logging.getLogger("sentlink.proxy")


class ProxyComponent:
    name = "proxy"

    def __init__(self, config: Config, secret: bytes, counters: Counters) -> None:
        self._config = config
        self._secret = secret
        self._counters = counters
        self._stop = threading.Event()
        self._reloads = Reloads()
        self._thread = threading.Thread(target=self._run, name="sentlink-proxy", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        from sentlink.proxy.server import run_proxy

        try:
            run_proxy(
                self._config,
                self._stop,
                secret=self._secret,
                counters=self._counters,
                reloads=self._reloads,
            )
        except BaseException as exc:  # reported through alive() to the main thread
            self.error = exc
            log.error("proxy failed: %s", exc)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def reload(self, config: Config) -> None:
        if config.proxy is None:
            log.warning("reload: the proxy: section was removed; restart to stop the proxy")
            return
        self._reloads.put(config)

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)
