"""Private, real Postfix and Dovecot instances for integration tests.

Everything lives under one directory given by the caller, listens on free loopback high ports and
is driven with an explicit ``-c`` on every command, so the host's own MTA (port 25,
``/etc/postfix``) is never touched.  Needs root: Postfix's master and Dovecot drop privileges
themselves, and Maildirs belong to the virtual mail uid/gid 5000.

Layout under ``root`` (a :class:`MailLab`)::

    postfix/etc/      main.cf, master.cf, texthash maps          (PostfixLab.config_dir)
    postfix/spool/    queue_directory; private/auth is Dovecot's SASL socket
    postfix/data/     data_directory (owned by postfix)
    postfix/maillog   Postfix's log, written by postlogd         (PostfixLab.maillog)
    sink/             one file per message relayed to outside domains (smtp-sink dumps)
    vmail/<local>/    Maildir of <local>@example.test, uid/gid 5000
    dovecot/          dovecot.conf, users, run/, state/, dovecot.log

Local recipients (``@example.test``) are delivered by Postfix virtual(8) into ``vmail``; every other
domain is relayed to Postfix's ``smtp-sink`` on loopback, which dumps each transaction to a file,
so a test can read exactly what left the server for both kinds of recipient
(``PostfixLab.wait_message`` and ``PostfixLab.wait_relayed``).

``root`` must be reachable by the unprivileged server users: create it with :func:`make_lab_dir`
(pytest's own temporary directories are 0700).
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import imaplib
import os
import pwd
import random
import re
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

T = TypeVar("T")

VMAIL_UID = 5000
VMAIL_GID = 5000
LOCAL_DOMAIN = "example.test"
LOOPBACK = "127.0.0.1"

POSTFIX_BINARIES = ("postfix", "postconf", "postqueue", "smtp-sink", "sendmail")
DOVECOT_BINARIES = ("dovecot", "doveconf")
REQUIRED_BINARIES = POSTFIX_BINARIES + DOVECOT_BINARIES
_SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# sockaddr_un.sun_path is 108 bytes on Linux; a longer socket path fails at bind time with a
# confusing error, so we check up front.
_UNIX_PATH_MAX = 107


class LabError(RuntimeError):
    """A lab server could not be configured, started or stopped."""


# --------------------------------------------------------------------------------------------
# Small utilities


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections' local ports."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports this process handed out already (a lab asks for several before any is bound).
_GIVEN_PORTS: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that was free a moment ago, below the ephemeral range.

    A port the kernel picks (bind to 0) comes from the range it also takes the local port of
    every outgoing connection from: with the lab's own traffic (Postfix, the load generators),
    one of those could take the port before the server it was meant for binds it ("Address
    already in use"). Below that range only a bind takes a port.
    """
    high = _ephemeral_low()
    low = max(1024, high - 16384)
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(low, high)
        if port in _GIVEN_PORTS:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _GIVEN_PORTS.add(port)
        return port
    raise LabError(f"no free port on {host} in {low}-{high - 1}")


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str | None = None,
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Raises :class:`TimeoutError` naming ``what`` (or the predicate) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            name = what or getattr(predicate, "__name__", repr(predicate))
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {name}")
        time.sleep(interval)


def find_binary(name: str) -> str | None:
    """Path of a server binary; sbin directories are searched even when not on $PATH."""
    return shutil.which(name) or shutil.which(name, path=_SBIN_PATH)


def missing_binaries(names: Sequence[str] = REQUIRED_BINARIES) -> list[str]:
    """The names among ``names`` that are not installed."""
    return [name for name in names if find_binary(name) is None]


