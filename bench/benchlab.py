"""The benchmark's servers: one private Postfix with one submission-like listener per
configuration, the relay sink, and the milters and Dovecot the configurations need.

All listeners set ``milter_macro_daemon_name=ORIGINATING`` (so sentlink counts their mail as
outbound) and differ only in ``smtpd_milters`` (and, for the classic path, the cleanup service):
the configurations share every Postfix process type, queue and disk, and the benchmark switches
between them without reloading Postfix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from classic import ClassicSetup, vmail_user
from cpu import CpuGroups, join_self
from serve_instance import SentlinkInstance

from lab import (
    LOOPBACK,
    LabError,
    PostfixLab,
    SmtpSink,
    descendants,
    find_binary,
    free_port,
    is_listening,
    make_lab_dir,
    wait_for,
)

BENCH_DIR = Path(__file__).resolve().parent
PROJECT = BENCH_DIR.parent
VENV_BIN = Path(sys.executable).parent

ALONE = "postfix-alone"
NOOP = "noop-milter"
RECEIVE = "receive-milter"  # takes what sentlink's capture takes, does nothing with it
RECEIVE_WRITE = "receive-write-milter"  # the same, and writes each message durably
SENTLINK = "sentlink-unix"
SENTLINK_TCP = "sentlink-tcp"
CAPTURE = "sentlink-capture"  # `sentlink milter`: capture only, no watcher (for the analysis)
CLASSIC = "classic-bcc-lda"
CONFIGS = (ALONE, NOOP, RECEIVE, RECEIVE_WRITE, SENTLINK, SENTLINK_TCP, CAPTURE, CLASSIC)
# `run.py --only throughput`: every milter configuration and the baseline.
THROUGHPUT = (ALONE, NOOP, RECEIVE, RECEIVE_WRITE, SENTLINK, SENTLINK_TCP, CAPTURE)

# Queue directories that hold messages not yet delivered (not defer/, bounce/: logs).
_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class QuietSink(SmtpSink):
    """Postfix's smtp-sink without per-message dump files: the relay target costs the same in
    every configuration and writes nothing to the disk the Maildirs are on."""

    def __init__(self, directory: Path, port: int, cpu: CpuGroups) -> None:
        super().__init__(directory, port)
        self._cpu = cpu

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            find_binary("smtp-sink") or "smtp-sink",
            "-u", "postfix",  # as root: drop privileges after binding
            "-h", "sink.remote.test",
            f"{LOOPBACK}:{self.port}",
            "256",
        ]  # fmt: skip
        joiner = self._cpu.joiner("load")
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: join_self(joiner),
            )
        wait_for(lambda: not self.is_running() or is_listening(self.port), 10.0, what="smtp-sink")
        if not self.is_running():
            raise LabError(f"smtp-sink exited: see {self.log}")


@dataclass(frozen=True)
class ScriptMilter:
    """A milter script of bench/ on its own unix socket, in its own CPU group."""

    group: str  # CPU group, and the name of its log
    script: str  # file name under bench/
    socket: Path
    options: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return [sys.executable, str(BENCH_DIR / self.script), *self.options, f"unix:{self.socket}"]


@dataclass
class BenchLab:
    """Everything the selected configurations need, started and stopped together."""

    configs: Sequence[str]
    root: Path = field(default_factory=lambda: make_lab_dir(prefix="sentlink-bench-"))
    cpu: CpuGroups = field(init=False)
    postfix: PostfixLab = field(init=False)
    ports: dict[str, int] = field(init=False, default_factory=dict)
    sentlinks: dict[str, SentlinkInstance] = field(init=False, default_factory=dict)
    classic: ClassicSetup | None = field(init=False, default=None)
    script_milters: dict[str, ScriptMilter] = field(init=False, default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.cpu = CpuGroups(f"sentlink-bench-{os.getpid()}")
        run = self.root / "run"
        run.mkdir(mode=0o755)
        run.chmod(0o755)
        # The receive+write milter runs as root, like the others: its Maildir is root's.
        self.receive_maildir = self.root / "receive-maildir"
        script_milters = {
            NOOP: ScriptMilter("noop", "noop_milter.py", run / "noop.sock"),
            RECEIVE: ScriptMilter("receive", "receive_milter.py", run / "receive.sock"),
            RECEIVE_WRITE: ScriptMilter(
                "receive-write",
                "receive_milter.py",
                run / "receive-write.sock",
                ("--write", str(self.receive_maildir)),
            ),
        }
        self.script_milters = {c: m for c, m in script_milters.items() if c in self.configs}
        sentlink_bin = VENV_BIN / "sentlink"
        if SENTLINK in self.configs:
            self.sentlinks[SENTLINK] = SentlinkInstance(
                "sentlink",
                sentlink_bin,
                self.root / "sentlink-unix",
                self.root / "vmail" / "alice",
                f"unix:{run / 'sentlink.sock'}",
                self.cpu,
            )
        if SENTLINK_TCP in self.configs:
            # Its own Maildir and database: the two instances never see each other's copies.
            self.sentlinks[SENTLINK_TCP] = SentlinkInstance(
                "sentlink-tcp",
                sentlink_bin,
                self.root / "sentlink-tcp",
                self.root / "vmail" / "alice-tcp",
                f"inet:{free_port()}@{LOOPBACK}",
                self.cpu,
            )
        if CAPTURE in self.configs:
            self.sentlinks[CAPTURE] = SentlinkInstance(
                "sentlink-capture",
                sentlink_bin,
                self.root / "sentlink-capture",
                self.root / "vmail" / "alice-capture",
                f"unix:{run / 'capture.sock'}",
                self.cpu,
                command="milter",
            )
        extra_main: dict[str, str] = {}
        extra_master = ""
        options: dict[str, dict[str, str]] = {ALONE: {"smtpd_milters": ""}}
        for name, script in self.script_milters.items():
            options[name] = {"smtpd_milters": f"unix:{script.socket}"}
        for name, instance in self.sentlinks.items():
            options[name] = {"smtpd_milters": instance.postfix_milter}
        if CLASSIC in self.configs:
            self.classic = ClassicSetup(self.root)
            self.classic.write_maps()
            extra_main.update(self.classic.main_cf())
            extra_master += self.classic.master_cf(vmail_user())
            options[CLASSIC] = {"smtpd_milters": "", **self.classic.listener_options()}
        for name, own in options.items():
            port = self.ports[name] = free_port()
            extra_master += f"{LOOPBACK}:{port} inet n - n - - smtpd\n"
            opts = {"syslog_name": f"postfix/{name}", "milter_macro_daemon_name": "ORIGINATING"}
            opts.update(own)
            extra_master += "".join(f"  -o {k}={v}\n" for k, v in opts.items())
        self.postfix = PostfixLab(self.root, extra_main_cf=extra_main, extra_master_cf=extra_master)
        self.postfix.sink = QuietSink(self.root / "sink", self.postfix.sink.port, self.cpu)

    # ---- lifecycle

    def start(self) -> None:
        try:
            self.postfix.start()
            master = wait_for(self.postfix.master_pid, 10.0, what="Postfix master.pid")
            self.cpu.add("postfix", {master} | descendants(master))
            if self.classic is not None:
                self.classic.start()
                dovecot = self.classic.dovecot
                master = wait_for(dovecot.master_pid, 10.0, what="Dovecot master.pid")
                self.cpu.add("dovecot", {master} | descendants(master))
            for script in self.script_milters.values():
                self._start_script_milter(script)
            for instance in self.sentlinks.values():
                instance.prepare()
                instance.start()
        except BaseException:
            self.stop()
            raise

    def _start_script_milter(self, script: ScriptMilter) -> None:
        joiner = self.cpu.joiner(script.group)
        log_path = self.root / f"{script.group}-milter.log"
        with open(log_path, "ab") as log:
            process = self.processes[script.group] = subprocess.Popen(
                script.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: join_self(joiner),
            )

        def ready() -> bool:
            if process.poll() is not None:
                raise LabError(f"{script.script} exited: see {log_path}")
            return script.socket.is_socket()

        wait_for(ready, 15.0, what=f"{script.group} milter socket")

    def stop(self) -> None:
        for instance in self.sentlinks.values():
            instance.stop()
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self.processes.clear()
        try:
            self.postfix.stop()
        finally:
            if self.classic is not None:
                self.classic.stop()
            self.cpu.close()

    # ---- observation

    def queue_count(self) -> int:
        """Messages in Postfix's queue (files under the queue directories, no postqueue run)."""
        total = 0
        for name in _QUEUES:
            for _dirpath, _dirs, files in os.walk(self.postfix.queue_dir / name):
                total += len(files)
        return total

    def receive_written(self) -> int:
        """Messages the receive+write milter has filed into its Maildir's cur/."""
        try:
            return len(os.listdir(self.receive_maildir / "cur"))
        except FileNotFoundError:
            return 0

    def load_joiner(self) -> Path | None:
        return self.cpu.joiner("load")
