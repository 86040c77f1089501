"""Prometheus metrics and health endpoints: ``/metrics``, ``/healthy``, ``/ready``.

The text exposition format (version 0.0.4) is small enough to write here, which keeps the core
free of a metrics library and of its process-global registry. Components keep their own plain
counters; a *source* turns them into samples at scrape time.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Sample:
    name: str
    kind: str  # counter | gauge
    help: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


class Histogram:
    """A thread-safe Prometheus histogram (cumulative buckets, sum, count)."""

    def __init__(self, name: str, help: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.name = name
        self.help = help
        self._bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self._bounds, value)
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def render(self) -> list[str]:
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip((*self._bounds, math.inf), counts, strict=True):
            running += n
            le = "+Inf" if bound == math.inf else repr(bound)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        lines.append(f"{self.name}_sum {total!r}")
        lines.append(f"{self.name}_count {running}")
        return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass
class Registry:
    """Where serve's components register what they can report."""

    sources: list[Callable[[], Iterable[Sample]]] = field(default_factory=list)
    histograms: list[Histogram] = field(default_factory=list)
    histogram_sources: list[Callable[[], Iterable[Histogram]]] = field(default_factory=list)

    def add_source(self, source: Callable[[], Iterable[Sample]]) -> None:
        self.sources.append(source)

    def add_histograms(self, source: Callable[[], Iterable[Histogram]]) -> None:
        """Histograms that appear while running (created on first observation)."""
        self.histogram_sources.append(source)

    def histogram(self, name: str, help: str) -> Histogram:
        h = Histogram(name, help)
        self.histograms.append(h)
        return h

    def render(self) -> str:
        by_name: dict[str, list[Sample]] = {}
        for source in self.sources:
            try:
                for sample in source():
                    by_name.setdefault(sample.name, []).append(sample)
            except Exception as exc:  # one broken source must not hide the others
                log.warning("metrics source failed: %s", exc)
        lines: list[str] = []
        for name, samples in sorted(by_name.items()):
            lines.append(f"# HELP {name} {samples[0].help}")
            lines.append(f"# TYPE {name} {samples[0].kind}")
            for s in samples:
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels)
                lines.append(
                    f"{name}{{{labels}}} {_number(s.value)}"
                    if labels
                    else f"{name} {_number(s.value)}"
                )
        histograms = list(self.histograms)
        for hsource in self.histogram_sources:
            histograms.extend(hsource())
        for h in sorted(histograms, key=lambda h: h.name):
            lines.extend(h.render())
        return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves the registry over HTTP in a thread. ``ready`` decides ``/ready``'s answer."""

    def __init__(self, host: str, port: int, registry: Registry, ready: Callable[[], bool]) -> None:
        self._registry = registry
        self._ready = ready
        handler = self._handler()
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sentlink-metrics", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self._registry
        ready = self._ready

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, registry.render(), "text/plain; version=0.0.4; charset=utf-8")
                elif path == "/healthy":
                    self._send(200, "ok\n")
                elif path == "/ready":
                    ok = ready()
                    self._send(200 if ok else 503, "ready\n" if ok else "not ready\n")
                else:
                    self._send(404, "not found\n")

            def _send(self, code: int, body: str, ctype: str = "text/plain; charset=utf-8") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("metrics: " + format, *args)

        return Handler

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)