def make_lab_dir(parent: Path | None = None, prefix: str = "lab-") -> Path:
    """Create a fresh directory that unprivileged server processes can traverse (mode 0711).

    Postfix's virtual(8) and Dovecot's mail processes run as uid 5000, smtpd and smtp-sink as
    ``postfix``, Dovecot's auth as ``dovecot``: all open absolute paths under the lab (and a
    ``unix:`` milter socket).  Do not use pytest's ``tmp_path`` for this: pytest makes
    ``/tmp/pytest-of-USER`` 0700 again at the start of every session, also while another
    session's servers are running there.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o711)
    return path


def unreachable_ancestor(path: Path) -> Path | None:
    """The first of ``path`` and its ancestors that others may not traverse, if any."""
    for directory in (*reversed(path.parents), path):
        if not directory.stat().st_mode & stat.S_IXOTH:
            return directory
    return None


def _require_reachable(root: Path) -> None:
    blocked = unreachable_ancestor(root)
    if blocked is not None:
        raise LabError(
            f"{blocked} is not searchable by others (mode "
            f"{stat.S_IMODE(blocked.stat().st_mode):o}): server processes running as postfix, "
            f"dovecot and uid {VMAIL_UID} cannot reach {root}; use make_lab_dir()"
        )


def is_listening(port: int, host: str = LOOPBACK) -> bool:
    """Whether a TCP socket is in LISTEN state on ``host:port`` (read from /proc, no connect).

    Connecting would start a server process and add noise to the logs tests read.
    """
    a, b, c, d = (int(part) for part in host.split("."))
    # /proc/net/tcp prints the IPv4 address as the host-order hex of the network-order word.
    wanted = f"{d:02X}{c:02X}{b:02X}{a:02X}:{port:04X}"
    anywhere = f"00000000:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == "0A" and fields[1] in (wanted, anywhere):
                return True
    return False


def _run(argv: Sequence[str], *, timeout: float = 30.0, input_bytes: bytes | None = None) -> str:
    """Run a command, return its combined output, raise :class:`LabError` when it fails.

    Output goes through a temporary file, not a pipe: a daemon forked by the command (Dovecot,
    Postfix's master) inherits it and would keep a pipe open, so reading to EOF would hang.
    """
    with tempfile.TemporaryFile() as output:
        try:
            done = subprocess.run(
                list(argv),
                input=input_bytes,
                stdin=None if input_bytes is not None else subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                env={**os.environ, "PATH": f"{os.environ.get('PATH', '')}:{_SBIN_PATH}"},
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{' '.join(argv)}: no exit within {timeout:g}s") from exc
        output.seek(0)
        text = output.read().decode("utf-8", "replace")
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {done.returncode}\n{text}")
    return text


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# Processes: servers daemonize, so we track them through /proc rather than as our children.


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie counts as gone (init here may be slow to reap it)."""
    info = _proc_stat(pid)
    return info is not None and info[0] not in ("Z", "X")


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(pid: int) -> set[int]:
    """All living descendants of ``pid``."""
    children: dict[int, list[int]] = {}
    for other in _all_pids():
        info = _proc_stat(other)
        if info is not None:
            children.setdefault(info[1], []).append(other)
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return {p for p in found if pid_alive(p)}


def pids_with_environment(name: str, value: str) -> set[int]:
    """Living processes whose environment has ``name=value`` (root can read every environ)."""
    wanted = f"{name}={value}".encode()
    found: set[int] = set()
    for pid in _all_pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if wanted in environ.split(b"\0") and pid_alive(pid):
            found.add(pid)
    return found


def pids_with_cmdline(fragment: str) -> set[int]:
    """Living processes whose command line (or process title) contains ``fragment``."""
    wanted = fragment.encode()
    found: set[int] = set()
    for pid in _all_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if wanted in cmdline and pid_alive(pid):
            found.add(pid)
    return found


def read_pidfile(path: Path) -> int | None:
    """The pid in a daemon's pid file when that process still runs."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    return pid if pid_alive(pid) else None


def _all_gone(pids: set[int]) -> bool:
    return not any(pid_alive(pid) for pid in pids)


def terminate(pids: set[int], grace: float, what: str) -> None:
    """SIGTERM the living ``pids``, SIGKILL what is left after ``grace`` seconds, wait for it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: _all_gone(pids), wait, what=f"{what} to exit")
            return
    raise LabError(f"{what}: processes survived SIGKILL: {sorted(pids)}")


# --------------------------------------------------------------------------------------------
# Users and Maildirs


@dataclass(frozen=True)
class MailUser:
    """A virtual mailbox user known to both Postfix (delivery) and Dovecot (IMAP, POP3, SASL)."""

    address: str
    password: str

    @property
    def local_part(self) -> str:
        return self.address.partition("@")[0]

    @property
    def login(self) -> str:
        """The IMAP/POP3/SASL login: the whole address (what ``{auth_authen}`` will carry)."""
        return self.address


DEFAULT_USERS = (
    MailUser("alice@example.test", "alice-pw"),
    MailUser("bob@example.test", "bob-pw"),
    MailUser("carol@example.test", "carol-pw"),
)


def folder_dir(maildir: Path, folder: str = "INBOX") -> Path:
    """Maildir++ folder directory: ``INBOX`` is the root, ``Sent`` is ``.Sent``."""
    if folder in ("", "INBOX"):
        return maildir
    return maildir / ("." + folder.replace("/", "."))


def make_maildir(
    maildir: Path,
    folders: Sequence[str] = (),
    uid: int = VMAIL_UID,
    gid: int = VMAIL_GID,
) -> Path:
    """Create a Maildir (and Maildir++ ``folders``) owned by ``uid:gid``, mode 0700.

    Directories a root process creates must be chowned, or Dovecot fails with
    "missing +w perm ... dir owned by 0:0".
    """
    for folder in ("INBOX", *folders):
        directory = folder_dir(maildir, folder)
        for sub in (directory, directory / "cur", directory / "new", directory / "tmp"):
            sub.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chown(sub, uid, gid)
        if directory != maildir:
            marker = directory / "maildirfolder"  # Maildir++: marks a subfolder for deliverers
            marker.touch(mode=0o600)
            os.chown(marker, uid, gid)
    return maildir


