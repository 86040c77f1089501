"""CPU time per component, from cgroups: exact even while others use the same cores.

Every process the benchmark starts (Postfix's master, Dovecot's master, each sentlink, each
milter script of bench/, the load generator and the sink) is put into its own child cgroup;
children they fork later (Postfix's smtpd/cleanup/pipe, dovecot-lda under pipe, Dovecot's auth)
inherit it. The cgroup's cumulative CPU counter then covers exactly that component, including
processes that have already exited, and nothing of other people's work on the machine.

cgroup v1 ``cpuacct.usage`` (nanoseconds) is used when mounted, else cgroup v2 ``cpu.stat``
``usage_usec``. Without either (not root, no cgroupfs) the only figure is the whole system's busy
time from /proc/stat, reported under the single group ``system``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, options) of every mount."""
    rows = []
    with open("/proc/mounts", encoding="utf-8") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 4:
                rows.append((fields[1], fields[2], fields[3]))
    return rows


def _find_hierarchy() -> tuple[str, Path] | None:
    for mount, fstype, options in _mounts():
        if fstype == "cgroup" and "cpuacct" in options.split(","):
            return "cgroup-v1-cpuacct", Path(mount)
    for mount, fstype, _options in _mounts():
        if fstype == "cgroup2":
            return "cgroup-v2-cpu.stat", Path(mount)
    return None


def system_busy_seconds() -> float:
    """All CPUs' non-idle time since boot (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is already included in user time
    return (sum(fields[:8]) - idle) / _CLK_TCK


class CpuGroups:
    """Named CPU accounting groups under one benchmark-owned parent cgroup."""

    def __init__(self, tag: str) -> None:
        found = None if os.geteuid() != 0 else _find_hierarchy()
        self.method = "proc-stat-system-wide"
        self._parent: Path | None = None
        self._groups: dict[str, Path] = {}
        if found is not None:
            method, mount = found
            parent = mount / tag
            try:
                parent.mkdir()
            except OSError:
                return
            self.method = method
            self._parent = parent

    @property
    def per_component(self) -> bool:
        return self._parent is not None

    def group(self, name: str) -> Path | None:
        """The directory of group ``name`` (created on first use); None without cgroups."""
        if self._parent is None:
            return None
        path = self._groups.get(name)
        if path is None:
            path = self._parent / name
            path.mkdir(exist_ok=True)
            self._groups[name] = path
        return path

    def add(self, name: str, pids: Iterable[int]) -> None:
        """Move running processes (all their threads) into group ``name``."""
        path = self.group(name)
        if path is None:
            return
        for pid in pids:
            # A process may exit between listing and moving it: nothing to account then.
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                (path / "cgroup.procs").write_text(f"{pid}\n", encoding="ascii")

    def joiner(self, name: str) -> Path | None:
        """The ``cgroup.procs`` file a child writes its own pid to before exec (see
        :func:`join_self`), so that not even its first instructions run elsewhere.

        Call it in the parent: a group first created in the child is unknown to ``usage``."""
        path = self.group(name)
        return None if path is None else path / "cgroup.procs"

    def usage(self) -> dict[str, float]:
        """Cumulative CPU seconds of each group (or of the whole system, without cgroups)."""
        if self._parent is None:
            return {"system": system_busy_seconds()}
        return {name: self._read(path) for name, path in self._groups.items()}

    def _read(self, path: Path) -> float:
        if self.method == "cgroup-v1-cpuacct":
            return int((path / "cpuacct.usage").read_text(encoding="ascii")) / 1e9
        for line in (path / "cpu.stat").read_text(encoding="ascii").splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        return 0.0

    def close(self) -> None:
        """Move leftovers back to the root group and remove our groups."""
        if self._parent is None:
            return
        root_procs = self._parent.parent / "cgroup.procs"
        for path in self._groups.values():
            with contextlib.suppress(OSError):
                for pid in (path / "cgroup.procs").read_text(encoding="ascii").split():
                    with contextlib.suppress(OSError):
                        root_procs.write_text(f"{pid}\n", encoding="ascii")
            with contextlib.suppress(OSError):
                path.rmdir()
        with contextlib.suppress(OSError):
            self._parent.rmdir()


def join_self(procs_file: Path | None) -> None:
    """For ``preexec_fn``: put the calling (child) process into a cgroup before it execs."""
    if procs_file is not None:
        with open(procs_file, "w", encoding="ascii") as procs:
            procs.write(f"{os.getpid()}\n")


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}
