"""Build the sender's Sent copy from an SMTP envelope and the message as it streams by.

Framework-free: the milter and the SMTP proxy both feed it. The copy is the message as sent plus
what only the server knows (docs/design.md, "The Sent copy"):

- ``Bcc:`` listing the envelope recipients that no To/Cc/Resent-To/Resent-Cc names (RFC 5322
  3.6.3 lets the sender's copy show Bcc recipients; the relayed message never gets it), replacing
  whatever Bcc header the client sent: the envelope is the truth;
- ``Message-ID:`` when the client sent none (the caller adds the same one to the relayed
  message, so both share it);
- the signed trace header (sentlink.trace), replacing any the client sent.

Maildir files use LF line endings, so CRLF from SMTP becomes LF as the body streams through;
the body is never held whole in memory.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from email.utils import format_datetime
from pathlib import Path

from sentlink.addresses import AmbiguousAddressError, normalize_address, parse_mailboxes
from sentlink.config.models import AccountConfig
from sentlink.errors import CaptureError
from sentlink.maildir import FolderCache, MaildirDelivery, Owner, resolve_owner
from sentlink.metrics import Histogram
from sentlink.model import Envelope
from sentlink.trace import TRACE_HEADER, sign

log = logging.getLogger(__name__)

# Headers whose addresses the recipients already see; everyone else on the envelope was Bcc'd.
_VISIBLE_HEADERS = frozenset({"to", "cc", "resent-to", "resent-cc"})
# Headers the copy rebuilds itself; the client's versions are dropped.
_REPLACED_HEADERS = frozenset({"bcc", TRACE_HEADER.lower()})
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_FOLD_WIDTH = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters


class Counters:
    """Thread-safe counts of capture outcomes by reason (exported by the metrics endpoint).

    Events in use: ``captured``, ``skipped`` (reason: why no copy), ``failed`` (reason: the
    CaptureError reason or ``internal``), ``trace_removed``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self.timings: dict[str, Histogram] = {}

    def observe(self, name: str, seconds: float) -> None:
        """Record a duration in the histogram ``sentlink_<name>_seconds``."""
        histogram = self.timings.get(name)
        if histogram is None:
            with self._lock:
                histogram = self.timings.setdefault(
                    name, Histogram(f"sentlink_{name}_seconds", f"Time spent in {name}")
                )
        histogram.observe(seconds)

    def add(self, event: str, reason: str = "") -> None:
        with self._lock:
            self._counts[(event, reason)] = self._counts.get((event, reason), 0) + 1

    def get(self, event: str, reason: str = "") -> int:
        with self._lock:
            return self._counts.get((event, reason), 0)

    def total(self, event: str) -> int:
        with self._lock:
            return sum(n for (name, _), n in self._counts.items() if name == event)

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)


def new_message_id(hostname: str) -> str:
    """A fresh ``<...>`` Message-ID (RFC 5322 3.6.4): time plus 64 random bits, @hostname."""
    host = hostname if _HOSTNAME_RE.fullmatch(hostname) else "localhost"
    return f"<{int(time.time())}.{secrets.token_hex(8)}.sentlink@{host}>"


def _encode(text: str) -> bytes:
    # Header bytes that were not UTF-8 arrive as surrogates (surrogateescape): write them back
    # exactly as received.
    return text.encode("utf-8", "surrogateescape")


def _header_line(name: str, value: str) -> bytes:
    """``name: value`` with the client's folding kept, LF line ends, no line that could end the
    header block or start a new field early."""
    lines = value.replace("\r\n", "\n").split("\n")
    kept = [lines[0]] + [
        line if line[:1] in (" ", "\t") else " " + line for line in lines[1:] if line.strip()
    ]
    body = "\n".join(kept)
    sep = ":" if not body or body[0] in " \t" else ": "
    return _encode(f"{name}{sep}{body}\n")


def _fold_list(name: str, items: Iterable[str]) -> bytes:
    out = f"{name}:"
    line_len = len(out)
    for i, item in enumerate(items):
        piece = (" " if i == 0 else ", ") + item
        if i and line_len + len(piece) > _FOLD_WIDTH:
            out += ",\n " + item
            line_len = 1 + len(item)
        else:
            out += piece
            line_len += len(piece)
    return _encode(out + "\n")


def _normalized(addr: str) -> str:
    try:
        return normalize_address(addr)
    except AmbiguousAddressError:
        return addr.strip().lower()


def visible_recipients(headers: Sequence[tuple[str, str]]) -> set[str]:
    """Normalized addresses named in To/Cc/Resent-To/Resent-Cc.

    Lenient on purpose: a header that cannot be parsed names nobody, so its recipients land in
    the copy's Bcc, which is the harmless direction (linking parses strictly on its own).
    """
    seen: set[str] = set()
    for name, value in headers:
        if name.lower() not in _VISIBLE_HEADERS:
            continue
        try:
            mailboxes = parse_mailboxes(value.replace("\r\n", "\n").replace("\n", " "))
        except AmbiguousAddressError:
            continue
        seen.update(_normalized(addr) for _, addr in mailboxes)
    return seen


