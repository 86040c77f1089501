"""``sentlink status``: what the running ``serve`` last wrote, plus live queue depths."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sentlink.capture import Counters
from sentlink.store import Store

# serve writes the file every few seconds; older than this means it is not running.
STALE_SECONDS = 30.0


def serve_state(components: Sequence[Any], counters: Counters, started: float) -> dict[str, Any]:
    """The state ``serve`` publishes: JSON-able, members only ever added."""
    state: dict[str, Any] = {
        "pid": os.getpid(),
        "started": started,
        "updated": time.time(),
        "components": {c.name: {"alive": bool(c.alive())} for c in components},
        "capture": {
            f"{event}:{reason}" if reason else event: n
            for (event, reason), n in sorted(counters.snapshot().items())
        },
    }
    for c in components:
        watcher = getattr(c, "watcher", None)
        if watcher is not None:
            state["watcher"] = {
                "last_rescan": watcher.last_rescan,
                "rescans": watcher.rescans,
                "inotify_overflows": getattr(watcher, "overflows", 0),
                "handled": dict(getattr(watcher, "handled", {})),
            }
    return state


def write_state(path: Path, state: Mapping[str, Any]) -> None:
    """Atomically replace the status file (write a temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def read_status(path: Path, store: Store | None, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    status: dict[str, Any] = {"running": False, "serve": None}
    try:
        serve = json.loads(path.read_text())
    except (OSError, ValueError):
        serve = None
    if isinstance(serve, dict):
        status["serve"] = serve
        fresh = now - float(serve.get("updated", 0)) < STALE_SECONDS
        status["running"] = fresh and _pid_alive(int(serve.get("pid", 0)))
    if store is not None:
        pending: dict[str, int] = {}
        dead: dict[str, int] = {}
        for row in store.outbox_rows(["pending", "dead"]):
            bucket = pending if row["state"] == "pending" else dead
            bucket[row["hook"]] = bucket.get(row["hook"], 0) + 1
        status["outbox"] = {"pending": pending, "dead": dead}
        status["disabled_hooks"] = store.disabled_hooks()
    return status


def healthy(status: Mapping[str, Any]) -> bool:
    serve = status.get("serve") or {}
    components = serve.get("components", {})
    return bool(status.get("running")) and all(c.get("alive") for c in components.values())


def render(status: Mapping[str, Any]) -> str:
    lines = []
    serve = status.get("serve") or {}
    if status.get("running"):
        lines.append(f"serve: running (pid {serve.get('pid')})")
    elif serve:
        lines.append("serve: not running (status file is stale)")
    else:
        lines.append("serve: not running (no status file)")
    for name, c in sorted(serve.get("components", {}).items()):
        lines.append(f"  {name}: {'up' if c.get('alive') else 'DOWN'}")
    watcher = serve.get("watcher")
    if watcher and watcher.get("last_rescan"):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(watcher["last_rescan"]))
        lines.append(f"  last rescan: {when} ({watcher.get('rescans', 0)} rescans)")
    outbox = status.get("outbox")
    if outbox is not None:
        for hook, n in sorted(outbox["pending"].items()):
            lines.append(f"outbox: {hook}: {n} pending")
        for hook, n in sorted(outbox["dead"].items()):
            lines.append(f"outbox: {hook}: {n} dead-lettered")
        if not outbox["pending"] and not outbox["dead"]:
            lines.append("outbox: empty")
    for hook, reason in sorted((status.get("disabled_hooks") or {}).items()):
        lines.append(f"hook {hook}: DISABLED ({reason})")
    return "\n".join(lines) + "\n"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
