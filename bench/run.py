"""sentlink benchmarks: throughput against named baselines, the classic Sent-copy path, peak RSS.

Run as root (private Postfix/Dovecot, cgroups): ``make bench`` or
``.venv/bin/python bench/run.py [--quick] [--rounds N] [--only throughput|classic|rss]``.
Prints a table and writes bench/results/latest.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType

BENCH = Path(__file__).resolve().parent
sys.path.append(str(BENCH.parent / "tests"))  # tests/lab.py: private Postfix and Dovecot

from benchlab import ALONE, CLASSIC, CONFIGS, SENTLINK, THROUGHPUT, BenchLab  # noqa: E402
from report import ratios, render, summarize  # noqa: E402
from rss import MB, RssResult, run_rss  # noqa: E402
from throughput import Load, RunResult, run_load  # noqa: E402

from lab import REQUIRED_BINARIES, missing_binaries  # noqa: E402

RESULTS = BENCH / "results"
SELECTIONS = {
    "throughput": THROUGHPUT,
    "classic": (ALONE, SENTLINK, CLASSIC),
    "rss": (),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run (<1 min)")
    parser.add_argument("--rounds", type=int, default=None, help="alternated rounds (default 3)")
    parser.add_argument("--only", choices=sorted(SELECTIONS), default=None)
    parser.add_argument("--messages", type=int, default=None, help="messages per run")
    parser.add_argument("--keep", action="store_true", help="keep the lab directory")
    return parser.parse_args(argv)


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, check=False, timeout=10).stdout
    except OSError:
        return "?"
    return out.decode("utf-8", "replace").strip().splitlines()[0] if out.strip() else "?"


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (private Postfix/Dovecot instances, uid 5000 Maildirs)")
        return 77
    missing = missing_binaries((*REQUIRED_BINARIES, "smtp-source"))
    if missing:
        print(f"bench: missing {', '.join(missing)} (run `make deb`)")
        return 69
    rounds = args.rounds or (1 if args.quick else 3)
    messages = args.messages or (300 if args.quick else 2000)
    warmup = 30 if args.quick else 100
    load = Load(messages=messages)
    configs = SELECTIONS[args.only] if args.only else CONFIGS
    with_rss = args.only in (None, "rss")
    needed = tuple(dict.fromkeys((*configs, SENTLINK) if with_rss else configs))

    # SIGTERM (timeout(1), a CI runner) ends the run through the finally below: no server left.
    signal.signal(signal.SIGTERM, _interrupt)
    lab = BenchLab(needed)
    meta: dict[str, object] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "postfix": _version(["postconf", "-d", "-h", "mail_version"]),
        "dovecot": _version(["dovecot", "--version"]),
        "messages": messages,
        "size": load.size,
        "sessions": load.sessions,
        "rounds": rounds,
        "quick": args.quick,
        "configs": list(configs),
        "cpu_method": lab.cpu.method,
        "lab": str(lab.root),
    }
    runs: list[RunResult] = []
    rss: RssResult | None = None
    started = time.monotonic()
    print(f"bench: lab in {lab.root}; cpu accounting: {lab.cpu.method}", flush=True)
    try:
        lab.start()
        for config in configs:  # start every process type, fill caches; not recorded
            run_load(lab, config, Load(messages=warmup), 0)
        for round_no in range(1, rounds + 1):
            shift = (round_no - 1) % max(1, len(configs))
            order = configs[shift:] + configs[:shift]  # alternate who goes first
            for config in order:
                time.sleep(0.5)  # let Postfix's delivery agents go idle
                run = run_load(lab, config, load, round_no)
                runs.append(run)
                print(
                    f"  round {round_no} {config:<20} accepted {run.accepted_rate:7.1f}/s"
                    f"  end-to-end {run.e2e_rate:7.1f}/s",
                    flush=True,
                )
        if with_rss:
            rss = run_rss(lab, size=50 * MB)
        failures = {name: s.failures() for name, s in lab.sentlinks.items()}
    finally:
        lab.stop()
    summary = summarize(runs)
    ratio_rows = ratios(summary)
    meta["wall_seconds"] = round(time.monotonic() - started, 1)
    meta["sentlink_failures_logged"] = failures
    print()
    print(render(summary, ratio_rows, rss, meta), end="")
    print(f"(wall time {meta['wall_seconds']} s; sentlink failures logged: {failures})")
    RESULTS.mkdir(exist_ok=True)
    result = {
        "meta": meta,
        "summary": {k: asdict(v) for k, v in summary.items()},
        "ratios": [asdict(r) for r in ratio_rows],
        "rss": None if rss is None else rss.as_dict(),
        "runs": [r.as_dict() for r in runs],
    }
    out = RESULTS / "latest.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"results: {out}")
    if not args.keep:
        shutil.rmtree(lab.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
