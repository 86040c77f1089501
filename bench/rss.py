"""Peak memory of the sentlink process while one big message passes through the milter.

A fresh ``sentlink serve`` first handles one small message (so every code path the big one takes
is loaded), then its idle VmRSS is read and its peak (VmHWM) reset (``clear_refs`` 5, Linux
>= 4.0). After the big message is filed and linked, VmHWM is the peak it caused.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchlab import SENTLINK, BenchLab
from serve_instance import SENDER
from throughput import RECIPIENT

from lab import build_message, wait_for

MB = 1024 * 1024


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise KeyError(key)


def _reset_peak(pid: int) -> bool:
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5", encoding="ascii")
        return True
    return False


def big_body(size: int) -> str:
    """Plain text lines (76 characters, like base64 attachments) adding up to ``size`` bytes."""
    line = ("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/" * 2)[:76] + "\n"
    return line * (size // len(line))


@dataclass
class RssResult:
    message_bytes: int
    idle_rss_mb: float
    peak_hwm_mb: float
    growth_mb: float
    peak_was_reset: bool
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def run_rss(lab: BenchLab, size: int = 50 * MB, timeout: float = 180.0) -> RssResult:
    instance = lab.sentlinks[SENTLINK]
    port = lab.ports[SENTLINK]
    instance.stop()
    instance.start()
    pid = instance.pid
    base = instance.linked()
    warmup = build_message(
        SENDER, [RECIPIENT], "rss warm-up", message_id=f"<rss-warmup-{time.time_ns()}@bench>"
    )
    lab.postfix.send(SENDER, [RECIPIENT], warmup, port=port)
    wait_for(lambda: instance.linked() >= base + 1, 30.0, what="warm-up message linked")
    time.sleep(1.0)  # let the watcher's thread settle after linking
    idle_kb = _status_kb(pid, "VmRSS")
    reset = _reset_peak(pid)
    message = build_message(
        SENDER,
        [RECIPIENT],
        "rss big message",
        message_id=f"<rss-big-{time.time_ns()}@bench>",
        body=big_body(size),
    )
    started = time.monotonic()
    lab.postfix.send(SENDER, [RECIPIENT], message, port=port, timeout=timeout)
    del message
    wait_for(lambda: instance.linked() >= base + 2, timeout, what="big message linked")
    seconds = time.monotonic() - started
    peak_kb = _status_kb(pid, "VmHWM")
    lab.postfix.wait_queue_empty(timeout)
    return RssResult(
        message_bytes=size,
        idle_rss_mb=idle_kb / 1024,
        peak_hwm_mb=peak_kb / 1024,
        growth_mb=(peak_kb - idle_kb) / 1024,
        peak_was_reset=reset,
        seconds=seconds,
    )
