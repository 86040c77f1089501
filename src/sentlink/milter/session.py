"""One pymilter connection object per SMTP session: callbacks -> Envelope + streamed copy.

Never blocks mail (docs/design.md, "Fail open"): every callback answers CONTINUE, whatever goes
wrong is logged as ``QUEUEID: capture failed: reason: detail`` and counted. Only eom changes the
message (libmilter allows header changes there only). Callbacks that never reject are
``@noreply`` so the MTA does not wait for us; callbacks we do not need are negotiated away.
"""

from __future__ import annotations

import enum
import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, TypeVar, cast

import Milter

from sentlink.accounts import Accounts
from sentlink.capture import CopyInProgress, Counters, SentCopyWriter
from sentlink.config.models import AccountConfig, MilterConfig
from sentlink.errors import CaptureError
from sentlink.milter.outbound import OutboundPolicy
from sentlink.model import Envelope
from sentlink.trace import TRACE_HEADER, verify

log = logging.getLogger(__name__)

CONTINUE: int = Milter.CONTINUE
# The only message changes we make: add Message-ID, delete forged trace headers.
ACTIONS: int = Milter.ADDHDRS | Milter.CHGHDRS
NOQUEUE = "NOQUEUE"
_TRACE = TRACE_HEADER.lower()

_P = ParamSpec("_P")
_F = TypeVar("_F", bound=Callable[..., int])


def _noreply(func: _F) -> _F:
    return cast(_F, Milter.noreply(func))


def _nocallback(func: _F) -> _F:
    return cast(_F, Milter.nocallback(func))


def _fail_open(
    func: Callable[Concatenate[SentlinkMilter, _P], int],
) -> Callable[Concatenate[SentlinkMilter, _P], int]:
    """Turn any exception into a logged, counted capture failure and CONTINUE."""

    def wrapper(self: SentlinkMilter, /, *args: _P.args, **kwargs: _P.kwargs) -> int:
        try:
            return func(self, *args, **kwargs)
        except Exception as exc:
            self._capture_failed(exc)
            return CONTINUE

    # Milter.noreply/nocallback look the callback up by __name__: keep it.
    functools.update_wrapper(wrapper, func)
    return wrapper


class Mode(enum.Enum):
    CAPTURE = "capture"  # outbound, account known: build the Sent copy
    INBOUND = "inbound"  # not outbound: only police trace headers
    IGNORE = "ignore"  # outbound without a copy, or capture abandoned


@dataclass
class _Message:
    """State of the message in progress (MAIL FROM to end of message or abort)."""

    queue_id: str
    mail_from: str
    mode: Mode = Mode.IGNORE
    account: AccountConfig | None = None
    login: str | None = None
    skip_reason: str = ""
    skip_note: str = ""
    skip_warn: bool = False
    rcpt_to: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    header_bytes: int = 0
    message_id: str | None = None
    traces: list[tuple[int, str | None]] = field(default_factory=list)
    trace_count: int = 0
    copy: CopyInProgress | None = None


@dataclass(frozen=True)
class MilterDeps:
    """What every connection object needs; built once (cli/serve) and shared."""

    accounts: Accounts
    writer: SentCopyWriter
    secret: bytes
    counters: Counters
    policy: OutboundPolicy
    max_header_bytes: int = 1048576


class DepsHolder:
    """The collaborators that new connections get; replaced whole on a reload (SIGHUP).

    A connection keeps the set it started with, so a reload never changes a session midway.
    """

    def __init__(self, deps: MilterDeps | None = None) -> None:
        self._deps = deps

    @property
    def current(self) -> MilterDeps:
        if self._deps is None:
            raise RuntimeError("milter collaborators not set yet")
        return self._deps

    def replace(self, deps: MilterDeps) -> None:
        self._deps = deps  # one reference assignment: atomic for the connection threads


class ActiveSessions:
    """How many MTA connections are open, so a stop can wait for them (SIGTERM drains)."""

    def __init__(self) -> None:
        self._count = 0
        self._cond = threading.Condition()

    @property
    def count(self) -> int:
        with self._cond:
            return self._count

    def opened(self) -> None:
        with self._cond:
            self._count += 1

    def closed(self) -> None:
        with self._cond:
            self._count -= 1
            if self._count <= 0:
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._count <= 0, timeout)


def make_factory(
    deps: MilterDeps | DepsHolder, sessions: ActiveSessions | None = None
) -> Callable[[], SentlinkMilter]:
    """The per-connection factory to install as ``Milter.factory``."""
    holder = deps if isinstance(deps, DepsHolder) else DepsHolder(deps)

    def factory() -> SentlinkMilter:
        return SentlinkMilter(holder.current, sessions)

    return factory


def deps_from_config(
    milter_config: MilterConfig,
    *,
    accounts: Accounts,
    writer: SentCopyWriter,
    secret: bytes,
    counters: Counters,
) -> MilterDeps:
    return MilterDeps(
        accounts=accounts,
        writer=writer,
        secret=secret,
        counters=counters,
        policy=OutboundPolicy.from_config(milter_config.outbound),
        max_header_bytes=milter_config.max_header_bytes,
    )


