"""Standard Webhooks signatures (https://www.standardwebhooks.com, "Signature scheme").

The signed content is ``{webhook-id}.{webhook-timestamp}.{body}``; the ``webhook-signature``
header lists ``v1,<base64 HMAC-SHA256>`` for each secret, space-separated, so a receiver can
roll its secret over while both the old and the new one are accepted. Secrets written as
``whsec_<base64>`` (the spec's format) are base64-decoded; any other line is used as UTF-8 bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from sentlink.errors import HookError

PREFIX = "whsec_"
DEFAULT_TOLERANCE = 300  # seconds a receiver accepts between webhook-timestamp and its clock


def secret_key(line: str) -> bytes:
    line = line.strip()
    if line.startswith(PREFIX):
        try:
            return base64.b64decode(line[len(PREFIX) :], validate=True)
        except ValueError:
            raise HookError("a whsec_ secret is not valid base64") from None
    return line.encode("utf-8")


def read_secrets(path: Path) -> list[bytes]:
    """Every non-empty, non-comment line of ``path`` as a signing key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HookError(f"{path}: cannot read secret: {exc.strerror or exc}") from None
    keys = [secret_key(line) for line in text.splitlines() if line.strip() and line[0] != "#"]
    if not keys:
        raise HookError(f"{path}: no secret in the file")
    return keys


def _digest(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def sign(keys: Iterable[bytes], msg_id: str, timestamp: str, body: bytes) -> str:
    """The ``webhook-signature`` header value: one ``v1,...`` per key."""
    return " ".join(f"v1,{_digest(k, msg_id, timestamp, body)}" for k in keys)


def verify(
    keys: Sequence[bytes],
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE,
) -> bool:
    """Whether a request carries a valid signature by one of ``keys`` and a fresh timestamp.

    Signatures are compared in constant time (hmac.compare_digest).
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id", "")
    timestamp = lowered.get("webhook-timestamp", "")
    if not msg_id or not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance:
        return False
    offered = [
        sig
        for version, _, sig in (
            s.partition(",") for s in lowered.get("webhook-signature", "").split()
        )
        if version == "v1"
    ]
    ok = False
    for key in keys:
        expected = _digest(key, msg_id, timestamp, body)
        for sig in offered:
            ok |= hmac.compare_digest(expected.encode(), sig.encode())
    return ok