def maildir_files(maildir: Path, folder: str = "INBOX") -> list[Path]:
    """Message files in ``new/`` and ``cur/`` of a folder, oldest first."""
    directory = folder_dir(maildir, folder)
    found: list[Path] = []
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError):
            found.extend(p for p in (directory / sub).iterdir() if not p.name.startswith("."))
    return sorted(found, key=lambda p: (_mtime_ns(p), p.name))


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:  # renamed (e.g. new/ -> cur/) while we looked
        return 0


def parse_headers(data: bytes) -> Message:
    """Headers of a message (the body is not parsed); ``compat32`` like the raw bytes."""
    return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)


def message_id_of(data: bytes) -> str | None:
    value = parse_headers(data)["Message-ID"]
    return None if value is None else str(value).strip()


def build_message(
    from_addr: str,
    to: Sequence[str],
    subject: str = "lab test",
    *,
    cc: Sequence[str] = (),
    message_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    body: str = "Hello from the lab.\n",
) -> bytes:
    """A minimal RFC 5322 message; no Bcc header (Bcc recipients go in the envelope only).

    Without ``message_id`` the message has none, so Postfix's cleanup adds one for local
    clients: pass one to find the message again with ``wait_message``/``wait_relayed``.
    """
    lines = [f"From: {from_addr}", f"To: {', '.join(to)}"]
    if cc:
        lines.append(f"Cc: {', '.join(cc)}")
    lines.append(f"Subject: {subject}")
    if message_id is not None:
        lines.append(f"Message-ID: {message_id}")
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    lines.extend(["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", ""])
    return ("\r\n".join(lines) + "\r\n" + body.replace("\n", "\r\n")).encode()


def _user_of(users: Sequence[MailUser], who: str) -> MailUser:
    address = who if "@" in who else f"{who}@{LOCAL_DOMAIN}"
    for user in users:
        if user.address == address:
            return user
    raise KeyError(f"no lab user {who!r}")


# --------------------------------------------------------------------------------------------
# The relay sink


@dataclass(frozen=True)
class RelayedMessage:
    """One SMTP transaction that Postfix relayed to an outside domain (an smtp-sink dump)."""

    path: Path
    mail_from: str
    rcpts: tuple[str, ...]
    data: bytes  # the message exactly as Postfix sent it, LF line endings

    @property
    def headers(self) -> Message:
        return parse_headers(self.data)

    @property
    def message_id(self) -> str | None:
        return message_id_of(self.data)


_SINK_FIELDS = (b"X-Client-Addr:", b"X-Client-Proto:", b"X-Helo-Args:", b"X-Mail-Args:")


def parse_sink_dump(path: Path) -> RelayedMessage:
    """Parse an ``smtp-sink -d`` dump (format in smtp-sink(1), "DUMP FILE FORMAT").

    The dump is smtp-sink's own X- records, its three-line ``Received:``, the message as
    received, and one empty line.
    """
    lines = path.read_bytes().split(b"\n")
    mail_from, rcpts, index = "", [], 0
    while index < len(lines) and lines[index].startswith((*_SINK_FIELDS, b"X-Rcpt-Args:")):
        line = lines[index]
        if line.startswith(b"X-Mail-Args:"):
            mail_from = _angle_addr(line)
        elif line.startswith(b"X-Rcpt-Args:"):
            rcpts.append(_angle_addr(line))
        index += 1
    if index >= len(lines) or not lines[index].startswith(b"Received:"):
        raise LabError(f"{path}: not an smtp-sink dump")
    index += 1
    while index < len(lines) and lines[index][:1] in (b" ", b"\t"):
        index += 1
    body = b"\n".join(lines[index:])
    body = body.removesuffix(b"\n")  # the empty line smtp-sink appends after the message
    return RelayedMessage(path, mail_from, tuple(rcpts), body)


def _angle_addr(line: bytes) -> str:
    match = re.search(rb"<([^>]*)>", line)
    return match.group(1).decode("utf-8", "replace") if match else ""


