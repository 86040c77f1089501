"""Benchmarks of the SMTP proxy (issue 3), printing ratios against named baselines and ceilings.

1. Content filter: messages/s through Postfix with ``content_filter = sentlink:...`` vs the same
   Postfix without it (one lab, separate listeners, alternated rounds): smtp-source, 10 KB
   messages, 10 sessions; the clock stops when the relay sink has every message. Goal >= 0.7.
   Ceiling, in the same rounds: a third listener whose content filter is Postfix's own smtp
   client straight to the re-injection smtpd (``noopfilter``, no filter process): Postfix
   handling every message twice, the limit for any after-queue content filter.
2. Submission relay: smtp-source through the proxy to smtp-sink vs straight to smtp-sink (goal
   >= 0.8), and the latency the proxy adds per message (sequential smtplib, p50/p99). Ceiling,
   in the same rounds: the same load to ``bench/noop_smtpd.py`` (aiosmtpd, DATA read many lines
   at a time and thrown away, 250, the proxy's event loop): what any aiosmtpd-based proxy
   costs just to receive; via proxy / no-op aiosmtpd says how close the proxy is to it.
   CPU per message (utime + stime from /proc/PID/stat around each timed load, over its
   messages): the sentlink proxy in both modes and the no-op aiosmtpd server.
3. Peak RSS of ``sentlink proxy`` while one 50 MB message passes (goal <= idle + 10 MB).

The proxy runs from this tree's ``src`` (PYTHONPATH), whatever sentlink the venv has installed.

Usage: ``.venv/bin/python bench/proxy.py [--messages N] [--rounds N] [--only PART]`` (root:
real Postfix).
"""

from __future__ import annotations

import argparse
import os
import signal
import smtplib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "tests"))

from lab import (  # noqa: E402
    LOOPBACK,
    MailLab,
    SmtpSink,
    build_message,
    find_binary,
    free_port,
    is_listening,
    make_lab_dir,
    wait_for,
)

ALICE = "alice@example.test"
OUTSIDE = "dave@remote.test"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proxy_yaml(workdir: Path, maildir: Path, port: int, extra: str) -> Path:
    path = workdir / "sentlink.yaml"
    path.write_text(
        f"""\
site_secret_file: {workdir}/site.secret
store: {{url: "sqlite:///{workdir}/sentlink.db"}}
accounts:
  - {{name: alice, addresses: [{ALICE}], maildir: {maildir}, owner: "5000:5000"}}
log: {{level: warning}}
proxy:
  listen: "{LOOPBACK}:{port}"
  internal_hosts: [127.0.0.0/8]
{extra}"""
    )
    return path


class Server:
    """A server process of ours in a session of its own, ready once it listens on ``port``."""

    def __init__(self, argv: list[str], port: int, what: str, cwd: Path | None = None) -> None:
        self.port = port
        env = {**os.environ, "PYTHONPATH": str(PROJECT / "src")}
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, start_new_session=True)
        wait_for(lambda: is_listening(port), 20.0, what=what)

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # kB
        raise KeyError(field)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (all its threads)."""
        raw = Path(f"/proc/{self.proc.pid}/stat").read_text()
        # proc(5): utime and stime are fields 14 and 15; the name (field 2) may hold spaces.
        fields = raw[raw.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def start_proxy(config: Path, port: int) -> Server:
    argv = [sys.executable, "-m", "sentlink", "-c", str(config), "proxy"]
    return Server(argv, port, "sentlink proxy", cwd=config.parent)


def start_noop_smtpd() -> Server:
    port = free_port()
    argv = [sys.executable, str(PROJECT / "bench" / "noop_smtpd.py"), f"{LOOPBACK}:{port}"]
    return Server(argv, port, "no-op aiosmtpd server")


@dataclass
class Rounds:
    """Per configuration, the messages/s of every timed load and, where a server of ours is
    watched, its CPU seconds per message."""

    messages: int
    rates: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def measure(self, name: str, load: Callable[[], None], server: Server | None = None) -> None:
        cpu_before = server.cpu_seconds() if server is not None else 0.0
        start = time.monotonic()
        load()
        elapsed = time.monotonic() - start
        self.rates.setdefault(name, []).append(self.messages / elapsed)
        if server is not None:
            used = server.cpu_seconds() - cpu_before
            self.cpu.setdefault(name, []).append(used / self.messages)

    def rate(self, name: str) -> float:
        return statistics.median(self.rates[name])

    def cpu_ms(self, name: str) -> float:
        return 1000 * statistics.median(self.cpu[name])


def smtp_source(port: int, count: int) -> None:
    argv = [
        find_binary("smtp-source") or "smtp-source",
        "-c", "-m", str(count), "-s", "10", "-l", "10240",
        "-f", ALICE, "-t", OUTSIDE, f"{LOOPBACK}:{port}",
    ]  # fmt: skip
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def relayed_count(sink_dir: Path) -> int:
    return sum(1 for _ in sink_dir.iterdir()) if sink_dir.exists() else 0


def content_filter(root: Path, messages: int, rounds: int) -> None:
    proxy_port, reinject_port = free_port(), free_port()
    filtered_port, twice_port, twice_reinject_port = free_port(), free_port(), free_port()
    reinject_options = (
        "  -o content_filter=\n  -o receive_override_options=no_address_mappings,no_milters\n"
    )
    # noopfilter: the same smtp transport as sentlink's, pointed straight at a re-injection
    # smtpd like sentlink's. That smtpd is its own service: the proxy keeps idle connections
    # to its re-injection smtpd (up to the process limit) until smtpd_timeout ends them, which
    # would leave noopfilter waiting.
    master = f"""\
