"""A private PostgreSQL cluster for tests: initdb + pg_ctl as the postgres user, on a free
loopback port, everything under a lab directory, removed afterwards.

Needs root (the server refuses to run as root, so it runs as ``postgres``) and the Debian
``postgresql`` package (``make deb``). Without them the tests skip with the reason, except
under CI=true, where they fail.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import free_port, make_lab_dir

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def pg_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run a private PostgreSQL server as the postgres user"
    if not PG_BIN_DIRS or not (PG_BIN_DIRS[0] / "initdb").exists():
        return "PostgreSQL server binaries missing (run `make deb` as root)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user (install the postgresql package)"
    return None


def require_pg() -> None:
    problem = pg_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true forbids skipping: {problem}", pytrace=False)
    pytest.skip(problem)


class PgCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = PG_BIN_DIRS[0]
        self.data = root / "data"
        self.sockets = root / "run"
        self.log = root / "postgres.log"
        self.port = free_port()
        self._user = pwd.getpwnam("postgres")

    def _run(self, *argv: str, timeout: float = 60) -> None:
        result = subprocess.run(
            [str(self.bin / argv[0]), *argv[1:]],
            user=self._user.pw_uid,
            group=self._user.pw_gid,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stderr}\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def start(self) -> None:
        for path in (self.data, self.sockets):
            path.mkdir(mode=0o700)
            os.chown(path, self._user.pw_uid, self._user.pw_gid)
        self.log.touch()
        os.chown(self.log, self._user.pw_uid, self._user.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C.UTF-8",
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.sockets} -c fsync=off "
            "-c max_connections=60 -c shared_buffers=32MB"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "sentlink")

    def url(self, database: str = "sentlink") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")


def running_cluster() -> Iterator[PgCluster]:
    """A started cluster, stopped and removed afterwards (the body of a fixture)."""
    require_pg()
    root = make_lab_dir(prefix="sentlink-pg-")
    cluster = PgCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
    shutil.rmtree(root, ignore_errors=True)
