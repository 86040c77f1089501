"""Running the SMTP proxy in tests: in a thread of the test process, or as ``sentlink proxy``."""

from __future__ import annotations

import os
import pwd
import smtplib
import socket
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lab import LOOPBACK, LabError, SmtpSink, find_binary, free_port, is_listening, wait_for
from sentlink.capture import Counters
from sentlink.config import load_config_text
from sentlink.config.models import Config
from sentlink.proxy import run_proxy

ALICE = "alice@example.test"


def proxy_config(
    workdir: Path,
    maildir: Path,
    *,
    mode: str = "submission",
    upstream: str = "",
    reinject: str = "",
    tls: str = "",
    limits: str = "",
    internal_hosts: Sequence[str] = (),
    owner: str = '"5000:5000"',
    port: int | None = None,
) -> str:
    """A sentlink.yaml with account alice and a proxy section."""
    lines = [
        f"site_secret_file: {workdir}/site.secret",
        f'store: {{url: "sqlite:///{workdir}/sentlink.db"}}',
        "accounts:",
        "  - name: alice",
        f"    addresses: [{ALICE}]",
        f"    logins: [{ALICE}]",
        f"    maildir: {maildir}",
        f"    owner: {owner}",
        "proxy:",
        f'  listen: "{LOOPBACK}:{port or free_port()}"',
        f"  mode: {mode}",
        f"  internal_hosts: [{', '.join(internal_hosts)}]",
    ]
    if upstream:
        lines.append(f"  upstream: {upstream}")
    if reinject:
        lines.append(f'  reinject: "{reinject}"')
    if tls:
        lines.append(f"  tls: {tls}")
    if limits:
        lines.append(f"  limits: {limits}")
    return "\n".join(lines) + "\n"


@dataclass
class ProxyThread:
    """The proxy serving in a thread of the test process (stop() before the test ends)."""

    config: Config
    secret: bytes = b"s" * 32
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-proxy")
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            run_proxy(
                self.config,
                self._stop,
                secret=self.secret,
                counters=self.counters,
                ready=self._ready.set,
            )
        except BaseException as exc:
            self.error = exc
            self._ready.set()

    @property
    def port(self) -> int:
        assert self.config.proxy is not None
        return int(self.config.proxy.listen.rpartition(":")[2])

    def start(self) -> ProxyThread:
        self._thread.start()
        assert self._ready.wait(10), "proxy did not start"
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def client(self, timeout: float = 30.0) -> smtplib.SMTP:
        smtp = smtplib.SMTP(LOOPBACK, self.port, local_hostname="client.test", timeout=timeout)
        smtp.ehlo()
        return smtp


def start_proxy(text: str) -> ProxyThread:
    return ProxyThread(load_config_text(text, "proxy.yaml")).start()


class FaultySink(SmtpSink):
    """Postfix's smtp-sink with fault-injection options (smtp-sink(1): -f, -r, -q, -Q, -A)."""

    def __init__(self, directory: Path, options: Sequence[str]) -> None:
        super().__init__(directory)
        self.options = list(options)

    def start(self) -> None:
        postfix = pwd.getpwnam("postfix")
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chown(self.directory, postfix.pw_uid, postfix.pw_gid)
        argv = [
            find_binary("smtp-sink") or "smtp-sink",
            "-u", "postfix",
            "-d", f"{self.directory}/%Y%m%d%H%M%S.",
            *self.options,
            f"{LOOPBACK}:{self.port}",
            "100",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for(lambda: self._exited() or is_listening(self.port), 10.0, what="smtp-sink")
        if self._exited():
            raise LabError(f"smtp-sink {self.options} exited")


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for localhost, made with openssl(1)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    argv = [
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return cert, key


def raw_reply(sock: socket.socket) -> bytes:
    """Read one complete (possibly multi-line) SMTP reply."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        complete = data.split(b"\r\n")[:-1]
        if complete and len(complete[-1]) >= 4 and complete[-1][3:4] == b" ":
            return data