class SmtpSink:
    """Postfix's ``smtp-sink`` on a loopback port, dumping every transaction into ``directory``."""

    def __init__(self, directory: Path, port: int | None = None, log: Path | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.log = log or directory.with_name(directory.name + ".log")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        postfix = pwd.getpwnam("postfix")
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chown(self.directory, postfix.pw_uid, postfix.pw_gid)
        binary = find_binary("smtp-sink") or "smtp-sink"
        argv = [
            binary,
            "-u", "postfix",  # required as root: drop privileges after binding
            "-h", "sink.remote.test",
            "-d", f"{self.directory}/%Y%m%d%H%M%S.",  # strftime + random hex per transaction
            f"{LOOPBACK}:{self.port}",
            "100",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            # Own session: a signal for the test run never reaches it and vice versa.
            self._process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_for(lambda: self._exited() or is_listening(self.port), 10.0, what="smtp-sink")
            if self._exited():
                raise LabError(f"smtp-sink exited:\n{_tail(self.log)}")
        except BaseException:
            self.stop()
            raise

    def _exited(self) -> bool:
        return self._process is None or self._process.poll() is not None

    def is_running(self) -> bool:
        return not self._exited()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5.0)

    def _open_files(self) -> set[str]:
        if self._process is None:
            return set()
        fd_dir = Path(f"/proc/{self._process.pid}/fd")
        targets: set[str] = set()
        with contextlib.suppress(FileNotFoundError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    targets.add(os.readlink(fd))
        return targets

    def messages(self) -> list[RelayedMessage]:
        """Completed transactions, oldest first.

        smtp-sink keeps a dump file open until the transaction ends and its reply to "." carries
        no id, so a file counts as complete once smtp-sink no longer has it open.
        """
        with contextlib.suppress(FileNotFoundError):
            paths = [p for p in self.directory.iterdir() if p.is_file()]
            still_open = self._open_files()  # after listing: a file listed earlier is older
            done = [p for p in paths if str(p) not in still_open]
            return [parse_sink_dump(p) for p in sorted(done, key=lambda p: (_mtime_ns(p), p.name))]
        return []


# --------------------------------------------------------------------------------------------
# Postfix

# Every service runs unchrooted (5th column "n"): chrooted services cannot reach a unix: milter
# socket outside the queue directory.  Same services as Debian's master.cf, minus tlsmgr (no TLS)
# and the pipe(8) examples.
_MASTER_SERVICES = """\
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
local      unix  -       n       n       -       -       local
virtual    unix  -       n       n       -       -       virtual
lmtp       unix  -       -       n       -       -       lmtp
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""


def milter_setting(spec: str) -> str:
    """A Postfix milter list entry that never blocks mail when the milter is down or fails."""
    return f"{{ {spec}, default_action=accept }}"


def transaction(smtp: smtplib.SMTP, mail_from: str, rcpts: Sequence[str], message: bytes) -> bytes:
    """One MAIL/RCPT/DATA transaction; the server's final reply. Raises the :mod:`smtplib`
    errors, ``SMTPRecipientsRefused`` (after RSET) if any recipient is refused."""
    code, reply = smtp.mail(mail_from)
    if code != 250:
        raise smtplib.SMTPSenderRefused(code, reply, mail_from)
    refused: dict[str, tuple[int, bytes]] = {}
    for rcpt in rcpts:
        code, reply = smtp.rcpt(rcpt)
        if code not in (250, 251):
            refused[rcpt] = (code, reply)
    if refused:
        smtp.rset()
        raise smtplib.SMTPRecipientsRefused(refused)
    code, reply = smtp.data(message)
    if code != 250:
        raise smtplib.SMTPDataError(code, reply)
    return reply


class PostfixLab:
    """A private Postfix instance (see the module docstring for layout and routing).

    Listeners on loopback: ``port`` (plain ``smtpd``, like port 25) and ``submission_port``
    (``milter_macro_daemon_name=ORIGINATING``; SASL via Dovecot when ``sasl``).  Clients on
    127.0.0.0/8 are in ``mynetworks`` and may relay without AUTH; ``XCLIENT`` is allowed from
    loopback so a test can pose as a remote client (``XCLIENT ADDR=203.0.113.9``) or as an
    authenticated one (``XCLIENT LOGIN=alice@example.test``).
    """

    def __init__(
        self,
        root: Path,
        *,
        users: Sequence[MailUser] = DEFAULT_USERS,
        aliases: Mapping[str, str] | None = None,
        milter: str | None = None,
        sasl: bool = False,
        extra_main_cf: Mapping[str, str] | None = None,
        submission_options: Mapping[str, str] | None = None,
        extra_master_cf: str = "",
        vmail: Path | None = None,
    ) -> None:
        self.root = root
        self.users = tuple(users)
        self.aliases = dict(aliases or {})
        self.milter = milter
        self.sasl = sasl
        self.extra_main_cf = dict(extra_main_cf or {})
        self.submission_options = dict(submission_options or {})
        self.extra_master_cf = extra_master_cf
        self.config_dir = root / "postfix" / "etc"
        self.queue_dir = root / "postfix" / "spool"
        self.data_dir = root / "postfix" / "data"
        self.maillog = root / "postfix" / "maillog"
        self.vmail = vmail or root / "vmail"
        self.sasl_socket = self.queue_dir / "private" / "auth"
        self.port = free_port()
        self.submission_port = free_port()
        self.sink = SmtpSink(root / "sink")
        self._started = False

    # ---- lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def main_cf(self) -> dict[str, str]:
        """The main.cf settings this lab writes (``extra_main_cf`` last, so it wins)."""
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            # No syslog here: postlogd (the "postlog" service) writes this file.
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
            "myhostname": "mx.example.test",
            "mydomain": LOCAL_DOMAIN,
            "myorigin": "$mydomain",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "smtpd_relay_restrictions": (
                "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
            ),
            "virtual_mailbox_domains": LOCAL_DOMAIN,
            "virtual_mailbox_base": str(self.vmail),
            "virtual_mailbox_maps": f"texthash:{self.config_dir / 'vmailbox'}",
            "virtual_alias_maps": f"texthash:{self.config_dir / 'virtual'}",
            "virtual_uid_maps": f"static:{VMAIL_UID}",
            "virtual_gid_maps": f"static:{VMAIL_GID}",
            "relayhost": f"[{LOOPBACK}]:{self.sink.port}",
            # Room for the 50 MB hostile-input tests; virtual(8) must not cap it either.
            "message_size_limit": str(100 * 1024 * 1024),
            "virtual_mailbox_limit": "0",
            "mailbox_size_limit": "0",
            # Retry deferred mail quickly (tests that stop the sink or a milter).
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            # A transport whose delivery agent failed is retried after this, not 60 s later.
            "transport_retry_time": "1s",
            "milter_default_action": "accept",
        }
        if self.milter is not None:
            settings["smtpd_milters"] = milter_setting(self.milter)
            settings["non_smtpd_milters"] = milter_setting(self.milter)
        if self.sasl:
            settings["smtpd_sasl_type"] = "dovecot"
            # Relative to queue_directory, where Dovecot's auth unix_listener is created.
            settings["smtpd_sasl_path"] = "private/auth"
        settings.update(self.extra_main_cf)
        return settings

    def master_cf(self) -> str:
        submission = {
            "syslog_name": "postfix/submission",
            "milter_macro_daemon_name": "ORIGINATING",
        }
        if self.sasl:
            submission["smtpd_sasl_auth_enable"] = "yes"
        submission.update(self.submission_options)
        lines = [
            f"{LOOPBACK}:{self.port} inet n - n - - smtpd",
            f"{LOOPBACK}:{self.submission_port} inet n - n - - smtpd",
            *(f"  -o {name}={value}" for name, value in submission.items()),
        ]
        return "\n".join(lines) + "\n" + _MASTER_SERVICES + self.extra_master_cf

    def _write_config(self) -> None:
        postfix = pwd.getpwnam("postfix")
        for directory in (self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir(parents=True, exist_ok=True)
        # Config and queue directories stay root-owned; master.lock and the caches live in
        # data_directory, which must belong to mail_owner ("master.lock: Permission denied").
        os.chown(self.data_dir, postfix.pw_uid, postfix.pw_gid)
        self.data_dir.chmod(0o700)
        self.vmail.mkdir(parents=True, exist_ok=True)
        os.chown(self.vmail, VMAIL_UID, VMAIL_GID)
        self.vmail.chmod(0o700)
        for user in self.users:  # so a test can point a config at them before any delivery
            make_maildir(self.vmail / user.local_part)
        main = "".join(f"{name} = {value}\n" for name, value in self.main_cf().items())
        (self.config_dir / "main.cf").write_text(main, encoding="utf-8")
        (self.config_dir / "master.cf").write_text(self.master_cf(), encoding="utf-8")
        # virtual(8): a trailing "/" means Maildir delivery, relative to virtual_mailbox_base.
        mailboxes = "".join(f"{u.address} {u.local_part}/\n" for u in self.users)
        (self.config_dir / "vmailbox").write_text(mailboxes, encoding="utf-8")
        aliases = "".join(f"{alias} {target}\n" for alias, target in self.aliases.items())
        (self.config_dir / "virtual").write_text(aliases, encoding="utf-8")
        # Postfix's dict_load_file() (main.cf, texthash maps) waits in 0.3 s steps until a file
        # is older than a second or two ("pausing to let ... cool down"): every process that
        # reads a fresh file would add ~2 s.  Age them.
        past = time.time() - 60
        for path in self.config_dir.iterdir():
            os.utime(path, (past, past))

    def postfix_command(self, *args: str, timeout: float = 30.0) -> str:
        """Run ``postfix -c CONFIG_DIR ARGS...`` and return its output."""
        return _run(
            [find_binary("postfix") or "postfix", "-c", str(self.config_dir), *args],
            timeout=timeout,
        )

    def start(self) -> None:
        """Write the configuration, start the sink and Postfix; clean up on any failure."""
        if self._started:
            return
        self._started = True
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _require_reachable(self.root)
            self._write_config()
            if len(str(self.queue_dir / "private" / "scache")) > _UNIX_PATH_MAX:
                raise LabError(f"{self.queue_dir}: too long for unix socket paths")
            self.sink.start()
            # start runs "postfix-script check-fatal", which creates the queue subdirectories
            # with their owners and modes (a separate "postfix check" only adds warnings).
            self.postfix_command("start")
            wait_for(
                lambda: is_listening(self.port) and is_listening(self.submission_port),
                10.0,
                what="Postfix listeners",
            )
        except BaseException as exc:
            self.stop()
            if isinstance(exc, TimeoutError | LabError):
                raise LabError(f"Postfix did not start: {exc}\n{_tail(self.maillog)}") from exc
            raise

    def master_pid(self) -> int | None:
        return read_pidfile(self.queue_dir / "pid" / "master.pid")

    def _our_processes(self) -> set[int]:
        # Every Postfix daemon inherits MAIL_CONFIG (import_environment) from postfix(1) -c.
        pids = pids_with_environment("MAIL_CONFIG", str(self.config_dir))
        master = self.master_pid()
        if master is not None:
            pids |= {master} | descendants(master)
        return pids

    def stop(self) -> None:
        """Stop Postfix (stop, then abort, then SIGKILL) and the sink; leave no process behind."""
        if not self._started:
            return
        self._started = False
        try:
            pids = self._our_processes()
            if self.master_pid() is not None:
                try:
                    self.postfix_command("stop", timeout=15.0)
                except LabError:
                    with contextlib.suppress(LabError):
                        self.postfix_command("abort", timeout=15.0)
            pids |= self._our_processes()
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: _all_gone(pids), 10.0, what="Postfix to exit")
            terminate(pids, 2.0, "Postfix")  # stragglers only; normally none are left
        finally:
            self.sink.stop()

    # ---- clients

    def send(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        message: bytes,
        port: int | None = None,
        login: str | None = None,
        password: str | None = None,
        *,
        helo: str = "client.example.test",
        xclient: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> str:
        """Submit one message over SMTP and return Postfix's queue id.

        ``port`` defaults to the plain smtpd listener; pass ``submission_port`` with ``login``
        to authenticate.  ``xclient`` (e.g. ``{"ADDR": "203.0.113.9"}``) makes Postfix treat
        the session as coming from that client (Postfix XCLIENT_README).
        Raises the usual :mod:`smtplib` errors: ``SMTPAuthenticationError``
        (535), ``SMTPSenderRefused``, ``SMTPRecipientsRefused`` if any recipient is refused
        (the transaction is then reset), ``SMTPDataError``.
        """
        with smtplib.SMTP(
            LOOPBACK, port or self.port, local_hostname=helo, timeout=timeout
        ) as smtp:
            smtp.ehlo()
            if xclient:
                attributes = " ".join(f"{name}={value}" for name, value in xclient.items())
                code, reply = smtp.docmd("XCLIENT", attributes)
                if code != 220:
                    raise smtplib.SMTPResponseException(code, reply)
                smtp.ehlo()  # XCLIENT restarts the session at the greeting
            if login is not None:
                smtp.login(login, password or "")
            reply = transaction(smtp, mail_from, rcpts, message)
        match = re.search(rb"queued as ([0-9A-Za-z]+)", reply)
        return match.group(1).decode() if match else reply.decode("utf-8", "replace")

    def sendmail(self, mail_from: str, rcpts: Sequence[str], message: bytes) -> None:
        """Submit with Postfix's sendmail(1) (pickup/cleanup: the ``non_smtpd_milters`` path)."""
        binary = find_binary("sendmail") or "sendmail"
        argv = [binary, "-C", str(self.config_dir), "-f", mail_from, "-i", "--", *rcpts]
        _run(argv, input_bytes=message)

    # ---- observation

    def maillog_text(self) -> str:
        try:
            return self.maillog.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_maillog(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until a maillog line matches the regular expression ``pattern``."""
        regex = re.compile(pattern, re.MULTILINE)
        return wait_for(
            lambda: regex.search(self.maillog_text()), timeout, what=f"maillog /{pattern}/"
        )

    def mailbox(self, user: str) -> Path:
        """Maildir of a lab user (``"alice"`` or ``"alice@example.test"``)."""
        return self.vmail / _user_of(self.users, user).local_part

    def delivered(self, user: str, folder: str = "INBOX") -> list[Path]:
        return maildir_files(self.mailbox(user), folder)

    def wait_delivered(
        self, user: str, count: int, timeout: float = 10.0, folder: str = "INBOX"
    ) -> list[Path]:
        """Wait until the folder holds at least ``count`` messages; return them oldest first."""

        def enough() -> list[Path] | None:
            files = self.delivered(user, folder)
            return files if len(files) >= count else None

        return wait_for(enough, timeout, what=f"{count} message(s) in {user}'s {folder}")

    def wait_message(
        self, user: str, message_id: str, timeout: float = 10.0, folder: str = "INBOX"
    ) -> bytes:
        """Wait for the message with this Message-ID in the user's folder and return it."""

        def find() -> bytes | None:
            for path in self.delivered(user, folder):
                with contextlib.suppress(FileNotFoundError):
                    data = path.read_bytes()
                    if message_id_of(data) == message_id:
                        return data
            return None

        return wait_for(find, timeout, what=f"{message_id} in {user}'s {folder}")

    def relayed(self) -> list[RelayedMessage]:
        """Every transaction relayed to outside domains so far, oldest first."""
        return self.sink.messages()

    def wait_relayed(
        self, message_id: str | None = None, count: int = 1, timeout: float = 10.0
    ) -> list[RelayedMessage]:
        """Wait for ``count`` relayed transactions (only those with ``message_id`` if given)."""

        def find() -> list[RelayedMessage] | None:
            found = [m for m in self.relayed() if message_id is None or m.message_id == message_id]
            return found if len(found) >= count else None

        what = f"{count} relayed message(s)" + (f" with {message_id}" if message_id else "")
        return wait_for(find, timeout, what=what)

    def queue_listing(self) -> str:
        """What ``postqueue -p`` prints for this instance."""
        return _run([find_binary("postqueue") or "postqueue", "-c", str(self.config_dir), "-p"])

    def queue_empty(self) -> bool:
        return "Mail queue is empty" in self.queue_listing()

    def wait_queue_empty(self, timeout: float = 10.0) -> None:
        """Wait for an empty queue; on timeout, say what is left and what the log said last."""
        try:
            wait_for(self.queue_empty, timeout, interval=0.2, what="an empty Postfix queue")
        except TimeoutError as error:
            queue = self.queue_listing()
            tail = "\n".join(self.maillog_text().splitlines()[-60:])
            raise TimeoutError(
                f"{error}\n--- postqueue -p\n{queue}\n--- maillog tail\n{tail}"
            ) from None


# --------------------------------------------------------------------------------------------
# Dovecot


class DovecotLab:
    """A private Dovecot: IMAP and POP3 on loopback, passwd-file users, Maildirs in ``vmail``.

    With ``auth_socket`` (normally ``PostfixLab.sasl_socket``), it also serves SASL to Postfix's
    smtpd there (mode 0660, owner ``postfix``); that directory must already exist, so start
    Postfix first.
    """

    def __init__(
        self,
        root: Path,
        *,
        users: Sequence[MailUser] = DEFAULT_USERS,
        vmail: Path | None = None,
        auth_socket: Path | None = None,
    ) -> None:
        self.root = root
        self.dir = root / "dovecot"
        self.users = tuple(users)
        self.vmail = vmail or root / "vmail"
        self.auth_socket = auth_socket
        self.config_file = self.dir / "dovecot.conf"
        self.users_file = self.dir / "users"
        self.base_dir = self.dir / "run"
        self.state_dir = self.dir / "state"
        self.log_path = self.dir / "dovecot.log"
        self.imap_port = free_port()
        self.pop3_port = free_port()
        # Unique per lab: doveadm and the process titles tell instances apart by it.
        self.instance_name = f"lab{self.imap_port}"
        self._started = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def home(self, user: str) -> Path:
        return self.vmail / _user_of(self.users, user).local_part

    def user(self, user: str) -> MailUser:
        return _user_of(self.users, user)

    def dovecot_conf(self) -> str:
        # Self-contained (no conf.d); Dovecot wants every "{" and "}" on its own line.
        auth_listener = ""
        if self.auth_socket is not None:
            auth_listener = f"""
service auth {{
  unix_listener {self.auth_socket} {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
"""
        return f"""\
protocols = imap pop3
listen = {LOOPBACK}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
instance_name = {self.instance_name}
log_path = {self.log_path}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
# Default 2 s per failed login; wrong-password tests need no delay.
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.users_file}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.users_file}
}}
mail_location = maildir:~
first_valid_uid = {VMAIL_UID}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {LOOPBACK}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {LOOPBACK}
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
# Dovecot's auth penalty (anvil): after a failed login every login from that IP waits 2-15 s.
# Without this socket auth runs with no penalty (Dovecot documents mode = 0 for that).
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
# Mail processes run as uid {VMAIL_UID}, outside the dovecot group: let them report stats.
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
{auth_listener}"""

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.vmail.mkdir(parents=True, exist_ok=True)
        os.chown(self.vmail, VMAIL_UID, VMAIL_GID)
        self.config_file.write_text(self.dovecot_conf(), encoding="utf-8")
        lines = "".join(
            f"{u.login}:{{PLAIN}}{u.password}:{VMAIL_UID}:{VMAIL_GID}::{self.home(u.address)}\n"
            for u in self.users
        )
        self.users_file.write_text(lines, encoding="utf-8")
        # Read by the auth process, which runs as the dovecot user.
        os.chown(self.users_file, 0, pwd.getpwnam("dovecot").pw_gid)
        self.users_file.chmod(0o640)

    def _command(self, binary: str, *args: str, timeout: float = 30.0) -> str:
        return _run(
            [find_binary(binary) or binary, "-c", str(self.config_file), *args], timeout=timeout
        )

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _require_reachable(self.root)
            if self.auth_socket is not None:
                if len(str(self.auth_socket)) > _UNIX_PATH_MAX:
                    raise LabError(f"{self.auth_socket}: too long for a unix socket path")
                if not self.auth_socket.parent.is_dir():
                    raise LabError(f"{self.auth_socket.parent} missing: start Postfix first")
            self._write_config()
            self._command("doveconf", "-n")  # syntax check with a readable error
            self._command("dovecot")
            auth_socket = self.auth_socket

            def ready() -> bool:
                listening = is_listening(self.imap_port) and is_listening(self.pop3_port)
                return listening and (auth_socket is None or auth_socket.is_socket())

            wait_for(ready, 10.0, what="Dovecot listeners")
        except BaseException as exc:
            self.stop()
            if isinstance(exc, TimeoutError | LabError):
                raise LabError(f"Dovecot did not start: {exc}\n{_tail(self.log_path)}") from exc
            raise

    def master_pid(self) -> int | None:
        return read_pidfile(self.base_dir / "master.pid")

    def _our_processes(self) -> set[int]:
        # The master's command line names our config; children are titled "dovecot-INSTANCE/".
        pids = pids_with_cmdline(str(self.config_file))
        pids |= pids_with_cmdline(f"dovecot-{self.instance_name}/")
        master = self.master_pid()
        if master is not None:
            pids |= {master} | descendants(master)
        return pids

    def stop(self) -> None:
        """Stop Dovecot and every process it started."""
        if not self._started:
            return
        self._started = False
        pids = self._our_processes()
        master = self.master_pid()
        if master is not None:
            # What "dovecot stop" does, minus its wait: that polls with kill(pid, 0), which a
            # zombie master (reaped late by this host's init) passes, so it always timed out.
            with contextlib.suppress(ProcessLookupError):
                os.kill(master, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: not pid_alive(master), 10.0, what="Dovecot's master to exit")
        # Children outlive the master while they have clients (auth serving Postfix's smtpd
        # keeps log, anvil and stats busy): they are useless now, end them.
        terminate(pids | self._our_processes(), 5.0, "Dovecot")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    @contextlib.contextmanager
    def imap(self, user: str, password: str | None = None) -> Iterator[imaplib.IMAP4]:
        """An IMAP session logged in as a lab user (logged out on exit)."""
        account = _user_of(self.users, user)
        client = imaplib.IMAP4(LOOPBACK, self.imap_port, timeout=30)
        try:
            client.login(account.login, account.password if password is None else password)
            yield client
        finally:
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                client.logout()


# --------------------------------------------------------------------------------------------
# Both together


@dataclass
class MailLab:
    """Postfix and (optionally) Dovecot sharing users and ``vmail``; Dovecot does Postfix's SASL.

    Use as a context manager, or ``start()``/``stop()``.
    """

    root: Path
    users: Sequence[MailUser] = DEFAULT_USERS
    aliases: Mapping[str, str] = field(default_factory=dict)
    milter: str | None = None
    sasl: bool = True
    dovecot_enabled: bool = True
    extra_main_cf: Mapping[str, str] = field(default_factory=dict)
    submission_options: Mapping[str, str] = field(default_factory=dict)
    extra_master_cf: str = ""
    postfix: PostfixLab = field(init=False)
    dovecot: DovecotLab | None = field(init=False)

    def __post_init__(self) -> None:
        if self.sasl and not self.dovecot_enabled:
            raise ValueError("SASL needs Dovecot")
        self.postfix = PostfixLab(
            self.root,
            users=self.users,
            aliases=self.aliases,
            milter=self.milter,
            sasl=self.sasl,
            extra_main_cf=self.extra_main_cf,
            submission_options=self.submission_options,
            extra_master_cf=self.extra_master_cf,
        )
        self.dovecot = None
        if self.dovecot_enabled:
            self.dovecot = DovecotLab(
                self.root,
                users=self.users,
                vmail=self.postfix.vmail,
                auth_socket=self.postfix.sasl_socket if self.sasl else None,
            )

    @property
    def vmail(self) -> Path:
        return self.postfix.vmail

    def start(self) -> None:
        try:
            self.postfix.start()
            if self.dovecot is not None:
                self.dovecot.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        # Postfix first: its smtpd processes hold connections to Dovecot's auth service.
        try:
            self.postfix.stop()
        finally:
            if self.dovecot is not None:
                self.dovecot.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
