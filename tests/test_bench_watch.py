"""bench/watch.py still runs: a small mailbox through every part of it (no timing asserted).

The figures in README come from this script at 100,000 messages; this keeps it from breaking
between runs, and checks that what it measures is a reconcile that handled every file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "watch.py"


def test_watch_benchmark_runs_every_part_on_a_small_mailbox(tmp_path: Path) -> None:
    out = tmp_path / "watch.json"
    argv = [
        sys.executable, str(BENCH), "--messages", "400", "--sample", "50",
        "--latency", "5", "--burst", "200", "--rounds", "2", "--no-cold", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    warm = results["warm"]
    summary = warm["summary"]
    # Every generated file was handled: none failed, self-sent ones moved, some linked.
    assert summary["seen"] == 400
    assert summary["failed"] == 0
    assert summary["moved"] > 0
    assert summary["linked"] > 0
    assert summary["linked"] + summary["skipped"] + summary["already"] == 400
    for key in (
        "reconcile_msgs_per_s",
        "raw_8k_read_files_per_s",
        "naive_maildir_email_msgs_per_s",
        "compat32_header_parse_msgs_per_s",
        "ceiling_store_writes_msgs_per_s",
        "prepare_cpu_us_per_msg",
        "store_writes_us_per_msg",
        "cpu_bound_msgs_per_s",
    ):
        assert warm[key] > 0, key
    assert warm["cpu_bound_msgs_per_s"] < warm["ceiling_store_writes_msgs_per_s"] * warm["cpus"]
    # Two warm rounds, each a reconcile of its own copy; the reported one is among them.
    assert warm["rounds"] == 2 and len(warm["rounds_vs_raw_read"]) == 2
    assert warm["reconcile_msgs_per_s"] in warm["rounds_reconcile_msgs_per_s"]
    # The CPUs' measured capacity: some, and at most a little over the CPUs there are (timing).
    assert 0 < warm["cpu_capacity"] <= warm["cpus"] * 1.25
    assert len(warm["rounds_cpu_capacity"]) == 2
    assert warm["cpu_bound_at_capacity_msgs_per_s"] <= warm["cpu_bound_msgs_per_s"] * 1.25
    assert results["rescan_unchanged"]["pending"] == 0
    assert results["latency_ms"]["samples"] == 5
    assert results["burst"]["files"] == 200
    assert results["burst"]["missed"] == 0
