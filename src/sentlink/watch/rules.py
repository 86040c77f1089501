"""User rules (``watch.rules``) and the built-in self-sent rule, on headers parsed once.

Rules are tried in order; the first match decides unless it says ``continue: true`` (afew and
Sieve users know the model). A later matching rule overrides ``link`` and ``move`` and adds
flags. Nothing here touches the disk or the store: the result is a :class:`Decision` that the
handler carries out, or that ``sentlink watch --dry-run`` prints.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from typing import Any, Generic, TypeVar, cast

from sentlink.addresses import AmbiguousAddressError, normalize_address, parse_mailboxes
from sentlink.config.models import AccountConfig, RuleCondition, WatchRule
from sentlink.headers import HeaderBlock
from sentlink.maildir.names import normalize_flags
from sentlink.trace import TRACE_HEADER, verify

SelfSentRequire = str  # "none" | "trace" (validated by the config model)
_TRACE_KEY = TRACE_HEADER.lower()

_T = TypeVar("_T")


class _once(Generic[_T]):
    """functools.cached_property without its lock: CPython 3.11 takes one on every first
    access, which cost more than most of these fields; a MessageFacts stays in one thread."""

    def __init__(self, compute: Callable[[Any], _T]) -> None:
        self._compute = compute
        self._name = compute.__name__

    def __get__(self, instance: object, owner: type | None = None) -> _T:
        if instance is None:
            return cast(_T, self)
        value = instance.__dict__[self._name] = self._compute(instance)
        return value


class MessageFacts:
    """What the rules look at, from one parsed header block; each field is parsed on first use
    (most messages need From only, and most folders no address at all)."""

    # The header fields read here (a reader may keep only these, and those the rules name).
    HEADER_NAMES = ("From", "To", "Cc", "Bcc", "Subject", "Message-ID", TRACE_HEADER)

    def __init__(
        self,
        headers: HeaderBlock,
        secret: bytes | None,
        mailboxes: Callable[[str], Sequence[tuple[str, str]]] | None = None,
    ) -> None:
        """``mailboxes``: ``(display name, normalized address)`` of a field value's mailboxes,
        raising AmbiguousAddressError (``LinkFilter.mailboxes``); by default, as that reads
        them, uncached."""
        self.headers = headers
        self._secret = secret
        self._mailboxes = mailboxes or _mailboxes

    @_once
    def trace_account(self) -> str | None:
        """The account a valid trace header names, if any."""
        traces = self.headers.by_name.get(_TRACE_KEY)
        if self._secret is None or not traces:
            return None
        message_id = self.headers.get("Message-ID")
        for value in traces:
            account = verify(self._secret, value, message_id)
            if account is not None:
                return account
        return None

    @_once
    def from_(self) -> tuple[str, ...]:
        return _addresses(self.headers, "from", self._mailboxes)

    @_once
    def to(self) -> tuple[str, ...]:
        return _addresses(self.headers, "to", self._mailboxes)

    @_once
    def cc(self) -> tuple[str, ...]:
        return _addresses(self.headers, "cc", self._mailboxes)

    @_once
    def bcc(self) -> tuple[str, ...]:
        return _addresses(self.headers, "bcc", self._mailboxes)

    @_once
    def subject(self) -> str:
        return _decoded(self.headers.get("Subject"))


@dataclass(frozen=True)
class Decision:
    """What to do with one new message, and why (``reasons`` in the order they applied)."""

    link: bool = True
    move: str | None = None
    flags: str = ""
    reasons: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [f"move to {self.move}"] if self.move else ["stay"]
        if self.flags:
            parts.append(f"flag {self.flags}")
        parts.append("link" if self.link else "index without linking")
        why = ", ".join(self.reasons) if self.reasons else "no rule matched"
        return f"{'; '.join(parts)} ({why})"


NO_RULE = Decision()  # what no rule says: stay, link


@dataclass(frozen=True)
class CompiledRule:
    name: str
    header: tuple[tuple[str, re.Pattern[str]], ...]  # (lowercased field name, regex)
    fields: tuple[tuple[str, re.Pattern[str]], ...]  # ("from" | "to" | ..., regex)
    link: bool
    move: str | None
    flags: str
    continue_: bool

    @classmethod
    def compile(cls, rule: WatchRule) -> CompiledRule:
        def rx(pattern: str) -> re.Pattern[str]:
            return re.compile(pattern, re.IGNORECASE)

        cond: RuleCondition = rule.when
        tests = [
            (key, rx(value))
            for key, value in (
                ("from", cond.from_),
                ("to", cond.to),
                ("cc", cond.cc),
                ("subject", cond.subject),
                ("any_recipient", cond.any_recipient),
            )
            if value is not None
        ]
        return cls(
            name=rule.name,
            header=tuple((name.lower(), rx(value)) for name, value in cond.header.items()),
            fields=tuple(tests),
            link=rule.then.link,
            move=rule.then.move,
            flags=normalize_flags("".join(rule.then.flag)),
            continue_=rule.continue_,
        )

    def matches(self, facts: MessageFacts) -> bool:
        by_name = facts.headers.by_name
        for key, pattern in self.header:
            if not any(pattern.search(v) for v in by_name.get(key, ())):
                return False
        for key, pattern in self.fields:
            if key == "subject":
                values: Sequence[str] = (facts.subject,)
            elif key == "any_recipient":
                values = facts.to + facts.cc + facts.bcc
            else:
                values = {"from": facts.from_, "to": facts.to, "cc": facts.cc}[key]
            if not any(pattern.search(v) for v in values):
                return False
        return True


@dataclass
class RuleSet:
    rules: Sequence[CompiledRule] = field(default_factory=tuple)

    @classmethod
    def compile(cls, rules: Sequence[WatchRule]) -> RuleSet:
        return cls(tuple(CompiledRule.compile(r) for r in rules))

    def header_names(self) -> tuple[str, ...]:
        """The header fields the rules read, besides those :class:`MessageFacts` reads."""
        return tuple(dict.fromkeys(name for rule in self.rules for name, _rx in rule.header))

    def decide(self, facts: MessageFacts) -> Decision:
        """What the rules say; ``NO_RULE`` itself when none matched (most messages), so that
        callers can tell it by identity."""
        link, move, flags, reasons = True, None, "", []
        for rule in self.rules:
            if not rule.matches(facts):
                continue
            reasons.append(f"rule {rule.name}")
            link = rule.link
            move = rule.move if rule.move is not None else move
            flags += rule.flags
            if not rule.continue_:
                break
        if not reasons:
            return NO_RULE
        return Decision(link, move, normalize_flags(flags), tuple(reasons))


def own_addresses(account: AccountConfig) -> frozenset[str]:
    own = set()
    for addr in account.addresses:
        try:
            own.add(normalize_address(addr))
        except AmbiguousAddressError:
            continue
    return frozenset(own)


def self_sent_reason(
    facts: MessageFacts, account: str, own: frozenset[str], require: SelfSentRequire
) -> str | None:
    """Why a message in INBOX is the account's own sent mail, or None when it is not (or, for
    ``require: dkim``, not without the DKIM proof the caller checks: see ``needs_dkim``).

    Self-sent: From is one of the account's addresses (``own``, normalized) and at least one
    To/Cc address is not (a note to self stays in INBOX), or a valid trace header of this
    account (our own copy, e.g. a self-Bcc). ``require: trace`` accepts only the latter: a From:
    header is trivially forged by anyone sending to the account.
    """
    if facts.trace_account == account:
        return "self-sent (trace header)"
    if require == "none" and from_rule(facts, own):
        return "self-sent (From is the account's)"
    return None


def from_rule(facts: MessageFacts, own: frozenset[str]) -> bool:
    """From is the account's and some To/Cc recipient is not."""
    from_ = facts.from_
    if not from_ or not own.issuperset(from_):
        return False
    return not own.issuperset(facts.to + facts.cc)


def needs_dkim(
    facts: MessageFacts, account: str, own: frozenset[str], require: SelfSentRequire
) -> bool:
    """``require: dkim``, and only a DKIM signature can still make this message self-sent."""
    return require == "dkim" and facts.trace_account != account and from_rule(facts, own)


def _mailboxes(value: str) -> list[tuple[str, str]]:
    return [(name, normalize_address(addr)) for name, addr in parse_mailboxes(value)]


def _addresses(
    headers: HeaderBlock, key: str, mailboxes: Callable[[str], Sequence[tuple[str, str]]]
) -> tuple[str, ...]:
    """The normalized addresses of the fields named ``key`` (lowercased)."""
    found: list[str] = []
    for value in headers.by_name.get(key, ()):
        try:
            found += [addr for _name, addr in mailboxes(value)]
        except AmbiguousAddressError:
            continue  # an ambiguous field proves nothing: it never makes a message self-sent
    return tuple(found)


def _decoded(value: str) -> str:
    try:
        return str(make_header(decode_header(value)))
    except (HeaderParseError, LookupError, UnicodeError, ValueError):
        return value
