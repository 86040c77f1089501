"""A private, real Sendmail for integration tests, unpacked from Debian's packages.

Debian's ``sendmail-bin`` conflicts with ``postfix`` as an installed package, so the packages are
fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into a cache directory
(:func:`fetch_sendmail`), never installed.  :class:`SendmailLab` builds a ``sendmail.cf`` with
Sendmail's own m4 files from a private ``.mc`` that includes a milter snippet (normally the
shipped ``contrib/sendmail/sentlink.mc``), and runs that binary as a foreground daemon
(``-bD -C``) on a loopback high port with its queue, pid and status files under the lab.

Every recipient is relayed to Postfix's ``smtp-sink`` on loopback (``SMART_HOST``), so a test
reads exactly what left the server (:meth:`SendmailLab.wait_relayed`).

Sendmail insists on a fully qualified host name at start-up (unqualified, it sleeps 60 s and
asks DNS) and canonifies addresses through the resolver.  The daemon therefore runs in its own
UTS and mount namespaces (``unshare``): host name ``mx.example.test``, and private bind mounts of
``/etc/hosts``, ``/etc/nsswitch.conf`` (files only) and ``/etc/resolv.conf`` (loopback), so no
lookup leaves the host and the host's own files stay untouched.  SMTP AUTH uses Cyrus SASL with
a lab sasldb (written by ``saslpasswd2`` from ``sasl2-bin``, also only unpacked); its
``Sendmail.conf`` is bind-mounted over ``/usr/lib/sasl2`` the same way.  Sendmail logs only to
syslog, which is absent here: its start-up errors land in ``sendmail.log``.

Run this file as a script (root) to fill the cache ahead of time, e.g. before going offline.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from lab import (
    LOOPBACK,
    LabError,
    MailUser,
    RelayedMessage,
    SmtpSink,
    find_binary,
    free_port,
    is_listening,
    make_lab_dir,
    pid_alive,
    transaction,
    wait_for,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_SNIPPET = REPO_ROOT / "contrib" / "sendmail" / "sentlink.mc"
CACHE_ENV = "SENTLINK_TEST_CACHE"
DEFAULT_CACHE = Path("/var/cache/sentlink-test")
HOSTNAME = "mx.example.test"
DAEMON_NAME = "ORIGINATING"

# m4 builds the .cf (sendmail-cf depends on it, so it may not be installed); sasl2-bin's
# saslpasswd2 writes the lab's SASL password database.
_PACKAGES = ("sendmail-bin", "sendmail-cf", "m4", "sasl2-bin")
_SENDMAIL = "usr/libexec/sendmail/sendmail"
_SASLPASSWD = "usr/sbin/saslpasswd2"
_M4 = "usr/bin/m4"
_CF_DIR = "usr/share/sendmail/cf"
_MILTER_SOCKET = re.compile(r"S=(unix|local):[^,')]+")


def cache_dir(env: dict[str, str] | None = None) -> Path:
    """Where unpacked packages are kept: ``$SENTLINK_TEST_CACHE`` or /var/cache/sentlink-test."""
    value = (env if env is not None else os.environ).get(CACHE_ENV)
    return Path(value) if value else DEFAULT_CACHE


@dataclass(frozen=True)
class SendmailDist:
    """Sendmail's binary and cf/ tree unpacked under ``root``, and an m4 to build a .cf with."""

    root: Path
    m4: str

    @property
    def sendmail(self) -> Path:
        return self.root / _SENDMAIL

    @property
    def cf_dir(self) -> Path:
        return self.root / _CF_DIR

    @property
    def saslpasswd(self) -> Path:
        return self.root / _SASLPASSWD

    def version(self) -> str:
        return (self.root / ".packages").read_text(encoding="utf-8").strip()


def _run(argv: Sequence[str], cwd: Path | None = None, timeout: float = 120.0) -> str:
    done = subprocess.run(
        list(argv),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
    )
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode("utf-8", "replace")
        raise LabError(f"{' '.join(argv)}: exit {done.returncode}\n{output[-2000:]}")
    return done.stdout.decode("utf-8", "replace")


def _download(packages: Sequence[str], into: Path) -> list[Path]:
    """``apt-get download`` (once more after ``apt-get update`` when the lists are missing)."""
    apt_get = find_binary("apt-get")
    if apt_get is None:
        raise LabError("apt-get not found: cannot fetch Sendmail's Debian packages")
    try:
        _run([apt_get, "-q", "download", *packages], cwd=into)
    except LabError:
        _run([apt_get, "-q", "update"], timeout=300.0)
        _run([apt_get, "-q", "download", *packages], cwd=into)
    return sorted(into.glob("*.deb"))


