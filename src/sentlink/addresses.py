"""Strict address parsing and normalization: one mailbox token gives exactly one address.

Linking a message to the wrong CRM record is worse than not linking it, so a header whose
mailboxes cannot be read unambiguously (``a@x)<b@y>``, ``"a@x" <b@y>@z``, an unclosed ``<``)
raises :class:`AmbiguousAddressError` and the caller links nothing.
"""

from __future__ import annotations

import re

# Not in typeshed; the same decoder the strict parser (email._header_value_parser) uses.
from email import _encoded_words as encoded_words  # type: ignore[attr-defined]
from email import errors as email_errors
from email._header_value_parser import TokenList, get_address_list
from functools import lru_cache

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
_MAX_DOMAIN = 255

# The fast path: the mailbox forms nearly every MUA writes, in printable US-ASCII. Anything else
# (comments, groups, quoted local parts, domain literals, escapes, UTF-8, empty list elements)
# goes to the strict parser. tests/test_addresses_fast.py checks that both give the same answer
# on every input the fast path accepts.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"  # RFC 5322 section 3.2.3
_ADDR_SPEC = rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
# A display-name word: atext without "=" and "?" (so it is never half an encoded word), plus
# "." after its first character (obs-phrase, RFC 5322 section 4.1: "John Q. Public").
_NAME_WORD = r"[A-Za-z0-9!#$%&'*+/^_`{|}~-][A-Za-z0-9!#$%&'*+/^_`{|}~.-]*"
# RFC 2047 encoded word with a plain charset (no RFC 2231 language) and well-formed text.
_ENCODED_WORD = (
    r"=\?[A-Za-z0-9_-]+\?(?:[qQ]\?(?:[!-<>@-~]|=[0-9A-Fa-f]{2})+|[bB]\?[A-Za-z0-9+/]+={0,2})\?="
)
_NAME_TOKEN = rf"(?:{_NAME_WORD}|{_ENCODED_WORD})"
_FAST_MAILBOX = re.compile(
    rf"""[ \t]*
    (?:
        (?P<bare>{_ADDR_SPEC})
      | (?:
            "(?P<quoted>[ \t!\#-\[\]-~]*)"
          | (?P<phrase>{_NAME_TOKEN}(?:[ \t]+{_NAME_TOKEN})*)
        )?
        [ \t]*<(?P<angle>{_ADDR_SPEC})>
    )
    [ \t]*(?:,|$)""",
    re.VERBOSE,
)
_WHITESPACE = re.compile(r"[ \t]+")


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
    if len(domain) > _MAX_DOMAIN:  # RFC 1035 section 2.3.4; not worth a cache slot
        return _idna(domain)
    return _idna_cached(domain)


def _idna(domain: str) -> str:
    try:
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise AmbiguousAddressError(f"invalid domain {domain!r}: {exc}") from None


# A mailbox holds mail from a few thousand domains at most; the codec is the costly part of
# normalizing an address. Errors are not cached (lru_cache never caches a raised exception).
_idna_cached = lru_cache(maxsize=4096)(_idna)


def address_domain(addr: str) -> str:
    """The domain part of a normalized address."""
    return addr.rpartition("@")[2]


def parse_mailboxes(value: str) -> list[tuple[str, str]]:
    """``(display name, addr-spec)`` for each mailbox of an address-list header value.

    Groups expand to their members (``undisclosed-recipients:;`` gives none). Display names are
    RFC 2047-decoded; undecodable bytes in a display name become U+FFFD, in an address they make
    the header ambiguous. The addr-spec is returned as written (see :func:`normalize_address`).

    Not cached here: most values are seen once (a From with its display name), and a cache's
    bookkeeping cost more than parsing them. The linker keeps the values it reads again
    (``LinkFilter.mailboxes``).
    """
    if not value.strip():
        return []
    fast = _parse_simple(value)
    if fast is not None:
        return fast
    return _parse_strict(value)


def _parse_simple(value: str) -> list[tuple[str, str]] | None:
    """The mailboxes of a list of simple forms (``a@b``, ``Name <a@b>``, ``"Name" <a@b>``,
    RFC 2047 encoded names), or None when ``value`` is anything else."""
    mailboxes: list[tuple[str, str]] = []
    pos, end = 0, len(value)
    while pos < end:
        match = _FAST_MAILBOX.match(value, pos)
        if match is None:
            return None
        pos = match.end()
        if pos == end and value[pos - 1] == ",":
            return None  # a trailing empty element: the strict parser's business
        bare, quoted, phrase, angle = match.group("bare", "quoted", "phrase", "angle")
        if bare is not None:
            mailboxes.append(("", bare))
            continue
        if quoted is not None:
            if "=?" in quoted:
                return None  # encoded words inside quotes: the stdlib's quirks apply
            name = quoted
        elif phrase is not None:
            if phrase.endswith(".") and value[match.end("phrase")] == "<":
                return None  # "Q.<a@b>": the stdlib's display_name trips over it
            decoded = _decode_phrase(phrase)
            if decoded is None:
                return None
            name = decoded
        else:
            name = ""
        mailboxes.append((name, angle))
    return mailboxes


def _decode_phrase(phrase: str) -> str | None:
    """The words of a display name joined by single spaces, encoded words decoded; None when
    an encoded word is defective (unknown charset, undecodable bytes, bad padding)."""
    if "=?" not in phrase and "\t" not in phrase and "  " not in phrase:
        return phrase  # words apart by single spaces, none encoded: as it would be joined
    words = []
    for word in _WHITESPACE.split(phrase):
        if word.startswith("=?"):
            decoded: tuple[str, str, str, list[object]] = encoded_words.decode(word)
            text, _charset, _lang, defects = decoded
            if defects or not text.isprintable():
                return None
            words.append(text)
        else:
            words.append(word)
    return " ".join(words)


def _parse_strict(value: str) -> list[tuple[str, str]]:
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
            try:
                display_name = mailbox.display_name or ""
            except (AttributeError, IndexError) as exc:  # stdlib bug on e.g. 'Q.<a@b>'
                raise AmbiguousAddressError(f"unreadable display name: {exc}") from None
            mailboxes.append((_SURROGATES.sub(_REPLACEMENT, display_name), addr_spec))
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
