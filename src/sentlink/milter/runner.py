"""Run the milter: socket set-up Postfix can reach, then libmilter's main loop."""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
import stat
import threading
from pathlib import Path

import Milter
import milter

from sentlink.accounts import Accounts
from sentlink.capture import Counters, SentCopyWriter
from sentlink.config.listen import parse_listen
from sentlink.config.models import Config
from sentlink.errors import ConfigError, SentlinkError
from sentlink.milter.session import (
    ACTIONS,
    ActiveSessions,
    DepsHolder,
    deps_from_config,
    make_factory,
)
from sentlink.secret import load_or_create_secret

log = logging.getLogger(__name__)

MILTER_NAME = "sentlink"
_STOP_POLL_SECONDS = 0.2
# How long a stop waits for open MTA connections to finish (serve allows 20 s per component).
DRAIN_SECONDS = 15.0
_STOP_WAKE_INTERVAL = 0.05
_STOP_WAKE_LIMIT_SECONDS = 6.0  # past libmilter's poll timeout the stop gets through anyway


def libmilter_conn(listen: str) -> tuple[str, Path | None]:
    """The smfi_setconn(3) spec for ``milter.listen`` and, for a unix socket, its absolute path
    (made absolute so chmod/chown and removal do not depend on a later chdir)."""
    try:
        sock = parse_listen(listen)
    except ValueError as exc:
        raise ConfigError([f"milter.listen: {exc}"]) from None
    if sock.family == "unix" and sock.path is not None:
        path = sock.path.absolute()
        return f"unix:{path}", path
    if sock.family in ("inet", "inet6"):
        return f"{sock.family}:{sock.port}@{sock.host}", None
    # libmilter creates and binds its listening socket itself: an inherited one cannot be used.
    raise ConfigError([f"milter.listen: {listen!r}: libmilter cannot use an inherited socket"])


def _socket_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError([f"milter.socket_mode: not an octal mode: {text!r}"]) from None
    if not 0 <= mode <= 0o777:
        raise ConfigError([f"milter.socket_mode: out of range: {text!r}"])
    return mode


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ConfigError([f"milter.socket_group: no such group: {group!r}"]) from None


def warn_if_unreachable(path: Path, gid: int | None) -> None:
    """Warn when a directory above the socket keeps the MTA's unprivileged user out.

    Postfix connects as the ``postfix`` user (smtpd, cleanup): every directory on the way needs
    search permission for it, through "other" bits or the socket group's bits.
    """
    for directory in path.resolve().parents:
        try:
            st = directory.stat()
        except OSError:
            return
        searchable = st.st_mode & stat.S_IXOTH or (
            gid is not None and st.st_gid == gid and st.st_mode & stat.S_IXGRP
        )
        if not searchable:
            log.warning(
                "milter socket %s: directory %s (mode %04o) is not searchable by other users; "
                "Postfix's smtpd/cleanup may fail to connect (Permission denied)",
                path,
                directory,
                stat.S_IMODE(st.st_mode),
            )
            return


def remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a previous run; refuse to touch a live one or a non-socket."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SentlinkError(f"{path}: exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SentlinkError(f"{path}: cannot tell whether the socket is in use: {exc}") from exc
    else:
        raise SentlinkError(f"{path}: another milter is listening on this socket")
    finally:
        probe.close()
    path.unlink(missing_ok=True)


def stop_milter() -> None:
    """Ask libmilter to stop accepting connections and return from its main loop.

    Safe from another thread or a signal handler.
    """
    milter.stop()


def _register_callbacks() -> None:
    # The same wiring as Milter.runmilter(), which we cannot use because it opens the socket
    # and enters main() in one step, leaving no moment to set the socket's mode and group.
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)


