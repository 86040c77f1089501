"""Strict address parsing and normalization: one mailbox token gives exactly one address.

Linking a message to the wrong CRM record is worse than not linking it, so a header whose
mailboxes cannot be read unambiguously (``a@x)<b@y>``, ``"a@x" <b@y>@z``, an unclosed ``<``)
raises :class:`AmbiguousAddressError` and the caller links nothing.
"""

from __future__ import annotations

import re
from email import errors as email_errors
from email._header_value_parser import TokenList, get_address_list

from sentlink.errors import SentlinkError

# Defects the stdlib parser reports on encoded words in display names. Common MUAs produce them
# (e.g. ``"=?utf-8?q?...?=" <a@b>``); they change how a name is shown, never which address it is.
_COSMETIC_DEFECTS = frozenset(
    {
        "whitespace inside encoded word",
        "missing trailing whitespace after encoded-word",
        "encoded word inside quoted string",
    }
)
# Header bytes that are not UTF-8 arrive as lone surrogates (decoded with surrogateescape).
_SURROGATES = re.compile("[\udc80-\udcff]")
_REPLACEMENT = "\ufffd"


class AmbiguousAddressError(SentlinkError):
    """A header's mailboxes cannot be read as one well-defined address each."""


def normalize_address(addr: str, strip_plus: bool = False) -> str:
    """The form addresses are stored and compared in: lowercased, domain IDNA-encoded.

    ``strip_plus`` drops a ``+tag`` sub-address (Postfix ``recipient_delimiter``) from the local
    part. Raises AmbiguousAddressError for something that is not ``local@domain``.
    """
    addr = addr.strip()
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise AmbiguousAddressError(f"not an address: {addr!r}")
    if _SURROGATES.search(addr) or _REPLACEMENT in addr:
        raise AmbiguousAddressError(f"undecodable bytes in address {addr!r}")
    local = local.lower()
    if strip_plus and not local.startswith('"'):
        base, plus, _tag = local.partition("+")
        if plus and base:
            local = base
    return f"{local}@{normalize_domain(domain)}"


def normalize_domain(domain: str) -> str:
    """Domain in ASCII (IDNA, RFC 3490 via the stdlib codec), lowercased, no trailing dot."""
    domain = domain.strip().rstrip(".")
    if domain.startswith("["):  # domain literal (RFC 5321 section 4.1.3): compared as written
        return domain.lower()
    try:
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise AmbiguousAddressError(f"invalid domain {domain!r}: {exc}") from None


def address_domain(addr: str) -> str:
    """The domain part of a normalized address."""
    return addr.rpartition("@")[2]


def parse_mailboxes(value: str) -> list[tuple[str, str]]:
    """``(display name, addr-spec)`` for each mailbox of an address-list header value.

    Groups expand to their members (``undisclosed-recipients:;`` gives none). Display names are
    RFC 2047-decoded; undecodable bytes in a display name become U+FFFD, in an address they make
    the header ambiguous. The addr-spec is returned as written (see :func:`normalize_address`).
    """
    if not value.strip():
        return []
    try:
        address_list, rest = get_address_list(value)
    except Exception as exc:  # the stdlib parser raises IndexError, RecursionError... on junk
        raise AmbiguousAddressError(f"unparsable address list: {exc}") from None
    if rest:
        raise AmbiguousAddressError(f"unparsed text after address list: {_excerpt(rest)}")
    problem = _ambiguity(address_list)
    if problem:
        raise AmbiguousAddressError(f"{problem} in {_excerpt(value)}")
    mailboxes: list[tuple[str, str]] = []
    for address in address_list.addresses:
        for mailbox in address.all_mailboxes:
            local, domain = mailbox.local_part, mailbox.domain
            if not local or not domain:
                raise AmbiguousAddressError(f"mailbox without local part or domain in {value!r}")
            addr_spec = mailbox.addr_spec
            if _SURROGATES.search(addr_spec) or _REPLACEMENT in addr_spec:
                raise AmbiguousAddressError(f"undecodable bytes in address {_excerpt(addr_spec)}")
            name = _SURROGATES.sub(_REPLACEMENT, mailbox.display_name or "")
            mailboxes.append((name, addr_spec))
    return mailboxes


def _ambiguity(tokens: TokenList) -> str:
    """Why the parse tree is not one clean address per mailbox, or "" when it is."""
    for defect in tokens.all_defects:
        if isinstance(defect, email_errors.InvalidHeaderDefect) and (
            str(defect) not in _COSMETIC_DEFECTS
        ):
            return str(defect) or type(defect).__name__
    stack: list[object] = [tokens]
    while stack:
        token = stack.pop()
        kind = getattr(token, "token_type", "")
        # The parser keeps going after junk and tags it ("misplaced-special" and the like).
        # "invalid-mailbox" alone only echoes the defects judged above, cosmetic ones included.
        if kind == "misplaced-special" or (
            kind.startswith("invalid-") and kind != "invalid-mailbox"
        ):
            return kind
        if isinstance(token, TokenList):
            stack.extend(token)
    return ""


def _excerpt(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
