"""One measured load: ``smtp-source`` against one configuration's listener, then wait until the
work is really done (queue empty; every Sent copy filed, and linked for sentlink)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from benchlab import CAPTURE, CLASSIC, RECEIVE_WRITE, SENTLINK, SENTLINK_TCP, BenchLab
from cpu import delta, join_self
from serve_instance import SENDER

from lab import LOOPBACK, LabError, find_binary

RECIPIENT = "bob@customer.test"  # an outside domain: relayed to the sink; a CRM contact
POLL_SECONDS = 0.05
STALL_SECONDS = 30.0  # no message moved in this long: something is broken, stop waiting


@dataclass(frozen=True)
class Load:
    messages: int
    size: int = 10240
    sessions: int = 10


@dataclass
class RunResult:
    config: str
    round: int
    messages: int
    accepted_s: float  # smtp-source wall time: every message got its 250
    e2e_s: float  # until the queue is empty and every copy is filed (and linked)
    filed_s: float | None  # until every Sent copy is in the folder (configs that file copies)
    linked_s: float | None  # until every copy is linked (sentlink)
    cpu: dict[str, float]  # CPU seconds per component during [start, e2e]

    @property
    def accepted_rate(self) -> float:
        return self.messages / self.accepted_s

    @property
    def e2e_rate(self) -> float:
        return self.messages / self.e2e_s

    @property
    def filed_rate(self) -> float | None:
        return None if self.filed_s is None else self.messages / self.filed_s

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["accepted_per_s"] = self.accepted_rate
        data["e2e_per_s"] = self.e2e_rate
        data["filed_per_s"] = self.filed_rate
        return data


def smtp_source_argv(load: Load, port: int) -> list[str]:
    """smtp-source(1): -s parallel sessions, -m messages, -l payload bytes (headers extra);
    one message per session (no -d), as submission clients do."""
    return [
        find_binary("smtp-source") or "smtp-source",
        "-s", str(load.sessions),
        "-m", str(load.messages),
        "-l", str(load.size),
        "-f", SENDER,
        "-t", RECIPIENT,
        f"{LOOPBACK}:{port}",
    ]  # fmt: skip


Counter = Callable[[], int]


def _progress(lab: BenchLab, config: str) -> tuple[Counter | None, Counter | None]:
    """(filed count, linked count) functions for the configuration, None where not applicable."""
    if config in (SENTLINK, SENTLINK_TCP):
        instance = lab.sentlinks[config]
        return instance.filed, instance.linked
    if config == CAPTURE:
        return lab.sentlinks[config].filed, None
    if config == CLASSIC and lab.classic is not None:
        return lab.classic.filed, None
    if config == RECEIVE_WRITE:
        return lab.receive_written, None
    return None, None


def run_load(
    lab: BenchLab, config: str, load: Load, round_no: int, timeout: float = 300.0
) -> RunResult:
    filed, linked = _progress(lab, config)
    filed_base = filed() if filed else 0
    linked_base = linked() if linked else 0
    if lab.queue_count():
        raise LabError(f"{config}: Postfix queue not empty before the run")
    log = log_path(lab, config)
    joiner = lab.load_joiner()
    cpu_before = lab.cpu.usage()
    started = time.monotonic()
    with open(log, "ab") as out:
        done = subprocess.run(
            smtp_source_argv(load, lab.ports[config]),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            preexec_fn=lambda: join_self(joiner),
        )
    accepted_s = time.monotonic() - started
    if done.returncode != 0:
        raise LabError(f"{config}: smtp-source exit {done.returncode}: see {log}")
    queue_s = filed_s = linked_s = None
    deadline = started + timeout
    last_state: tuple[int, int, int] = (-1, -1, -1)
    last_change = time.monotonic()
    while True:
        now = time.monotonic() - started
        queued = lab.queue_count()
        n_filed = filed() - filed_base if filed else 0
        n_linked = linked() - linked_base if linked else 0
        if queue_s is None and queued == 0:
            queue_s = now
        if filed is not None and filed_s is None and n_filed >= load.messages:
            filed_s = now
        if linked is not None and linked_s is None and n_linked >= load.messages:
            linked_s = now
        pending = [
            what
            for what, value, needed in (
                ("queue", queue_s, True),
                ("filed", filed_s, filed is not None),
                ("linked", linked_s, linked is not None),
            )
            if needed and value is None
        ]
        if not pending:
            break
        state = (queued, n_filed, n_linked)
        if state != last_state:
            last_state, last_change = state, time.monotonic()
        stalled = time.monotonic() - last_change > STALL_SECONDS
        if stalled or time.monotonic() > deadline:
            why = f"no progress for {STALL_SECONDS:g}s" if stalled else f"over {timeout:g}s"
            raise LabError(
                f"{config}: not done ({', '.join(pending)}), {why}: queue={queued} "
                f"filed={n_filed} linked={n_linked} of {load.messages}; lab {lab.root}"
            )
        time.sleep(POLL_SECONDS)
    e2e_s = max(t for t in (queue_s, filed_s, linked_s) if t is not None)
    cpu = delta(lab.cpu.usage(), cpu_before)
    return RunResult(
        config=config,
        round=round_no,
        messages=load.messages,
        accepted_s=accepted_s,
        e2e_s=e2e_s,
        filed_s=filed_s,
        linked_s=linked_s,
        cpu=cpu,
    )


def log_path(lab: BenchLab, config: str) -> Path:
    return lab.root / f"smtp-source-{config}.log"
