"""The metrics endpoint over a real loopback socket: exposition format, health and readiness."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterable

from sentlink.metrics import MetricsServer, Registry, Sample


def get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_metrics_health_and_readiness_are_served_on_loopback() -> None:
    registry = Registry()
    counts = {"captured": 3}

    def source() -> Iterable[Sample]:
        yield Sample("sentlink_captured_total", "counter", "Sent copies filed", counts["captured"])
        yield Sample(
            "sentlink_capture_failures_total", "counter", "Failures", 2, (("reason", 'dis"k'),)
        )

    registry.add_source(source)
    latency = registry.histogram("sentlink_milter_eom_seconds", "Time in eom")
    latency.observe(0.003)
    latency.observe(0.2)
    latency.observe(99)
    ready = {"ok": False}
    server = MetricsServer("127.0.0.1", 0, registry, lambda: ready["ok"])
    server.start()
    try:
        status, ctype, body = get(server.port, "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        lines = body.splitlines()
        assert "# TYPE sentlink_captured_total counter" in lines
        assert "sentlink_captured_total 3" in lines
        assert 'sentlink_capture_failures_total{reason="dis\\"k"} 2' in lines
        assert 'sentlink_milter_eom_seconds_bucket{le="0.005"} 1' in lines
        assert 'sentlink_milter_eom_seconds_bucket{le="0.25"} 2' in lines
        assert 'sentlink_milter_eom_seconds_bucket{le="+Inf"} 3' in lines
        assert "sentlink_milter_eom_seconds_count 3" in lines
        counts["captured"] = 4
        assert "sentlink_captured_total 4" in get(server.port, "/metrics")[2].splitlines()
        assert get(server.port, "/healthy")[0] == 200
        assert get(server.port, "/ready")[0] == 503
        ready["ok"] = True
        assert get(server.port, "/ready")[0] == 200
        assert get(server.port, "/nope")[0] == 404
    finally:
        server.stop()


def test_a_failing_source_does_not_hide_the_others() -> None:
    registry = Registry()

    def broken() -> Iterable[Sample]:
        raise RuntimeError("store down")

    registry.add_source(broken)
    registry.add_source(lambda: [Sample("sentlink_up", "gauge", "Up", 1)])
    assert "sentlink_up 1" in registry.render().splitlines()