def _strip_brackets(addr: str) -> str:
    addr = addr.strip()
    if addr.startswith("<") and addr.endswith(">"):
        return addr[1:-1]
    return addr


def _peer_ip(family: int, hostaddr: object) -> str:
    # pymilter passes (ip, port, ...) for inet/inet6 and the socket path for unix clients.
    if isinstance(hostaddr, tuple) and hostaddr:
        return str(hostaddr[0])
    if isinstance(hostaddr, str) and family in (socket.AF_INET, socket.AF_INET6):
        return hostaddr
    return ""


class SentlinkMilter(Milter.Base):  # type: ignore[misc]
    """One SMTP connection. Created by the factory, so it holds no global state."""

    def __init__(self, deps: MilterDeps, sessions: ActiveSessions | None = None) -> None:
        self._deps = deps
        self._sessions = sessions
        if sessions is not None:
            sessions.opened()
        self._client_addr = ""
        self._daemon_name: str | None = None
        self._msg: _Message | None = None

    # -- negotiation -----------------------------------------------------------------------

    def negotiate(self, opts: list[int]) -> int:
        """Pymilter's negotiation (P_NO*/P_NR* from the decorators), asking only for the
        actions we use: fewer capabilities, less work for the MTA."""
        rc = cast(int, super().negotiate(opts))
        if rc == CONTINUE:
            opts[0] &= ACTIONS
            self._actions = opts[0]
        return rc

    # -- connection-level callbacks ----------------------------------------------------------

    @_noreply
    @_fail_open
    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        self._client_addr = _peer_ip(family, hostaddr)
        # Postfix sends {daemon_name} with the connect macros (milter_connect_macros).
        self._daemon_name = self._macro("{daemon_name}")
        return CONTINUE

    @_nocallback
    def hello(self, hostname: str) -> int:
        return CONTINUE

    @_nocallback
    def data(self) -> int:
        return CONTINUE

    @_nocallback
    def unknown(self, cmd: str) -> int:
        return CONTINUE

    # -- message callbacks -------------------------------------------------------------------

    @_noreply
    @_fail_open
    def envfrom(self, mail_from: str, *params: str) -> int:
        self._drop_message()
        msg = self._msg = _Message(
            queue_id=self._macro("i") or NOQUEUE, mail_from=_strip_brackets(mail_from)
        )
        if self._daemon_name is None:
            self._daemon_name = self._macro("{daemon_name}")
        login = self._macro("{auth_authen}")
        why = self._deps.policy.why_outbound(login, self._daemon_name, self._client_addr)
        if not why:
            msg.mode = Mode.INBOUND
            return CONTINUE
        msg.login = login
        accounts = self._deps.accounts
        if login:
            # An authenticated login only ever gets copies into its own mailbox.
            account = accounts.by_login(login)
            if account is None:
                self._skip(msg, "no_account", f"login {login} has no account: no copy")
            elif not accounts.owns(account, msg.mail_from):
                self._skip(
                    msg, "foreign_sender", f"login {login} sent as {msg.mail_from}: no copy", True
                )
            else:
                msg.account = account
        else:
            account = accounts.by_address(msg.mail_from)
            if account is None:
                self._skip(msg, "no_account", f"sender {msg.mail_from} has no account: no copy")
            else:
                msg.account = account
        if msg.account is not None:
            msg.mode = Mode.CAPTURE
        return CONTINUE

    @_noreply
    @_fail_open
    def envrcpt(self, rcpt: str, *params: str) -> int:
        msg = self._msg
        if msg is not None and msg.mode is Mode.CAPTURE:
            self._refresh_queue_id(msg)
            msg.rcpt_to.append(_strip_brackets(rcpt))
        return CONTINUE

    @_noreply
    @_fail_open
    def header(self, name: str, value: str) -> int:
        msg = self._msg
        if msg is None:
            return CONTINUE
        if msg.mode is Mode.CAPTURE:
            msg.header_bytes += len(name) + len(value) + 2
            if msg.header_bytes > self._deps.max_header_bytes:
                cap = self._deps.max_header_bytes
                raise CaptureError("header_size", f"headers exceed milter.max_header_bytes ({cap})")
            msg.headers.append((name, value))
        elif msg.mode is Mode.INBOUND:
            lname = name.lower()
            if lname == _TRACE:
                msg.trace_count += 1
                msg.header_bytes += len(value)
                # Past the cap we keep only the position: an unverifiable trace is removed.
                kept = value if msg.header_bytes <= self._deps.max_header_bytes else None
                msg.traces.append((msg.trace_count, kept))
            elif lname == "message-id" and msg.message_id is None:
                msg.message_id = value
        return CONTINUE

    @_noreply
    @_fail_open
    def eoh(self) -> int:
        msg = self._msg
        if msg is None or msg.mode is not Mode.CAPTURE or msg.account is None:
            return CONTINUE
        self._refresh_queue_id(msg)
        has_id = any(n.lower() == "message-id" and v.strip() for n, v in msg.headers)
        envelope = Envelope(
            queue_id=msg.queue_id,
            mail_from=msg.mail_from,
            rcpt_to=tuple(msg.rcpt_to),
            client_addr=self._client_addr,
            auth_login=msg.login,
            daemon_name=self._daemon_name,
        )
        writer = self._deps.writer
        new_id = None if has_id else writer.new_message_id()
        msg.copy = writer.begin(msg.account, envelope, msg.headers, new_id)
        msg.headers = []  # written out; do not hold them for the rest of the message
        return CONTINUE

    @_noreply
    @_fail_open
    def body(self, chunk: bytes) -> int:
        msg = self._msg
        if msg is not None and msg.copy is not None:
            msg.copy.write_body(chunk)
        return CONTINUE

    def eom(self) -> int:
        started = time.monotonic()
        try:
            msg = self._msg
            if msg is not None:
                self._refresh_queue_id(msg)
                if msg.mode is Mode.CAPTURE:
                    self._file_copy(msg)
                elif msg.mode is Mode.INBOUND and msg.traces:
                    self._remove_forged_traces(msg)
                elif msg.skip_reason:
                    self._log_skip(msg)
        except Exception as exc:
            self._capture_failed(exc)
        finally:
            self._drop_message()
            # What the MTA waits for at end of message: the copy's fsync and link into cur/.
            self._deps.counters.observe("milter_eom", time.monotonic() - started)
        return CONTINUE

    def abort(self) -> int:
        """The client gave up on this message (RSET, QUIT, lost connection)."""
        try:
            self._drop_message()
        except Exception as exc:
            self._capture_failed(exc)
        return CONTINUE

    def close(self) -> int:
        try:
            self._drop_message()
        except Exception as exc:
            self._capture_failed(exc)
        finally:
            sessions, self._sessions = self._sessions, None
            if sessions is not None:
                sessions.closed()
        return CONTINUE

    # -- helpers -----------------------------------------------------------------------------

    def _macro(self, name: str) -> str | None:
        value = self.getsymval(name)
        return str(value) if value else None

    def _refresh_queue_id(self, msg: _Message) -> None:
        # Postfix knows the queue id only once the queue file exists (after the first valid
        # RCPT with smtpd_delay_open_until_valid_rcpt); {i} comes with later macro sets.
        if msg.queue_id == NOQUEUE:
            msg.queue_id = self._macro("i") or NOQUEUE

    def _skip(self, msg: _Message, reason: str, note: str, warn: bool = False) -> None:
        msg.mode = Mode.IGNORE
        msg.skip_reason = reason
        msg.skip_note = note
        msg.skip_warn = warn

    def _log_skip(self, msg: _Message) -> None:
        level = logging.WARNING if msg.skip_warn else logging.DEBUG
        log.log(level, "%s: %s", msg.queue_id, msg.skip_note)
        self._deps.counters.add("skipped", msg.skip_reason)

    def _file_copy(self, msg: _Message) -> None:
        copy = msg.copy
        if copy is None:
            return
        msg.copy = None
        try:
            # Add the id to the relayed message first: if that fails there is no copy with an
            # id the recipients never saw.
            if copy.added_message_id:
                self.addheader("Message-ID", copy.added_message_id)
            path = copy.finish()
        except BaseException:
            copy.abort()
            raise
        self._deps.counters.add("captured")
        account = msg.account.name if msg.account else "?"
        log.info(
            "%s: captured account=%s message_id=%s file=%s",
            msg.queue_id,
            account,
            copy.message_id,
            path.name,
        )

    def _remove_forged_traces(self, msg: _Message) -> None:
        secret = self._deps.secret
        # From the last occurrence back, so an earlier deletion cannot shift a later index.
        for index, value in reversed(msg.traces):
            if value is not None and msg.message_id and verify(secret, value, msg.message_id):
                continue
            self.chgheader(TRACE_HEADER, index, "")
            self._deps.counters.add("trace_removed")
            log.info("%s: removed unverifiable %s header #%d", msg.queue_id, TRACE_HEADER, index)

    def _drop_message(self) -> None:
        msg, self._msg = self._msg, None
        if msg is not None and msg.copy is not None:
            copy, msg.copy = msg.copy, None
            copy.abort()

    def _capture_failed(self, exc: Exception) -> None:
        msg = self._msg
        queue_id = msg.queue_id if msg is not None else NOQUEUE
        if isinstance(exc, CaptureError):
            reason, detail = exc.reason, str(exc)
        else:
            reason, detail = "internal", f"{type(exc).__name__}: {exc}"
        log.warning("%s: capture failed: %s: %s", queue_id, reason, detail)
        log.debug("%s: capture failure details", queue_id, exc_info=exc)
        self._deps.counters.add("failed", reason)
        if msg is not None:
            msg.mode = Mode.IGNORE
            msg.headers = []
            msg.skip_reason = ""
            if msg.copy is not None:
                copy, msg.copy = msg.copy, None
                try:
                    copy.abort()
                except Exception as abort_exc:
                    log.warning("%s: capture failed: abort: %s", queue_id, abort_exc)
