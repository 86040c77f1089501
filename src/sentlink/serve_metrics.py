"""What ``sentlink serve`` exports on ``metrics.listen``: samples from every running component."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sentlink.capture import Counters
from sentlink.config.checks import parse_host_port
from sentlink.config.models import Config
from sentlink.metrics import MetricsServer, Registry, Sample
from sentlink.store import Store

log = logging.getLogger("sentlink.metrics")


def capture_samples(counters: Counters) -> Iterable[Sample]:
    snapshot = counters.snapshot()
    yield Sample(
        "sentlink_captured_total", "counter", "Sent copies filed", counters.total("captured")
    )
    for (event, reason), n in sorted(snapshot.items()):
        if event == "skipped":
            yield Sample(
                "sentlink_capture_skipped_total",
                "counter",
                "Messages without a Sent copy, by reason",
                n,
                (("reason", reason),),
            )
        elif event == "failed":
            yield Sample(
                "sentlink_capture_failures_total",
                "counter",
                "Sent copies that could not be filed (mail still flowed), by reason",
                n,
                (("reason", reason),),
            )
    yield Sample(
        "sentlink_trace_removed_total",
        "counter",
        "Forged trace headers removed from inbound mail",
        counters.total("trace_removed"),
    )


def watcher_samples(watcher: Any) -> Iterable[Sample]:
    yield Sample("sentlink_rescans_total", "counter", "Folder rescans", watcher.rescans)
    yield Sample(
        "sentlink_inotify_overflows_total",
        "counter",
        "inotify queue overflows (events lost; a rescan followed)",
        getattr(watcher, "overflows", 0),
    )
    if watcher.last_rescan is not None:
        yield Sample(
            "sentlink_last_rescan_timestamp_seconds",
            "gauge",
            "When the last rescan ended (Unix time)",
            watcher.last_rescan,
        )
    for status, n in sorted(getattr(watcher, "handled", {}).items()):
        yield Sample(
            "sentlink_watch_messages_total",
            "counter",
            "Messages the watcher handled (linked, skipped, ambiguous, ...)",
            n,
            (("status", status),),
        )
    summary = watcher.last_summary
    if summary is not None:
        for status, n in sorted(summary.by_status.items()):
            yield Sample(
                "sentlink_last_rescan_files",
                "gauge",
                "Files the last rescan handled, by outcome",
                n,
                (("status", status),),
            )


def outbox_samples(store: Store, results: dict[tuple[str, str], int]) -> Iterable[Sample]:
    now = time.time()
    depth: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for row in store.outbox_rows(["pending"]):
        depth[row["hook"]] = depth.get(row["hook"], 0) + 1
        created = datetime.fromisoformat(row["created"]).timestamp()
        oldest[row["hook"]] = min(oldest.get(row["hook"], created), created)
    for hook, n in sorted(depth.items()):
        yield Sample(
            "sentlink_outbox_pending", "gauge", "Events waiting for a hook", n, (("hook", hook),)
        )
        yield Sample(
            "sentlink_outbox_oldest_age_seconds",
            "gauge",
            "Age of the oldest event waiting for a hook",
            max(0.0, now - oldest[hook]),
            (("hook", hook),),
        )
    for hook in sorted(store.disabled_hooks()):
        yield Sample(
            "sentlink_hook_disabled",
            "gauge",
            "Hooks a receiver disabled (410)",
            1,
            (("hook", hook),),
        )
    for (hook, outcome), n in sorted(results.items()):
        yield Sample(
            "sentlink_hook_deliveries_total",
            "counter",
            "Hook delivery attempts, by result",
            n,
            (("hook", hook), ("result", outcome)),
        )


def _watcher_of(component: Any) -> Iterable[Sample]:
    return watcher_samples(component.watcher)


def _outbox_of(component: Any, store: Store) -> Iterable[Sample]:
    return outbox_samples(store, component.results())


def up_samples(components: Sequence[Any]) -> Iterable[Sample]:
    for c in components:
        yield Sample(
            "sentlink_up",
            "gauge",
            "Components running",
            1 if c.alive() else 0,
            (("component", c.name),),
        )


class MetricsComponent:
    """``/metrics``, ``/healthy`` and ``/ready`` for the other components of this process."""

    name = "metrics"

    def __init__(
        self, config: Config, store: Store, counters: Counters, components: Sequence[Any]
    ) -> None:
        assert config.metrics is not None
        where = parse_host_port(config.metrics.listen)
        assert where is not None  # validated with the configuration
        others = [c for c in components if c is not self]
        registry = Registry()
        registry.add_source(lambda: capture_samples(counters))
        registry.add_histograms(lambda: list(counters.timings.values()))
        registry.add_source(lambda: up_samples(others))
        for c in others:
            if c.name == "watcher":
                registry.add_source(functools.partial(_watcher_of, c))
            if c.name == "outbox":
                registry.add_source(functools.partial(_outbox_of, c, store))
        self._listen = config.metrics.listen
        self._server = MetricsServer(
            where[0], where[1], registry, lambda: all(c.alive() for c in others)
        )

    @property
    def port(self) -> int:
        return self._server.port

    def start(self) -> None:
        self._server.start()
        log.info("metrics on http://%s/metrics", self._listen)

    def alive(self) -> bool:
        return self._server.alive()

    def reload(self, config: Config) -> None:
        pass  # metrics.listen changes take effect after a restart

    def stop(self, timeout: float) -> None:
        self._server.stop(timeout)
