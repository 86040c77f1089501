"""Filing the Sent copy from a whole message (runs in a worker thread, off the event loop)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from sentlink.capture import SentCopyWriter
from sentlink.config.models import AccountConfig
from sentlink.headers import parse_header_bytes, read_header_bytes
from sentlink.maildir import list_messages
from sentlink.model import Envelope
from sentlink.proxy.spool import Spool
from sentlink.trace import TRACE_HEADER, canonical_message_id, verify

log = logging.getLogger(__name__)

# Postfix gives up on a queued message after maximal_queue_lifetime (default 5d): a retry of
# the content filter can only come that late, so older copies need not be looked at.
RETRY_WINDOW_SECONDS = 5 * 86400


def write_copy(
    writer: SentCopyWriter,
    account: AccountConfig,
    envelope: Envelope,
    headers: Sequence[tuple[str, str]],
    spool: Spool,
    body_start: int,
    message_id: str | None,
) -> Path:
    """Write ``account``'s copy of the spooled message and file it into ``cur/``."""
    copy = writer.begin(account, envelope, headers, message_id)
    try:
        for chunk in spool.chunks(body_start):
            copy.write_body(chunk)
        return copy.finish()
    except BaseException:
        copy.abort()
        raise


def write_copy_once(
    index: CopyIndex,
    writer: SentCopyWriter,
    account: AccountConfig,
    envelope: Envelope,
    headers: Sequence[tuple[str, str]],
    spool: Spool,
    body_start: int,
    message_id: str,
) -> Path | None:
    """write_copy(), unless ``index`` knows a copy of ``message_id`` already (None then).

    One call, so one hand-off to the worker thread per message."""
    if index.contains(account, message_id):
        return None
    path = write_copy(writer, account, envelope, headers, spool, body_start, None)
    index.add(account, message_id)
    return path


class CopyIndex:
    """Message-IDs that already have a copy of ours in an account's Sent folder.

    The content filter consults it before filing, so a message Postfix hands over again (after
    a 4xx, a crash or a lost reply) gets no second copy. Per account it is loaded once from the
    folder (copies whose signed trace header verifies for that account, from the retry window),
    then kept current by ``add``. Thread-safe.
    """

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._lock = threading.Lock()
        self._ids: dict[str, set[str]] = {}

    def contains(self, account: AccountConfig, message_id: str) -> bool:
        with self._lock:
            ids = self._ids.get(account.name)
            if ids is None:
                ids = self._ids[account.name] = self._load(account)
            return canonical_message_id(message_id) in ids

    def add(self, account: AccountConfig, message_id: str) -> None:
        with self._lock:
            self._ids.setdefault(account.name, set()).add(canonical_message_id(message_id))

    def _load(self, account: AccountConfig) -> set[str]:
        since = time.time() - RETRY_WINDOW_SECONDS
        found: set[str] = set()
        with contextlib.suppress(FileNotFoundError):
            for path in list_messages(account.maildir, account.sent_folder):
                try:
                    if path.stat().st_mtime < since:
                        continue
                    block = parse_header_bytes(*read_header_bytes(path, 256 * 1024))
                except OSError:
                    continue  # renamed or removed meanwhile
                message_id = block.get("Message-ID").strip()
                if message_id and any(
                    verify(self._secret, trace, message_id) == account.name
                    for trace in block.get_all(TRACE_HEADER)
                ):
                    found.add(canonical_message_id(message_id))
        log.debug("account %s: %d recent copies known", account.name, len(found))
        return found