sentlink   unix  -       -       n       -       10      smtp
noopfilter unix  -       -       n       -       10      smtp
{LOOPBACK}:{reinject_port} inet n - n - 10 smtpd
{reinject_options}{LOOPBACK}:{twice_reinject_port} inet n - n - 10 smtpd
{reinject_options}{LOOPBACK}:{filtered_port} inet n - n - - smtpd
  -o content_filter=sentlink:[{LOOPBACK}]:{proxy_port}
{LOOPBACK}:{twice_port} inet n - n - - smtpd
  -o content_filter=noopfilter:[{LOOPBACK}]:{twice_reinject_port}
"""
    lab = MailLab(make_lab_dir(root), sasl=False, dovecot_enabled=False, extra_master_cf=master)
    workdir = make_lab_dir(root, prefix="proxy-")
    config = proxy_yaml(
        workdir,
        lab.postfix.mailbox("alice"),
        proxy_port,
        f'  mode: content_filter\n  reinject: "{LOOPBACK}:{reinject_port}"\n',
    )
    lab.start()
    proxy = start_proxy(config, proxy_port)
    sink_dir = lab.postfix.sink.directory
    runs = Rounds(messages)

    def relayed(port: int) -> Callable[[], None]:
        def load() -> None:
            before = relayed_count(sink_dir)
            smtp_source(port, messages)
            wait_for(lambda: relayed_count(sink_dir) >= before + messages, 300.0, 0.02)

        return load

    try:
        for _ in range(rounds):
            runs.measure("postfix-alone", relayed(lab.postfix.port))
            runs.measure("content-filter", relayed(filtered_port), proxy)
            runs.measure("postfix-twice", relayed(twice_port))
    finally:
        proxy.stop()
        lab.stop()
    alone, filt, twice = (
        runs.rate(k) for k in ("postfix-alone", "content-filter", "postfix-twice")
    )
    print(
        f"content filter: postfix-alone {alone:.0f} msg/s, with content filter {filt:.0f} "
        f"msg/s, ratio {filt / alone:.2f} (goal >= 0.7; {messages} msgs x {rounds} rounds)"
    )
    print(
        f"  ceiling: postfix twice (no-op content filter, no filter process) {twice:.0f} msg/s, "
        f"ratio to alone {twice / alone:.2f}; sentlink / ceiling {filt / twice:.2f}"
    )
    print(f"  cpu: sentlink proxy (content filter) {runs.cpu_ms('content-filter'):.2f} ms/msg")


def timed_sends(port: int, count: int, message: bytes) -> list[float]:
    times = []
    with smtplib.SMTP(LOOPBACK, port, local_hostname="bench.test", timeout=60) as smtp:
        for _ in range(count):
            start = time.perf_counter()
            smtp.sendmail(ALICE, [OUTSIDE], message)
            times.append(time.perf_counter() - start)
    return times


def submission(root: Path, messages: int, rounds: int) -> None:
    sink = SmtpSink(make_lab_dir(root, prefix="sink-") / "dump")
    sink.start()
    workdir = make_lab_dir(root, prefix="sub-")
    maildir = workdir / "mail"
    port = free_port()
    config = proxy_yaml(
        workdir,
        maildir,
        port,
        f"  upstream: {{host: {LOOPBACK}, port: {sink.port}, tls: none, auth: none}}\n",
    )
    proxy = start_proxy(config, port)
    noop = start_noop_smtpd()
    runs = Rounds(messages)
    message = build_message(ALICE, [OUTSIDE], body=("x" * 76 + "\n") * 130)
    latency: dict[str, list[float]] = {"direct": [], "proxy": []}
    try:
        for _ in range(rounds):
            for name, target, server in (
                ("direct", sink.port, None),
                ("proxy", port, proxy),
                ("noop-aiosmtpd", noop.port, noop),
            ):
                runs.measure(name, partial(smtp_source, target, messages), server)
                if name in latency:
                    latency[name] += timed_sends(target, 200, message)
    finally:
        noop.stop()
        proxy.stop()
        sink.stop()
    direct, proxied, ceiling = (runs.rate(k) for k in ("direct", "proxy", "noop-aiosmtpd"))
    print(
        f"submission relay: direct {direct:.0f} msg/s, via proxy {proxied:.0f} msg/s, "
        f"ratio {proxied / direct:.2f} (goal >= 0.8)"
    )
    for q, label in ((50, "p50"), (99, "p99")):
        d = statistics.quantiles(latency["direct"], n=100)[q - 1]
        p = statistics.quantiles(latency["proxy"], n=100)[q - 1]
        print(
            f"  added latency {label}: {1000 * (p - d):.2f} ms (direct {1000 * d:.2f} ms, "
            f"proxy {1000 * p:.2f} ms)"
        )
    print(
        f"  ceiling: no-op aiosmtpd server {ceiling:.0f} msg/s, ratio to direct "
        f"{ceiling / direct:.2f}; via proxy / no-op aiosmtpd {proxied / ceiling:.2f}"
    )
    print(
        f"  cpu: sentlink proxy (submission) {runs.cpu_ms('proxy'):.2f} ms/msg, "
        f"no-op aiosmtpd {runs.cpu_ms('noop-aiosmtpd'):.2f} ms/msg"
    )


def rss(root: Path, size_mb: int) -> None:
    sink = SmtpSink(make_lab_dir(root, prefix="sink-") / "dump")
    sink.start()
    workdir = make_lab_dir(root, prefix="rss-")
    port = free_port()
    config = proxy_yaml(
        workdir,
        workdir / "mail",
        port,
        f"  upstream: {{host: {LOOPBACK}, port: {sink.port}, tls: none, auth: none}}\n"
        "  limits: {max_message_bytes: 104857600}\n",
    )
    proxy = start_proxy(config, port)
    try:
        timed_sends(port, 1, build_message(ALICE, [OUTSIDE]))  # warm: imports, first session
        idle = proxy.status("VmRSS")
        line = "x" * 76 + "\n"
        body = line * (size_mb * 1024 * 1024 // len(line))
        timed_sends(port, 1, build_message(ALICE, [OUTSIDE], body=body))
        peak = proxy.status("VmHWM")
    finally:
        proxy.stop()
        sink.stop()
    print(
        f"rss: idle {idle / 1024:.1f} MB, peak with a {size_mb} MB message "
        f"{peak / 1024:.1f} MB, +{(peak - idle) / 1024:.1f} MB (goal <= +10 MB)"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("content_filter", "submission", "rss"))
    args = parser.parse_args(argv)
    root = make_lab_dir(prefix="sentlink-bench-proxy-")
    if args.only in (None, "content_filter"):
        content_filter(root, args.messages, args.rounds)
    if args.only in (None, "submission"):
        submission(root, args.messages, args.rounds)
    if args.only in (None, "rss"):
        rss(root, 50)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