def fetch_sendmail(cache: Path | None = None) -> SendmailDist:
    """Sendmail unpacked in the cache, downloading and unpacking it on first use (needs root).

    Safe against concurrent test sessions: one unpacks under a lock, into a temporary directory
    renamed into place when complete.  Raises :class:`LabError` when it cannot be had.
    """
    base = cache or cache_dir()
    root = base / "sendmail"
    if os.geteuid() != 0:
        raise LabError("fetching Sendmail's packages needs root (apt-get download, dpkg -x)")
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".sendmail.lock", "w", encoding="ascii") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(root):
            _unpack_into(base, root)
    return SendmailDist(root, find_binary("m4") or str(root / _M4))


def _complete(root: Path) -> bool:
    needed = (".packages", _SENDMAIL, f"{_CF_DIR}/m4/cf.m4", _M4, _SASLPASSWD)
    return all((root / name).is_file() for name in needed)


def check_namespaces() -> None:
    """Raise :class:`LabError` unless this process may create the namespaces Sendmail runs in
    (root without CAP_SYS_ADMIN, as in a default Docker container, may not)."""
    unshare = find_binary("unshare")
    if unshare is None:
        raise LabError("unshare (util-linux) not found")
    _run([unshare, "--uts", "--mount", "--", "true"], timeout=10.0)


