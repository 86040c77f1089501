"""Maildir file and folder names: unique names, the ``:2,`` info part, Maildir++ folder names."""

from __future__ import annotations

import base64
import itertools
import os
import socket
import time
from pathlib import Path

from sentlink.errors import CaptureError

INFO_SEPARATOR = ":2,"

# Deliveries made by this process, the "Q<n>" field of Dovecot's unique names. A process-wide
# sequence is what the field means; it is an itertools counter, whose next() is atomic in CPython.
_deliveries = itertools.count(1)


def new_uniq() -> str:
    """A unique name per https://cr.yp.to/proto/maildir.html, in Dovecot's modern form.

    ``<secs>.M<usecs>P<pid>Q<n>R<random>.<host>``: time, pid and a per-process counter make it
    unique on one host; the random part covers pid reuse and clock steps. The spec requires "/"
    and ":" in the host name to be written as ``\\057`` and ``\\072``.
    """
    now_ns = time.time_ns()
    secs, usecs = divmod(now_ns // 1000, 1_000_000)
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{secs}.M{usecs}P{os.getpid()}Q{next(_deliveries)}R{os.urandom(8).hex()}.{host}"


def split_uniq(filename: str) -> str:
    """The Maildir unique name: the part before ``:2,``, which survives flag renames."""
    return filename.split(INFO_SEPARATOR, 1)[0]


def parse_flags(filename: str) -> str:
    """The flags of a ``cur/`` file name (``""`` when it has no ``:2,`` info)."""
    _, sep, flags = filename.partition(INFO_SEPARATOR)
    return flags if sep else ""


def normalize_flags(flags: str) -> str:
    """Flags deduplicated and sorted in ASCII order, as the maildir spec requires.

    Upper-case letters are the standard flags (``DFPRST``), lower-case ones Dovecot keywords.
    """
    if not all(c.isascii() and c.isalpha() for c in flags):
        raise ValueError(f"invalid Maildir flags {flags!r}: only ASCII letters are allowed")
    return "".join(sorted(set(flags)))


def merge_flags(existing: str, added: str) -> str:
    """``existing`` (as found in a file name, kept as is) plus ``added``, sorted."""
    return "".join(sorted(set(existing) | set(normalize_flags(added))))


def is_inbox(folder: str) -> bool:
    return folder == "" or folder.upper() == "INBOX"


def folder_components(folder: str) -> list[str]:
    """The hierarchy levels of a folder name, encoded as Dovecot stores them.

    Both "/" and "." separate levels: "/" is the usual IMAP separator in Dovecot namespaces and
    "." is Maildir++'s own (``Sent/2024`` and ``Sent.2024`` are both the directory
    ``.Sent.2024``). Non-ASCII names are stored in modified UTF-7 (RFC 3501 5.1.3), as Dovecot
    does unless ``mailbox_list_utf8`` is set. Empty levels and control characters are refused,
    which also rules out any path outside the Maildir.
    """
    parts = folder.replace("/", ".").split(".")
    for part in parts:
        if not part or any(ord(c) < 0x20 or ord(c) == 0x7F for c in part):
            raise CaptureError("unsafe", f"invalid Maildir folder name {folder!r}")
    return [encode_mutf7(part) for part in parts]


def folder_dir_name(folder: str) -> str | None:
    """The Maildir++ directory of ``folder`` (``".Sent"``), or None for INBOX (the root)."""
    if is_inbox(folder):
        return None
    return "." + ".".join(folder_components(folder))


def folder_path(root: Path, folder: str) -> Path:
    """``"INBOX"`` or ``""`` -> ``root``; ``"Sent"`` -> ``root/".Sent"`` (Maildir++)."""
    name = folder_dir_name(folder)
    return root if name is None else root / name


def encode_mutf7(text: str) -> str:
    """Modified UTF-7 of RFC 3501 section 5.1.3, the IMAP mailbox name encoding."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in text:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)