def bcc_recipients(envelope: Envelope, headers: Sequence[tuple[str, str]]) -> list[str]:
    """Envelope recipients not named in a visible header, in envelope order, without repeats."""
    visible = visible_recipients(headers)
    bcc: list[str] = []
    for rcpt in envelope.rcpt_to:
        addr = rcpt.strip().removeprefix("<").removesuffix(">")
        norm = _normalized(addr)
        if addr and norm not in visible:
            visible.add(norm)
            bcc.append(addr)
    return bcc


class CopyInProgress:
    """One Sent copy being written: header block already in ``tmp/``, body streaming in."""

    def __init__(
        self, delivery: MaildirDelivery, message_id: str, added_message_id: str | None
    ) -> None:
        self._delivery = delivery
        self._pending_cr = False
        self._open = True
        self.message_id = message_id
        """The Message-ID of the copy (the client's, or the one added)."""
        self.added_message_id = added_message_id
        """The Message-ID the copy got because the client sent none: add it to the relayed
        message too. None when the client sent one."""

    def write_body(self, chunk: bytes) -> None:
        """Append a body chunk, CRLF -> LF; a CR ending one chunk pairs with an LF starting the
        next; a lone CR stays (it is data)."""
        if not self._open:
            raise CaptureError("state", "write to a finished or aborted copy")
        if self._pending_cr:
            self._pending_cr = False
            if chunk.startswith(b"\n"):
                self._delivery.write(b"\n")
                chunk = chunk[1:]
            else:
                self._delivery.write(b"\r")
        if chunk.endswith(b"\r"):
            self._pending_cr = True
            chunk = chunk[:-1]
        if chunk:
            self._delivery.write(chunk.replace(b"\r\n", b"\n"))

    def finish(self) -> Path:
        """File the copy into ``cur/`` with flag S; the path of the new file."""
        if not self._open:
            raise CaptureError("state", "finish of a finished or aborted copy")
        self._open = False
        try:
            if self._pending_cr:
                self._pending_cr = False
                self._delivery.write(b"\r")
            return self._delivery.commit("S")
        except BaseException:
            self._delivery.abort()
            raise

    def abort(self) -> None:
        """Drop the copy (its tmp/ file goes). Harmless after finish or a previous abort."""
        if self._open:
            self._open = False
            self._delivery.abort()


class SentCopyWriter:
    """Starts Sent copies; one per process, shared by all sessions (it holds no message state).

    Keeps the Sent folders it writes into open and checked (maildir.FolderCache), rechecked by
    name before each copy; close() when done (garbage collection and exit close them too).
    """

    def __init__(
        self,
        secret: bytes,
        hostname: str,
        clock: Callable[[], float] = time.time,
        folders: FolderCache | None = None,
    ) -> None:
        self._secret = secret
        self._hostname = hostname
        self._clock = clock
        self._folders = folders if folders is not None else FolderCache()
        # Owner names resolved once (a passwd lookup per message would be on the SMTP path);
        # a reload builds new account objects but the same names map to the same ids.
        self._owners: dict[str | None, Owner] = {}

    def close(self) -> None:
        """Close the cached folders (those in use as soon as their copies are done)."""
        self._folders.close()

    def new_message_id(self) -> str:
        return new_message_id(self._hostname)

    def begin(
        self,
        account: AccountConfig,
        envelope: Envelope,
        headers: Sequence[tuple[str, str]],
        message_id: str | None,
    ) -> CopyInProgress:
        """Open the copy in ``account``'s Sent folder and write its header block.

        ``headers`` are ``(name, value)`` as the client sent them (value without the space
        after the colon, folding kept). ``message_id`` is the id to use when the client sent
        no Message-ID (a fresh one is made when None); see CopyInProgress.added_message_id.
        """
        client_id = next(
            (v.strip() for n, v in headers if n.lower() == "message-id" and v.strip()), None
        )
        added = None if client_id else (message_id or self.new_message_id())
        copy_id = client_id or added or ""
        try:
            trace = sign(self._secret, account.name, copy_id, int(self._clock()))
        except ValueError as exc:
            raise CaptureError("config", str(exc)) from None

        block = bytearray()
        for name, value in headers:
            if name.lower() not in _REPLACED_HEADERS:
                block += _header_line(name, value)
        if added:
            block += _header_line("Message-ID", added)
        if not any(n.lower() == "date" for n, _ in headers):
            # RFC 5322 3.6 requires Date; the MTA adds one to the relayed message (Sendmail
            # only after the milters), and mail clients sort the Sent folder by it.
            block += _header_line("Date", format_datetime(datetime.now().astimezone()))
        bcc = bcc_recipients(envelope, headers)
        if bcc:
            block += _fold_list("Bcc", bcc)
        block += _header_line(TRACE_HEADER, trace)
        block += b"\n"

        try:
            owner = self._owners.get(account.owner)
            if owner is None:
                owner = self._owners.setdefault(account.owner, resolve_owner(account.owner))
            # start() creates the Maildir and the folder (with its maildirfolder marker and
            # subscription) when missing, as ensure_folder() does.
            delivery = MaildirDelivery.start(
                account.maildir, account.sent_folder, owner, self._folders
            )
        except OSError as exc:
            raise CaptureError("io", f"{account.maildir}: {exc}") from exc
        try:
            delivery.write(bytes(block))
        except BaseException:
            delivery.abort()
            raise
        return CopyInProgress(delivery, copy_id, added)