def _unpack_into(base: Path, root: Path) -> None:
    dpkg = find_binary("dpkg") or "dpkg"
    work = Path(tempfile.mkdtemp(prefix="sendmail-", dir=base))
    try:
        # Root-only directories: nobody else may slip a .deb in before we unpack it as root
        # (apt then says it downloads "unsandboxed as root": expected).
        debs = work / "debs"
        debs.mkdir(mode=0o700)
        files = _download(_PACKAGES, debs)
        if len(files) != len(_PACKAGES):
            raise LabError(f"apt-get download {' '.join(_PACKAGES)} gave {files}")
        unpacked = work / "root"
        for deb in files:
            _run([dpkg, "-x", str(deb), str(unpacked)])
        (unpacked / ".packages").write_text(
            "\n".join(deb.name for deb in files) + "\n", encoding="utf-8"
        )
        if not _complete(unpacked):
            raise LabError(f"{[deb.name for deb in files]}: files missing after dpkg -x")
        unpacked.chmod(0o755)
        if root.exists():  # from an older, smaller package set
            root.rename(work / "old")
        unpacked.rename(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def milter_snippet(snippet: str, socket_path: Path) -> str:
    """The shipped snippet with its ``S=unix:...`` socket pointed at ``socket_path``.

    Everything else (flags, timeouts, macro lists) stays as shipped.
    """
    text, count = _MILTER_SOCKET.subn(f"S=unix:{socket_path}", snippet)
    if count != 1:
        raise LabError(f"the milter snippet has {count} S=unix: sockets, expected one")
    return text


class SendmailLab:
    """A private Sendmail daemon on ``127.0.0.1:port`` relaying everything to an smtp-sink.

    The listener is ``DAEMON_OPTIONS(Name=ORIGINATING)``, so ``{daemon_name}`` marks its
    sessions outbound for sentlink.  With ``milter_socket``, the private .mc includes
    ``snippet`` (default: the shipped contrib/sendmail/sentlink.mc) pointed at that socket.
    ``sasl_users`` may log in with SMTP AUTH (login ``user@realm``, PLAIN, LOGIN or CRAM-MD5).

    Layout under ``root``: ``sendmail.mc``, ``sentlink.mc`` (the included snippet),
    ``sendmail.cf``, ``queue/``, ``etc/`` (hosts, nsswitch.conf, resolv.conf, service.switch),
    ``sasl/`` (Sendmail.conf, sasldb2), ``sendmail.log``, ``sink/``.
    """

    def __init__(
        self,
        root: Path,
        dist: SendmailDist,
        *,
        milter_socket: Path | None = None,
        snippet: Path = SHIPPED_SNIPPET,
        sasl_users: Sequence[MailUser] = (),
    ) -> None:
        self.root = root
        self.dist = dist
        self.milter_socket = milter_socket
        self.snippet = snippet
        self.port = free_port()
        self.sink = SmtpSink(root / "sink")
        self.queue_dir = root / "queue"
        self.etc = root / "etc"
        self.mc_file = root / "sendmail.mc"
        self.cf_file = root / "sendmail.cf"
        self.snippet_file = root / "sentlink.mc"
        self.log_path = root / "sendmail.log"
        self.sasl_users = tuple(sasl_users)
        self.sasl_dir = root / "sasl"
        self._process: subprocess.Popen[bytes] | None = None

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

    # ---- configuration

    def mc(self) -> str:
        """The private sendmail.mc (m4 input)."""
        sink = self.sink.port
        milter = f"include(`{self.snippet_file}')dnl\n" if self.milter_socket else ""
        return f"""\
divert(0)dnl
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `{HOSTNAME}')dnl
define(`QUEUE_DIR', `{self.queue_dir}')dnl
define(`STATUS_FILE', `{self.root}/sendmail.st')dnl
define(`confPID_FILE', `{self.root}/sendmail.pid')dnl
define(`HELP_FILE', `{self.root}/helpfile')dnl
define(`ALIAS_FILE', `')dnl
define(`confSERVICE_SWITCH_FILE', `{self.etc}/service.switch')dnl
define(`confHOSTS_FILE', `{self.etc}/hosts')dnl
dnl # No interface probing (reverse lookups of every address), no ident callbacks.
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confTO_IDENT', `0')dnl
dnl # A busy test host must not make Sendmail queue mail for later or refuse connections.
define(`confQUEUE_LA', `1000')dnl
define(`confREFUSE_LA', `1000')dnl
dnl # The lab lives under /tmp: a sticky world-writable ancestor is safe for the socket path.
define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl
FEATURE(`no_default_msa')dnl
FEATURE(`nocanonify')dnl
FEATURE(`accept_unresolvable_domains')dnl
define(`SMART_HOST', `esmtp:[{LOOPBACK}]')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {sink}')dnl
dnl # SMTP AUTH against the lab's sasldb (Cyrus SASL, Sendmail.conf in sasl/).
define(`confAUTH_MECHANISMS', `PLAIN LOGIN CRAM-MD5')dnl
TRUST_AUTH_MECH(`PLAIN LOGIN CRAM-MD5')dnl
DAEMON_OPTIONS(`Port={self.port}, Addr={LOOPBACK}, Name={DAEMON_NAME}')dnl
{milter}MAILER(`local')dnl
MAILER(`smtp')dnl
"""

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(mode=0o700, exist_ok=True)
        self.etc.mkdir(exist_ok=True)
        hosts = f"{LOOPBACK} {HOSTNAME} localhost\n::1 {HOSTNAME} localhost\n"
        (self.etc / "hosts").write_text(hosts, encoding="ascii")
        (self.etc / "nsswitch.conf").write_text(
            "passwd: files\ngroup: files\nshadow: files\nhosts: files\n", encoding="ascii"
        )
        (self.etc / "resolv.conf").write_text(f"nameserver {LOOPBACK}\n", encoding="ascii")
        (self.etc / "service.switch").write_text("hosts files\naliases files\n", "ascii")
        self._write_sasl()
        if self.milter_socket is not None:
            text = self.snippet.read_text(encoding="utf-8")
            self.snippet_file.write_text(milter_snippet(text, self.milter_socket), "utf-8")
        self.mc_file.write_text(self.mc(), encoding="utf-8")
        self.cf_file.write_text(self.build_cf(), encoding="utf-8")

    def _write_sasl(self) -> None:
        """Cyrus SASL's Sendmail.conf and a sasldb holding ``sasl_users``.

        Sendmail refuses a group-readable sasldb (DontBlameSendmail GroupReadableSASLDBFile).
        """
        self.sasl_dir.mkdir(exist_ok=True)
        sasldb = self.sasl_dir / "sasldb2"
        (self.sasl_dir / "Sendmail.conf").write_text(
            f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {sasldb}\n"
            "mech_list: PLAIN LOGIN CRAM-MD5\n",
            encoding="ascii",
        )
        for user in self.sasl_users:
            local, _, realm = user.login.partition("@")
            argv = [str(self.dist.saslpasswd), "-p", "-c", "-f", str(sasldb), "-u", realm, local]
            done = subprocess.run(
                argv, input=user.password.encode(), capture_output=True, timeout=30, check=False
            )
            if done.returncode != 0:
                raise LabError(f"{' '.join(argv)}: {done.stderr.decode('utf-8', 'replace')}")
        if sasldb.exists():
            sasldb.chmod(0o600)

    def build_cf(self) -> str:
        """Run Sendmail's cf.m4 over the private .mc and return the .cf text.

        Sendmail's m4 files report configuration mistakes with ``errprint``, which leaves m4's
        exit status at 0: any output on stderr fails too.
        """
        cf_dir = self.dist.cf_dir
        done = subprocess.run(
            [
                self.dist.m4,
                f"-D_CF_DIR_={cf_dir}/",
                str(cf_dir / "m4" / "cf.m4"),
                str(self.mc_file),
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
        errors = done.stderr.decode("utf-8", "replace").strip()
        if done.returncode != 0 or errors:
            raise LabError(f"m4 {self.mc_file}: exit {done.returncode}\n{errors}")
        return done.stdout.decode("utf-8")

    # ---- lifecycle

    def _daemon_argv(self) -> list[str]:
        unshare = find_binary("unshare") or "unshare"
        binds = " && ".join(
            [
                *(
                    f"mount --bind {self.etc / name} /etc/{name}"
                    for name in ("hosts", "nsswitch.conf", "resolv.conf")
                ),
                # Cyrus SASL reads <service>.conf from its configuration directory.
                f"mount --bind {self.sasl_dir} /usr/lib/sasl2",
            ]
        )
        script = f'{binds} && hostname {HOSTNAME} && exec "$0" -bD -C {self.cf_file}'
        # unshare execs sh in place and sh execs Sendmail: the pid we hold is the daemon's.
        return [unshare, "--uts", "--mount", "--", "/bin/sh", "-c", script, str(self.dist.sendmail)]

    def start(self) -> None:
        """Start the sink and Sendmail; clean up on any failure."""
        if self._process is not None:
            return
        try:
            self._write_config()
            self.sink.start()
            with open(self.log_path, "ab") as log:
                self._process = subprocess.Popen(
                    self._daemon_argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.root,
                    start_new_session=True,
                )
            wait_for(
                lambda: not self.is_running() or is_listening(self.port), 15.0, what="Sendmail"
            )
            if not self.is_running():
                raise LabError(f"Sendmail exited:\n{self.log_text()}")
        except BaseException as exc:
            self.stop()
            if isinstance(exc, TimeoutError):
                raise LabError(f"Sendmail did not start: {exc}\n{self.log_text()}") from exc
            raise

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Stop the daemon and the children it forked (one per session), then the sink."""
        process, self._process = self._process, None
        try:
            if process is not None:
                group = process.pid  # start_new_session: its own process group
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(group, sig)
                    try:
                        process.wait(timeout=10.0)
                        wait_for(lambda: not _group_alive(group), 5.0, what="Sendmail's children")
                        break
                    except (subprocess.TimeoutExpired, TimeoutError):
                        continue
        finally:
            self.sink.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    # ---- clients and observation

    def send(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        message: bytes,
        *,
        login: str | None = None,
        password: str | None = None,
        helo: str = "client.example.test",
        timeout: float = 30.0,
    ) -> str:
        """Submit one message over SMTP and return Sendmail's queue id.

        Raises the :mod:`smtplib` errors, ``SMTPRecipientsRefused`` if any recipient is refused.
        """
        with smtplib.SMTP(LOOPBACK, self.port, local_hostname=helo, timeout=timeout) as smtp:
            smtp.ehlo()
            if login is not None:
                smtp.login(login, password or "")
            reply = transaction(smtp, mail_from, rcpts, message)
        # "250 2.0.0 6AS3ZkIk008273 Message accepted for delivery"
        match = re.search(rb"(\S+) Message accepted", reply)
        return match.group(1).decode() if match else reply.decode("utf-8", "replace")

    def relayed(self) -> list[RelayedMessage]:
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


def _group_alive(pgid: int) -> bool:
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = Path(f"/proc/{name}/stat").read_text(encoding="ascii", errors="replace")
            fields = raw[raw.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and pid_alive(int(name)):
                return True
    return False


@contextlib.contextmanager
def sendmail_lab(
    parent: Path,
    dist: SendmailDist,
    milter_socket: Path | None = None,
    sasl_users: Sequence[MailUser] = (),
) -> Iterator[SendmailLab]:
    """A started :class:`SendmailLab` in a new directory under ``parent``, stopped on exit."""
    root = make_lab_dir(parent, prefix="sendmail-")
    with SendmailLab(root, dist, milter_socket=milter_socket, sasl_users=sasl_users) as lab:
        yield lab


if __name__ == "__main__":
    found = fetch_sendmail()
    print(f"{found.sendmail}\n{found.version()}", file=sys.stdout)
