"""Benchmarks of the SMTP proxy (issue 3), printing ratios against named baselines.

1. Content filter: messages/s through Postfix with ``content_filter = sentlink:...`` vs the same
   Postfix without it (one lab, two listeners, alternated rounds): smtp-source, 10 KB messages,
   10 sessions; the clock stops when the relay sink has every message. Goal >= 0.7.
2. Submission relay: smtp-source through the proxy to smtp-sink vs straight to smtp-sink (goal
   >= 0.8), and the latency the proxy adds per message (sequential smtplib, p50/p99).
3. Peak RSS of ``sentlink proxy`` while one 50 MB message passes (goal <= idle + 10 MB).

Usage: ``.venv/bin/python bench/proxy.py [--messages N] [--rounds N]`` (root: real Postfix).
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


class Proxy:
    def __init__(self, config: Path, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sentlink", "-c", str(config), "proxy"],
            cwd=config.parent,
            start_new_session=True,
        )
        wait_for(lambda: is_listening(port), 20.0, what="sentlink proxy")

    def status(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # kB
        raise KeyError(field)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


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
    filtered_port = free_port()
    master = f"""\
sentlink   unix  -       -       n       -       10      smtp
{LOOPBACK}:{reinject_port} inet n - n - 10 smtpd
  -o content_filter=
  -o receive_override_options=no_address_mappings,no_milters
{LOOPBACK}:{filtered_port} inet n - n - - smtpd
  -o content_filter=sentlink:[{LOOPBACK}]:{proxy_port}
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
    proxy = Proxy(config, proxy_port)
    sink_dir = lab.postfix.sink.directory
    rates: dict[str, list[float]] = {"postfix-alone": [], "content-filter": []}
    try:
        for _ in range(rounds):
            for name, port in (
                ("postfix-alone", lab.postfix.port),
                ("content-filter", filtered_port),
            ):
                before = relayed_count(sink_dir)
                start = time.monotonic()
                smtp_source(port, messages)
                wait_for(lambda b=before: relayed_count(sink_dir) >= b + messages, 300.0, 0.02)
                rates[name].append(messages / (time.monotonic() - start))
    finally:
        proxy.stop()
        lab.stop()
    alone, filt = (statistics.median(rates[k]) for k in ("postfix-alone", "content-filter"))
    print(
        f"content filter: postfix-alone {alone:.0f} msg/s, with content filter {filt:.0f} "
        f"msg/s, ratio {filt / alone:.2f} (goal >= 0.7; {messages} msgs x {rounds} rounds)"
    )


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
    proxy = Proxy(config, port)
    rates: dict[str, list[float]] = {"direct": [], "proxy": []}
    message = build_message(ALICE, [OUTSIDE], body=("x" * 76 + "\n") * 130)
    latency: dict[str, list[float]] = {"direct": [], "proxy": []}
    try:
        for _ in range(rounds):
            for name, target in (("direct", sink.port), ("proxy", port)):
                start = time.monotonic()
                smtp_source(target, messages)
                rates[name].append(messages / (time.monotonic() - start))
                latency[name] += timed_sends(target, 200, message)
    finally:
        proxy.stop()
        sink.stop()
    direct, proxied = statistics.median(rates["direct"]), statistics.median(rates["proxy"])
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
    proxy = Proxy(config, port)
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