def run_milter(
    config: Config,
    stop_event: threading.Event | None = None,
    *,
    counters: Counters | None = None,
    accounts: Accounts | None = None,
    writer: SentCopyWriter | None = None,
    secret: bytes | None = None,
    holder: DepsHolder | None = None,
) -> None:
    """Serve the milter until stopped (``stop_event`` set, :func:`stop_milter`, or SIGTERM /
    SIGINT / SIGHUP, which libmilter handles itself when this runs in the main thread).

    Collaborators not given are built from ``config``. libmilter keeps process-wide state:
    run one milter per process.
    """
    milter_config = config.milter
    if milter_config is None:
        raise ConfigError(["no milter: section in the configuration"])
    if secret is None:
        secret = load_or_create_secret(config.site_secret_file)
    deps = deps_from_config(
        milter_config,
        accounts=accounts if accounts is not None else Accounts(config.accounts),
        writer=writer if writer is not None else SentCopyWriter(secret, _hostname()),
        secret=secret,
        counters=counters if counters is not None else Counters(),
    )
    conn, path = libmilter_conn(milter_config.listen)
    mode = _socket_mode(milter_config.socket_mode)
    gid = _group_id(milter_config.socket_group) if milter_config.socket_group else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_socket(path)

    if holder is not None:
        holder.replace(deps)
    sessions = ActiveSessions()
    Milter.factory = make_factory(holder if holder is not None else deps, sessions)
    Milter.set_flags(ACTIONS)
    # pymilter's default turns an exception escaping a callback into 451; we never block mail.
    Milter.set_exception_policy(Milter.CONTINUE)
    _register_callbacks()
    milter.setconn(conn)
    milter.settimeout(milter_config.timeout)
    milter.register(
        MILTER_NAME,
        data=lambda ctx: ctx.getpriv().data(),
        unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
        negotiate=Milter.negotiate_callback,
    )
    try:
        milter.opensocket(True)
    except milter.error as exc:
        raise SentlinkError(f"milter cannot listen on {conn}: {exc}") from None
    try:
        if path is not None:
            # Before main(): Postfix's unprivileged smtpd/cleanup must be able to connect from
            # the first message on.
            os.chmod(path, mode)
            if gid is not None:
                os.chown(path, -1, gid)
            warn_if_unreachable(path, gid)
        _serve(conn, stop_event, Drain(sessions, path))
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
            _draining_path(path).unlink(missing_ok=True)
        if writer is None:  # built here: close its cached folders
            deps.writer.close()
        log.info("milter stopped")


class Drain:
    """A stop that lets the MTA connections in flight finish first (SIGTERM drains).

    libmilter's smfi_stop() ends the sessions in flight too, so it comes last: first the
    socket's name moves aside, so new connections fail at once (the MTA's default_action=accept
    takes over), then the open sessions get up to DRAIN_SECONDS to finish their messages.
    """

    def __init__(self, sessions: ActiveSessions, path: Path | None) -> None:
        self._sessions = sessions
        self._path = path

    def begin(self, conn: str) -> str:
        """Stop taking connections; the address to wake the listener through afterwards."""
        if self._path is None:
            return conn
        aside = _draining_path(self._path)
        try:
            os.replace(self._path, aside)
        except OSError as exc:
            log.warning("cannot move the milter socket aside: %s", exc)
            return conn
        return f"unix:{aside}"

    def wait(self) -> None:
        if self._sessions.count and not self._sessions.wait_idle(DRAIN_SECONDS):
            log.warning("milter stopping with %d MTA connections still open", self._sessions.count)


def _draining_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.draining")


def _serve(conn: str, stop_event: threading.Event | None, drain: Drain | None = None) -> None:
    if stop_event is not None and stop_event.is_set():
        return
    finished = threading.Event()
    waiter = None
    if stop_event is not None:
        waiter = threading.Thread(
            target=_stop_when_set,
            args=(stop_event, finished, conn, drain),
            name="milter-stop",
            daemon=True,
        )
        waiter.start()
    log.info("milter listening on %s", conn)
    try:
        milter.main()
    except milter.error:
        # smfi_main() fails when the stop came before it started listening.
        if stop_event is None or not stop_event.is_set():
            raise
    finally:
        finished.set()
        if waiter is not None:
            waiter.join()


def _hostname() -> str:
    """The host part for Message-IDs we create (RFC 5322 3.6.4 asks for a domain name)."""
    fqdn = socket.getfqdn()
    return fqdn if "." in fqdn and not fqdn.startswith("localhost") else socket.gethostname()


def _stop_when_set(
    stop_event: threading.Event, finished: threading.Event, conn: str, drain: Drain | None
) -> None:
    while not finished.is_set():
        if stop_event.wait(_STOP_POLL_SECONDS):
            if drain is not None:
                conn = drain.begin(conn)
                drain.wait()
            _stop_promptly(finished, conn)
            return


def _stop_promptly(finished: threading.Event, conn: str) -> None:
    """smfi_stop(), without waiting out libmilter's 5 s listener poll.

    smfi_stop() needs the listener's mutex, which the listener holds while it polls; a
    connection to our own socket ends that poll and makes it let go. Connect until the stop
    got through (the listener may take the mutex back first).
    """
    stopper = threading.Thread(target=stop_milter, name="milter-stop-call", daemon=True)
    stopper.start()
    for _ in range(int(_STOP_WAKE_LIMIT_SECONDS / _STOP_WAKE_INTERVAL)):
        stopper.join(_STOP_WAKE_INTERVAL)
        if not stopper.is_alive() or finished.is_set():
            break
        _wake_listener(conn)
    stopper.join()


def _wake_listener(conn: str) -> None:
    """Connect once to our own socket (and hang up): it wakes libmilter's listener."""
    kind, _, rest = conn.partition(":")
    try:
        if kind == "unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(rest)
        else:
            port, _, host = rest.partition("@")
            if host in ("", "0.0.0.0", "::", "[::]"):
                host = "::1" if kind == "inet6" else "127.0.0.1"
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                pass
    except OSError:
        pass  # stopping anyway, only later
