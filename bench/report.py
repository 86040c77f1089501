"""Medians, ratios against named baselines, goals, and the printed table."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchlab import (
    ALONE,
    CAPTURE,
    CLASSIC,
    CONFIGS,
    NOOP,
    RECEIVE,
    RECEIVE_WRITE,
    SENTLINK,
    SENTLINK_TCP,
)
from rss import RssResult
from throughput import RunResult

LOAD_GROUP = "load"  # smtp-source and smtp-sink: the test rig, not the server

LABELS = {
    ALONE: "Postfix alone",
    NOOP: "no-op milter (unix)",
    RECEIVE: "receive milter (unix)",
    RECEIVE_WRITE: "receive+write milter",
    SENTLINK: "sentlink serve (unix)",
    SENTLINK_TCP: "sentlink serve (tcp)",
    CAPTURE: "sentlink milter, no link",
    CLASSIC: "classic bcc+dovecot-lda",
}


def server_cpu(run: RunResult) -> float:
    return sum(v for k, v in run.cpu.items() if k != LOAD_GROUP)


def _per_msg_ms(seconds_per_msg: Sequence[float]) -> float:
    return 1000 * statistics.median(seconds_per_msg)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass
class ConfigSummary:
    config: str
    runs: int
    accepted_per_s: float
    e2e_per_s: float
    filed_per_s: float | None
    server_cpu_ms_per_msg: float
    extra_cpu_ms_per_msg: float | None  # over Postfix alone in the same round
    cpu_ms_per_msg_by_group: dict[str, float]


def summarize(runs: Sequence[RunResult]) -> dict[str, ConfigSummary]:
    by_config: dict[str, list[RunResult]] = {}
    for run in runs:
        by_config.setdefault(run.config, []).append(run)
    alone_by_round = {r.round: r for r in by_config.get(ALONE, [])}
    out: dict[str, ConfigSummary] = {}
    for config, group in by_config.items():
        extra = [
            (server_cpu(r) - server_cpu(alone_by_round[r.round])) / r.messages
            for r in group
            if r.round in alone_by_round
        ]
        groups = sorted({g for r in group for g in r.cpu})
        by_group = {
            g: 1000 * (_median([r.cpu.get(g, 0.0) / r.messages for r in group]) or 0.0)
            for g in groups
        }
        out[config] = ConfigSummary(
            config=config,
            runs=len(group),
            accepted_per_s=statistics.median(r.accepted_rate for r in group),
            e2e_per_s=statistics.median(r.e2e_rate for r in group),
            filed_per_s=_median([r.filed_rate for r in group]),
            server_cpu_ms_per_msg=_per_msg_ms([server_cpu(r) / r.messages for r in group]),
            extra_cpu_ms_per_msg=None if not extra else 1000 * statistics.median(extra),
            cpu_ms_per_msg_by_group=by_group,
        )
    return out


@dataclass
class Ratio:
    name: str
    value: float | None
    goal: str | None  # e.g. ">= 0.9"; None: for information
    met: bool | None


def _ratio(
    name: str,
    a: float | None,
    b: float | None,
    goal: tuple[str, float] | None = None,
) -> Ratio:
    value = None if a is None or b is None or b == 0 else a / b
    if goal is None or value is None:
        return Ratio(name, value, None if goal is None else f"{goal[0]} {goal[1]:.3g}", None)
    op, limit = goal
    met = value >= limit if op == ">=" else value <= limit
    return Ratio(name, value, f"{op} {limit:.3g}", met)


def ratios(summary: dict[str, ConfigSummary]) -> list[Ratio]:
    def get(config: str, pick: Callable[[ConfigSummary], float | None]) -> float | None:
        return pick(summary[config]) if config in summary else None

    def accepted(s: ConfigSummary) -> float:
        return s.accepted_per_s

    def e2e(s: ConfigSummary) -> float:
        return s.e2e_per_s

    def extra_cpu(s: ConfigSummary) -> float | None:
        return s.extra_cpu_ms_per_msg

    out = [
        _ratio(
            "sentlink/no-op milter, accepted msgs/s",
            get(SENTLINK, accepted),
            get(NOOP, accepted),
            (">=", 0.9),
        ),
        _ratio(
            "sentlink/Postfix alone, end-to-end msgs/s",
            get(SENTLINK, e2e),
            get(ALONE, e2e),
            (">=", 0.8),
        ),
        _ratio("no-op milter/Postfix alone, accepted", get(NOOP, accepted), get(ALONE, accepted)),
        # The ceiling for any pymilter capture: sentlink's callbacks alone, then with the
        # minimal durable write; the last row is the share of the gap that is sentlink's logic.
        _ratio("receive/no-op milter, accepted", get(RECEIVE, accepted), get(NOOP, accepted)),
        _ratio(
            "receive+write/no-op milter, accepted",
            get(RECEIVE_WRITE, accepted),
            get(NOOP, accepted),
        ),
        _ratio("receive/Postfix alone, end-to-end", get(RECEIVE, e2e), get(ALONE, e2e)),
        _ratio(
            "receive+write/Postfix alone, end-to-end",
            get(RECEIVE_WRITE, e2e),
            get(ALONE, e2e),
        ),
        _ratio(
            "sentlink/receive+write, accepted",
            get(SENTLINK, accepted),
            get(RECEIVE_WRITE, accepted),
        ),
        _ratio("sentlink/Postfix alone, accepted", get(SENTLINK, accepted), get(ALONE, accepted)),
        _ratio("sentlink tcp/unix, accepted", get(SENTLINK_TCP, accepted), get(SENTLINK, accepted)),
        _ratio("sentlink tcp/unix, end-to-end", get(SENTLINK_TCP, e2e), get(SENTLINK, e2e)),
        _ratio(
            "capture only (no linking)/no-op milter, accepted",
            get(CAPTURE, accepted),
            get(NOOP, accepted),
        ),
        # Copies in place: classic = queue empty and every copy in Sent; sentlink = every copy
        # in Sent AND linked AND queue empty (it also does the linking the classic path lacks).
        _ratio(
            "capture/classic, Sent copies per s (end to end)",
            get(SENTLINK, e2e),
            get(CLASSIC, e2e),
            (">=", 2.0),
        ),
        _ratio(
            "capture/classic, CPU per copy (over Postfix alone)",
            get(SENTLINK, extra_cpu),
            get(CLASSIC, extra_cpu),
            ("<=", 1 / 3),
        ),
    ]
    return [r for r in out if r.value is not None]


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def render(
    summary: dict[str, ConfigSummary],
    ratio_rows: Sequence[Ratio],
    rss: RssResult | None,
    meta: dict[str, object],
) -> str:
    lines: list[str] = []
    if summary:
        lines.append(
            f"Throughput: smtp-source {meta['messages']} x {meta['size']} B, "
            f"{meta['sessions']} sessions; median of {meta['rounds']} alternated rounds; "
            f"CPU from {meta['cpu_method']}"
        )
        head = (
            f"{'configuration':<26}{'accepted/s':>11}{'end-to-end/s':>14}"
            f"{'server CPU':>12}{'extra CPU':>11}"
        )
        lines.append(head)
        lines.append(f"{'':<26}{'':>11}{'':>14}{'ms/msg':>12}{'ms/msg':>11}")
        for config in CONFIGS:
            s = summary.get(config)
            if s is None:
                continue
            extra = "baseline" if config == ALONE else _fmt(s.extra_cpu_ms_per_msg, ".2f")
            lines.append(
                f"{LABELS[config]:<26}{s.accepted_per_s:>11.1f}{s.e2e_per_s:>14.1f}"
                f"{s.server_cpu_ms_per_msg:>12.2f}{extra:>11}"
            )
        lines.append("")
        lines.append("CPU ms per message by component (median):")
        for config in CONFIGS:
            s = summary.get(config)
            if s is None:
                continue
            parts = ", ".join(
                f"{g} {v:.2f}" for g, v in s.cpu_ms_per_msg_by_group.items() if v >= 0.005
            )
            lines.append(f"  {LABELS[config]:<26}{parts}")
        lines.append("")
    if ratio_rows:
        lines.append(f"{'ratio':<52}{'value':>8}  {'goal':<8}{'met':>4}")
        for r in ratio_rows:
            met = "-" if r.met is None else ("yes" if r.met else "NO")
            lines.append(f"{r.name:<52}{_fmt(r.value, '.2f'):>8}  {r.goal or '':<8}{met:>4}")
        lines.append("")
    if rss is not None:
        met = "yes" if rss.growth_mb <= 10 else "NO"
        lines.append(
            f"Peak RSS, one {rss.message_bytes / 1048576:.0f} MB message through sentlink serve: "
            f"idle VmRSS {rss.idle_rss_mb:.1f} MB, peak VmHWM {rss.peak_hwm_mb:.1f} MB, "
            f"growth {rss.growth_mb:.1f} MB (goal <= 10 MB: {met}); "
            f"filed and linked in {rss.seconds:.1f} s"
        )
    return "\n".join(lines) + "\n"
