"""The signed trace header that proves a Sent copy was written by us.

``X-Sentlink-Trace: v=1; a=<account>; t=<unix time>; s=<signature>`` where the signature is
HMAC-SHA256 under the site secret over ``"v1\\0" account "\\0" message_id "\\0" t``, base64url
without padding. It only ever goes into the sender's own copy (never into relayed mail), so a
copy carrying a valid one is ours; the milter strips invalid ones from inbound mail so nobody
can make a message look self-sent (see docs/design.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

TRACE_HEADER = "X-Sentlink-Trace"

_VERSION = "1"
# Account names go into a "; "-separated tag list: keep them to a safe token alphabet.
_ACCOUNT_RE = re.compile(r"[A-Za-z0-9._@+-]+")
_MSGID_RE = re.compile(r"<[^<>]*>")


def canonical_message_id(value: str) -> str:
    """The Message-ID token as signed: the first ``<...>``, folding and comments removed.

    RFC 5322 3.6.4 allows CFWS around msg-id, so the same id may arrive folded differently in
    the relayed message and in the copy; both sides must sign and verify the same string.
    """
    compact = "".join(value.split())
    match = _MSGID_RE.search(compact)
    return match.group(0) if match else compact


def _signature(secret: bytes, account: str, message_id: str, when: int) -> str:
    data = b"\0".join(
        [
            b"v1",
            account.encode("utf-8", "surrogateescape"),
            canonical_message_id(message_id).encode("utf-8", "surrogateescape"),
            str(when).encode("ascii"),
        ]
    )
    digest = hmac.new(secret, data, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def sign(secret: bytes, account: str, message_id: str, when: int) -> str:
    """The header value for ``account``'s copy of ``message_id`` written at ``when``."""
    if not _ACCOUNT_RE.fullmatch(account):
        raise ValueError(f"account name not usable in a trace header: {account!r}")
    if when < 0:
        raise ValueError("trace time must not be negative")
    sig = _signature(secret, account, message_id, when)
    return f"v={_VERSION}; a={account}; t={when}; s={sig}"


def _parse(value: str) -> dict[str, str] | None:
    tags: dict[str, str] = {}
    for part in "".join(value.split()).split(";"):
        if not part:
            continue
        name, sep, tag_value = part.partition("=")
        if not sep or name in tags:
            return None
        tags[name] = tag_value
    return tags


def verify(secret: bytes, value: str, message_id: str) -> str | None:
    """The account name if ``value`` is a valid trace for ``message_id``, else None.

    Never raises on malformed input: whatever an outside sender put in the header is just
    "not ours".
    """
    try:
        tags = _parse(value)
        if tags is None or tags.get("v") != _VERSION:
            return None
        account, when, sig = tags.get("a", ""), tags.get("t", ""), tags.get("s", "")
        if not _ACCOUNT_RE.fullmatch(account) or not when.isascii() or not when.isdigit():
            return None
        expected = _signature(secret, account, message_id, int(when)).encode("ascii")
        given = sig.encode("utf-8", "surrogateescape")
    except (ValueError, UnicodeError):
        return None
    return account if hmac.compare_digest(given, expected) else None
