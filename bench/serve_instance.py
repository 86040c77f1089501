"""One ``sentlink serve`` process under test: its config, CRM import, start/stop, progress."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

from cpu import CpuGroups, join_self

from lab import VMAIL_GID, VMAIL_UID, LabError, is_listening, make_maildir, wait_for

ACCOUNT = "alice"
SENDER = "alice@example.test"

# The recipients smtp-source and the RSS test write to, as CRM contacts, so every copy links.
CRM_CSV = """kind,id,name,email
contact,c-bob,Bob Customer,bob@customer.test
lead,l-carol,Carol Prospect,carol@customer.test
"""


def _count_entries(directory: Path) -> int:
    try:
        with os.scandir(directory) as entries:
            return sum(1 for e in entries if not e.name.startswith("."))
    except FileNotFoundError:
        return 0


def count_folder(folder: Path) -> int:
    """Messages in a Maildir folder (``new/`` + ``cur/``)."""
    return _count_entries(folder / "new") + _count_entries(folder / "cur")


class SentlinkInstance:
    """``.venv/bin/sentlink -c CONFIG serve`` with its own state directory and Maildir.

    ``listen`` is in libmilter syntax (``unix:PATH`` or ``inet:PORT@HOST``); ``postfix_milter``
    is the same socket the way Postfix's ``smtpd_milters`` names it.
    """

    def __init__(
        self,
        name: str,
        sentlink_bin: Path,
        state_dir: Path,
        maildir: Path,
        listen: str,
        cpu: CpuGroups,
        log_level: str = "info",
        command: str = "serve",
    ) -> None:
        self.name = name
        self.sentlink_bin = sentlink_bin
        self.state_dir = state_dir
        self.maildir = maildir
        self.listen = listen
        self.cpu = cpu
        self.log_level = log_level
        self.command = command  # "milter": capture only, nothing linked
        self.config_file = state_dir / "sentlink.yaml"
        self.db_path = state_dir / "sentlink.db"
        self.log_file = state_dir / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._db: sqlite3.Connection | None = None

    @property
    def postfix_milter(self) -> str:
        kind, _, rest = self.listen.partition(":")
        if kind == "unix":
            return self.listen
        port, _, host = rest.partition("@")
        return f"inet:{host}:{port}"

    @property
    def sent_folder(self) -> Path:
        return self.maildir / ".Sent"

    def config_text(self) -> str:
        return f"""\
site_secret_file: {self.state_dir / "site.secret"}
store:
  url: "sqlite:///{self.db_path}"
internal_domains: [example.test]
accounts:
  - name: {ACCOUNT}
    addresses: [{SENDER}]
    maildir: {self.maildir}
    sent_folder: Sent
    owner: "{VMAIL_UID}:{VMAIL_GID}"
milter:
  listen: "{self.listen}"
  socket_mode: "0666"
  outbound:
    auth: true
    daemon_name: [ORIGINATING]
    internal_hosts: []
watch:
  rescan_seconds: 300
log:
  level: {self.log_level}
"""

    def prepare(self) -> None:
        """Write the config, create the Maildir, import the CRM contacts."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        make_maildir(self.maildir, ("Sent",))
        self.config_file.write_text(self.config_text(), encoding="utf-8")
        csv = self.state_dir / "crm.csv"
        csv.write_text(CRM_CSV, encoding="utf-8")
        self._sentlink("crm", "import", str(csv))

    def _sentlink(self, *args: str) -> str:
        done = subprocess.run(
            [str(self.sentlink_bin), "-c", str(self.config_file), *args],
            capture_output=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            raise LabError(
                f"sentlink {' '.join(args)}: exit {done.returncode}\n"
                + done.stderr.decode("utf-8", "replace")
            )
        return done.stdout.decode("utf-8", "replace")

    def start(self) -> None:
        joiner = self.cpu.joiner(self.name)  # created here: the child's mkdir would be lost
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [str(self.sentlink_bin), "-c", str(self.config_file), self.command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: join_self(joiner),
            )
        try:
            wait_for(self._ready, 30.0, what=f"{self.name} milter socket")
        except TimeoutError as exc:
            self.stop()
            raise LabError(f"{exc}\n{self.log_tail()}") from exc

    def _ready(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise LabError(f"{self.name} exited:\n{self.log_tail()}")
        kind, _, rest = self.listen.partition(":")
        if kind == "unix":
            path = Path(rest)
            # The socket is chmod-ed after it starts listening: wait until Postfix may connect.
            return path.is_socket() and path.stat().st_mode & 0o777 == 0o666
        port, _, host = rest.partition("@")
        return is_listening(int(port), host)

    def stop(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    @property
    def pid(self) -> int:
        if self.process is None:
            raise LabError(f"{self.name} is not running")
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ---- progress

    def filed(self) -> int:
        return count_folder(self.sent_folder)

    def linked(self) -> int:
        """Sent messages of the account that have at least one link (read-only SQL)."""
        if self._db is None:
            if not self.db_path.exists():
                return 0
            self._db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
        row = self._db.execute(
            "SELECT count(*) FROM messages m WHERE m.account = ? AND m.direction = 'sent'"
            " AND EXISTS (SELECT 1 FROM links l WHERE l.message_pk = m.pk)",
            (ACCOUNT,),
        ).fetchone()
        return int(row[0])

    def failures(self) -> int:
        """Lines of the serve log that report a capture or link failure."""
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return 0
        return sum(
            1 for line in text.splitlines() if "capture failed" in line or "not linked" in line
        )
