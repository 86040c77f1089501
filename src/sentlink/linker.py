"""Message file -> participants -> privacy filters -> matching records -> links in the store.

Rules (docs/design.md, "Linking"):

- Headers only, read once and size-capped. Sent mail: To/Cc/Bcc (roles to/cc/bcc); received
  mail: From/Cc (roles from/cc). An address appearing twice keeps its first role.
- Any ambiguous mailbox in those fields (``a@x)<b@y>``) links nothing: status ``ambiguous``.
- Excluded participants: the account's own addresses, internal domains (and their subdomains),
  ``crm.never_log`` (an address, or ``@domain`` covering its subdomains too: privacy errs on the
  side of not logging). No participant left outside the company -> ``internal-only``.
- A private marker (``crm.private.header`` with a value other than empty/0/no/false/off, or
  ``crm.private.subject_tag`` in the Subject, case-insensitively) links nothing.
- Records are matched by normalized address (plus the ``+tag``-stripped form when
  ``crm.strip_plus_tags``); ``contact-first`` applies per address. A record is linked once per
  message, through its first participant address.
- Thread continuity: records linked to a message named in In-Reply-To/References (same
  account) are linked too, ``via: thread``, unless one of their addresses is a participant (the
  address rules above already decided for it, exclusions and contact-first included). Such a
  link has role ``to`` (sent) or ``from`` (received) and the record's first address that is not
  excluded.
- Every message read gets a store row, with or without links (skipped and ambiguous ones too),
  so a rescan does not parse it again; ``sentlink reindex --full`` re-reads everything.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.utils import parsedate_to_datetime
from functools import lru_cache
from pathlib import Path
from typing import Literal

from sentlink.addresses import (
    AmbiguousAddressError,
    address_domain,
    normalize_address,
    normalize_domain,
    parse_mailboxes,
)
from sentlink.config.models import AccountConfig, Config
from sentlink.events import (
    EVENT_TYPES,
    MESSAGE_LINKED,
    RECORD_CREATED,
    message_facts,
    message_linked,
    record_created,
)
from sentlink.headers import DEFAULT_MAX_HEADER_BYTES, HeaderBlock, StrPath, read_headers
from sentlink.maildir.names import split_uniq
from sentlink.model import Direction, Link, MessageInfo, Participant, Record, Role, Via
from sentlink.store import MessageRows, NewEvent, SaveRequest, Store, StoreError

log = logging.getLogger("sentlink.linker")

LinkStatus = Literal["linked", "already", "skipped", "ambiguous", "error"]

# (role, header field, its lowercased name) of the participants, by direction.
_ROLE_FIELDS: dict[Direction, tuple[tuple[Role, str, str], ...]] = {
    "sent": (("to", "To", "to"), ("cc", "Cc", "cc"), ("bcc", "Bcc", "bcc")),
    "received": (("from", "From", "from"), ("cc", "Cc", "cc")),
}
_THREAD_ROLE: dict[Direction, Role] = {"sent": "to", "received": "from"}
_MSG_ID = re.compile(r"<([^<>]+)>")
_SURROGATES = re.compile("[\udc80-\udcff]")
_FALSE_WORDS = frozenset({"", "0", "no", "false", "off"})
# References can list a whole long thread; the newest ids are the ones that matter.
_MAX_REFERENCES = 50
_FORMS_CACHE_SIZE = 50_000
# Address field values LinkFilter.mailboxes remembers: the last message's, and those that recur
# (the account's own address in To, a colleague in Cc), until this many were read.
_MAILBOXES_KEPT = 1024
# What LinkFilter._kind says of a participant's address (0: a candidate for linking).
_INTERNAL = 1
_NEVER_LOG = 2


@dataclass(frozen=True)
class LinkResult:
    status: LinkStatus
    reason: str = ""
    links: int = 0
    message_id: str = ""
    unmatched: tuple[str, ...] = ()  # participant addresses that matched no record
    new_records: tuple[Record, ...] = ()  # leads created for them (crm.unmatched: create-lead)


# What Linker.plan_rows reads of a draft: Message-ID, subject, date, the ids replied to, why
# nothing is looked up ("" when something is), and the candidates as (address, role).
RowsDraft = tuple[str, str, str, tuple[str, ...], str, Sequence[tuple[str, Role]]]


@dataclass(frozen=True)
class Draft:
    """What the headers and the configuration alone say about a message: everything of a plan
    but the record lookups. Computed without the store, so a reconcile can compute it in a
    worker process (watch/prepare.py)."""

    message_id: str
    subject: str
    date: str
    refs: tuple[str, ...]
    private: bool
    participants: tuple[Participant, ...] = ()  # none when private or ambiguous
    ambiguous: str = ""  # why an address field could not be read, "" when all could
    skip: str = ""  # no-participants, internal-only or never-log: nothing to look up
    candidates: tuple[Participant, ...] = ()  # participants that may be linked


# A Draft as a tuple: message_id, subject, date, refs, private, the participants, each as
# (address, role, display name), ambiguous, skip, and the candidates as positions among the
# participants.
DraftFields = tuple[
    str,
    str,
    str,
    tuple[str, ...],
    bool,
    tuple[tuple[str, Role, str], ...],
    str,
    str,
    tuple[int, ...],
]


def draft_of(fields: DraftFields) -> Draft:
    """The Draft that ``LinkFilter.draft_fields`` gave as a tuple."""
    participants = tuple([Participant(email, role, name) for email, role, name in fields[5]])
    return Draft(
        *fields[:5],
        participants,
        fields[6],
        fields[7],
        tuple([participants[n] for n in fields[8]]),
    )


class LinkFilter:
    """The configured linking rules that need no store: participants, exclusions, privacy."""

    def __init__(self, config: Config) -> None:
        # Each participant's forms are needed three to five times per message.
        self._forms_cache: dict[str, tuple[str, ...]] = {}
        # Per account, whether each address seen is internal, never to be logged or neither.
        self._kinds: dict[str, dict[str, int]] = {}
        # The last address field values read, with their mailboxes or why they are ambiguous.
        self._mailboxes: dict[str, tuple[tuple[str, str], ...] | str] = {}
        crm = config.crm
        self._strip_plus = crm.strip_plus_tags
        self._private_header = crm.private.header
        self._private_key = self._private_header.lower()
        self._private_tag = crm.private.subject_tag.casefold()
        self._internal = frozenset(_domain_or_none(d) or d.lower() for d in config.internal_domains)
        never_addresses: set[str] = set()
        never_domains: set[str] = set()
        for entry in crm.never_log:
            if entry.startswith("@"):
                never_domains.add(_domain_or_none(entry[1:]) or entry[1:].lower())
            else:
                never_addresses.update(self.forms(entry))
        self._never_addresses = frozenset(never_addresses)
        self._never_domains = frozenset(never_domains)
        self._own = {
            account.name: frozenset(f for a in account.addresses for f in self.forms(a))
            for account in config.accounts
        }

    def __getstate__(self) -> dict[str, object]:
        # Sent to a worker process (watch/prepare.py): the cache starts empty there.
        return {**self.__dict__, "_forms_cache": {}, "_kinds": {}, "_mailboxes": {}}

    def header_names(self) -> tuple[str, ...]:
        """The header fields :meth:`draft` reads."""
        names = {f for fields in _ROLE_FIELDS.values() for _role, f, _key in fields}
        names.update(("Message-ID", "Subject", "Date", "In-Reply-To", "References"))
        if self._private_header:
            names.add(self._private_header)
        return tuple(sorted(names))

    def own(self, account: str) -> frozenset[str]:
        """The account's own addresses, in every normalized form."""
        return self._own.get(account, frozenset())

    def draft(self, account: str, headers: HeaderBlock, direction: Direction) -> Draft:
        """The store-free part of :meth:`Linker.plan` (no side effects, no logging)."""
        return draft_of(self.draft_fields(account, headers, direction))

    def draft_fields(
        self, account: str, headers: HeaderBlock, direction: Direction, raw_date: bool = False
    ) -> DraftFields:
        """:meth:`draft` as a tuple (see ``DraftFields``): what a reconcile's worker process
        sends back, with no object per participant to build, send and take apart. With
        ``raw_date``, the date is the Date field as written (``iso_date`` gives the draft's)."""
        by_name = headers.by_name
        values = by_name.get("message-id")
        message_id = _message_id(values[0]) if values else ""
        values = by_name.get("subject")
        subject = _decode_words(values[0]) if values else ""
        private = self._is_private(headers, subject)
        values = by_name.get("date")
        date = (values[0] if raw_date else iso_date(values[0])) if values else ""
        refs = _references(headers)
        if private:
            return (message_id, subject, date, refs, private, (), "", "", ())
        try:
            participants = self._participants(by_name, direction)
        except AmbiguousAddressError as exc:
            return (message_id, subject, date, refs, private, (), str(exc), "", ())
        known = self._kinds.get(account) or {}
        kinds = [known.get(p[0], -1) for p in participants]
        if -1 in kinds:  # an address not seen before in this account
            kinds = [self._kind(account, p[0]) for p in participants]
        candidates = tuple([n for n, kind in enumerate(kinds) if not kind])
        skip = (
            "no-participants"
            if not participants
            else "internal-only"
            if all(kind == _INTERNAL for kind in kinds)
            else "never-log"
            if not candidates
            else ""
        )
        return (message_id, subject, date, refs, private, participants, "", skip, candidates)

    def _kind(self, account: str, email: str) -> int:
        """_INTERNAL, _NEVER_LOG or 0 (a candidate) for a participant's address, remembered:
        the same correspondents recur from message to message."""
        kinds = self._kinds.get(account)
        if kinds is None:
            kinds = self._kinds[account] = {}
        kind = kinds.get(email)
        if kind is None:
            if len(kinds) >= _FORMS_CACHE_SIZE:
                kinds.clear()
            if self.is_internal(email, self.own(account)):
                kind = _INTERNAL
            else:
                kind = _NEVER_LOG if self.is_never_log(email) else 0
            kinds[email] = kind
        return kind

    def mailboxes(self, value: str) -> tuple[tuple[str, str], ...]:
        """``(display name, normalized address)`` of each mailbox of an address field's value;
        raises AmbiguousAddressError. The values read lately are remembered: the self-sent rule
        and the draft then parse a message's From once, and a value that recurs once in a
        while."""
        found = self._mailboxes.get(value)
        if found is None:
            if len(self._mailboxes) >= _MAILBOXES_KEPT:
                self._mailboxes.clear()
            try:
                found = tuple(
                    [(name, self.normalized(addr)) for name, addr in parse_mailboxes(value)]
                )
            except AmbiguousAddressError as exc:
                found = str(exc)
            self._mailboxes[value] = found
        if isinstance(found, str):
            raise AmbiguousAddressError(found)
        return found

    def _participants(
        self, by_name: dict[str, list[str]], direction: Direction
    ) -> tuple[tuple[str, Role, str], ...]:
        """(address, role, display name) of each participant, the first role of each address."""
        participants: list[tuple[str, Role, str]] = []
        seen: set[str] = set()
        for role, field, key in _ROLE_FIELDS[direction]:
            for value in by_name.get(key, ()):
                try:
                    emails = self.mailboxes(value)
                except AmbiguousAddressError as exc:
                    raise AmbiguousAddressError(f"{field}: {exc}") from None
                for name, email in emails:
                    if email not in seen:
                        seen.add(email)
                        participants.append((email, role, name))
        return tuple(participants)

    def _is_private(self, headers: HeaderBlock, subject: str) -> bool:
        if self._private_key:
            for value in headers.by_name.get(self._private_key, ()):
                if value.strip().lower() not in _FALSE_WORDS:
                    return True
        return bool(self._private_tag) and self._private_tag in subject.casefold()

    def normalized(self, addr: str) -> str:
        """``normalize_address(addr)``, through the forms cache (the first form is that)."""
        forms = self.forms(addr)
        return forms[0] if forms else normalize_address(addr)  # raises for this address

    def forms(self, addr: str) -> tuple[str, ...]:
        """The normalized address, and its ``+tag``-stripped form when configured."""
        forms = self._forms_cache.get(addr)
        if forms is None:
            if len(self._forms_cache) >= _FORMS_CACHE_SIZE:
                self._forms_cache.clear()
            forms = self._forms_cache[addr] = self._compute_forms(addr)
        return forms

    def _compute_forms(self, addr: str) -> tuple[str, ...]:
        try:
            full = normalize_address(addr)
        except AmbiguousAddressError:
            return ()
        if not self._strip_plus:
            return (full,)
        stripped = normalize_address(full, strip_plus=True)
        return (full,) if stripped == full else (full, stripped)

    # isdisjoint rather than any() over a generator: the two checks run for every participant
    # (1.9 -> 1.0 us per message of bench/watch.py, with 1.6 participants each).
    def is_internal(self, email: str, own: frozenset[str]) -> bool:
        if not own.isdisjoint(self.forms(email)):
            return True
        return _in_domains(address_domain(email), self._internal)

    def is_never_log(self, email: str) -> bool:
        if not self._never_addresses.isdisjoint(self.forms(email)):
            return True
        return _in_domains(address_domain(email), self._never_domains)

    def excluded(self, email: str, own: frozenset[str]) -> bool:
        return self.is_internal(email, own) or self.is_never_log(email)

    def exclusion(self, email: str) -> str:
        """Why an address is never linked in any account, or "" (``sentlink match``)."""
        for account, own in self._own.items():
            if any(f in own for f in self.forms(email)):
                return f"an address of account {account}"
        if _in_domains(address_domain(email), self._internal):
            return "internal domain"
        if self.is_never_log(email):
            return "crm.never_log"
        return ""


class Linker:
    """Links message files of the configured accounts to CRM records in ``store``."""

    def __init__(self, store: Store, config: Config) -> None:
        self._store = store
        self._filter = LinkFilter(config)
        crm = config.crm
        self._contact_first = crm.multiple_match == "contact-first"
        self._max_header_bytes = (
            config.milter.max_header_bytes if config.milter else DEFAULT_MAX_HEADER_BYTES
        )
        self._unmatched = crm.unmatched
        # Hooks subscribed to each event type; no hook, no outbox rows (and no extra work).
        self._subscribers = {
            kind: tuple(h.name for h in config.hooks if kind in h.events) for kind in EVENT_TYPES
        }

    @property
    def filter(self) -> LinkFilter:
        return self._filter

    @property
    def reads_sender(self) -> bool:
        """Whether writing a message reads its From field (for the message.linked events a
        hook wants); nothing else here reads a header once the draft is made."""
        return bool(self._subscribers[MESSAGE_LINKED])

    # entry point

    def link_file(
        self, account: AccountConfig, folder: str, path: Path, direction: Direction
    ) -> LinkResult:
        """Index one message file. Raises FileNotFoundError when it vanished (renamed by a
        client meanwhile: the rescan sees it under its new name) and StoreError when the store
        fails; an unreadable file gives status ``error``."""
        uniq = split_uniq(path.name)
        file = _relative(path, account.maildir)
        location = self._store.message_location(account.name, uniq)
        if location is not None:
            if location != (folder, file):  # moved between folders or renamed for flags
                self._store.move_message(account.name, uniq, folder, file)
            return LinkResult("already", "file already indexed")
        try:
            headers = read_headers(path, self._max_header_bytes)
        except FileNotFoundError:
            raise
        except OSError as exc:
            log.warning("account=%s file=%s cannot read: %s", account.name, file, exc)
            return LinkResult("error", f"cannot read: {exc.strerror or exc}")
        info, links, result = self.plan(account, folder, uniq, file, headers, direction)
        try:
            saved = self.save(info, links, result, headers, path)
        except FileNotFoundError:
            raise
        except OSError as exc:
            log.warning("account=%s file=%s cannot read: %s", account.name, file, exc)
            return LinkResult("error", f"cannot read: {exc.strerror or exc}")
        if not saved:
            if result.status == "linked":
                self.add_missing_links(info, links, headers, path)
            return LinkResult("already", "message-id already indexed", 0, info.message_id)
        if result.status == "linked":
            log.info(
                "account=%s message_id=%s linked records=%d file=%s",
                account.name,
                info.message_id,
                len(links),
                file,
            )
        else:
            log.debug(
                "account=%s message_id=%s %s: %s",
                account.name,
                info.message_id,
                result.status,
                result.reason,
            )
        return result

    def save(
        self,
        info: MessageInfo,
        links: Sequence[Link],
        result: LinkResult,
        headers: HeaderBlock,
        path: Path,
    ) -> bool:
        """Store a plan: the message, its links, the outbox events of the configured hooks,
        unmatched addresses (crm.unmatched: review) and new leads, in one transaction.

        Returns what ``Store.save_message`` returns. Raises OSError when the file cannot be
        read for the event's facts (size, attachment names)."""
        r = self.request(info, links, result, headers, path)
        return self._store.save_message(r.info, r.links, r.events, r.unmatched, r.new_records)

    def add_missing_links(
        self, info: MessageInfo, links: Sequence[Link], headers: HeaderBlock, path: StrPath
    ) -> int:
        """Links of another copy of an indexed message that the message lacks, added with a
        ``message.linked`` event for them alone; how many were added.

        The copies of one message name the same people except for Bcc: our capture copy lists
        the envelope's Bcc recipients, which a client's own copy may not. Whichever copy was
        indexed first, the message ends up linked to everyone. Raises OSError when the file
        cannot be read for the event's facts."""
        if not info.message_id or not links:
            return 0
        have = {
            (r.kind, r.id)
            for r in self._store.linked_records_for_message_ids(info.account, [info.message_id])
        }
        missing = [ln for ln in links if (ln.record.kind, ln.record.id) not in have]
        if not missing:
            return 0
        result = LinkResult("linked", "", len(missing), info.message_id)
        added = self._store.add_links(
            info, missing, self._events(info, missing, result, headers, path)
        )
        if added:
            log.info(
                "account=%s message_id=%s %d more records linked from another copy file=%s",
                info.account,
                info.message_id,
                added,
                info.file,
            )
        return added

    def request(
        self,
        info: MessageInfo,
        links: Sequence[Link],
        result: LinkResult,
        headers: HeaderBlock,
        path: StrPath,
    ) -> SaveRequest:
        """What :meth:`save` would write, for :meth:`save_many`. Raises OSError like it."""
        events = self._events(info, links, result, headers, path)
        unmatched = result.unmatched if self._unmatched == "review" else ()
        return SaveRequest(info, links, events, unmatched, result.new_records)

    def save_many(self, requests: Sequence[SaveRequest]) -> list[bool | StoreError]:
        """Write many requests (``Store.save_messages``): for each, what :meth:`save` would
        return, or the StoreError it would raise."""
        return self._store.save_messages(requests)

    def _events(
        self,
        info: MessageInfo,
        links: Sequence[Link],
        result: LinkResult,
        headers: HeaderBlock,
        path: StrPath,
    ) -> list[NewEvent]:
        """Outbox events of a linked message: record.created for new leads, then
        message.linked (the store delivers a record's events in this order)."""
        if result.status != "linked":
            return []
        events = []
        created_hooks = self._subscribers[RECORD_CREATED]
        if created_hooks:
            events += [record_created(r, info, created_hooks) for r in result.new_records]
        linked_hooks = self._subscribers[MESSAGE_LINKED]
        if linked_hooks:
            facts = message_facts(path, _sender(headers))
            events.append(message_linked(info, links, facts, linked_hooks))
        return events

    def plan(
        self,
        account: AccountConfig,
        folder: str,
        uniq: str,
        file: str,
        headers: HeaderBlock,
        direction: Direction,
        draft: Draft | None = None,
    ) -> tuple[MessageInfo, list[Link], LinkResult]:
        """What to store for a message: its row, its links and the outcome (no side effects).
        ``draft`` is what ``LinkFilter.draft`` gives for these headers, when computed already."""
        if draft is None:
            draft = self._filter.draft(account.name, headers, direction)
        message_id = draft.message_id
        info = MessageInfo(
            account=account.name,
            folder=folder,
            uniq=uniq,
            file=file,
            direction=direction,
            message_id=message_id,
            subject=draft.subject,
            date=draft.date,
            participants=draft.participants,
            in_reply_to=draft.refs,
            private=draft.private,
        )

        if draft.private:
            return info, [], LinkResult("skipped", "private", 0, message_id)
        if draft.ambiguous:
            log.warning(
                "account=%s message_id=%s file=%s ambiguous address, linking nothing: %s",
                account.name,
                message_id,
                file,
                draft.ambiguous,
            )
            return info, [], LinkResult("ambiguous", draft.ambiguous, 0, message_id)
        if draft.skip:
            return info, [], LinkResult("skipped", draft.skip, 0, message_id)
        participants = draft.participants
        own = self._filter.own(account.name)
        refs = draft.refs

        candidates = draft.candidates
        found, unmatched_at = self._address_matches([(p.email, p.role) for p in candidates])
        links = [self._link(info, record, email, role, "address") for record, email, role in found]
        linked = {(record.kind, record.id) for record, _email, _role in found}
        unmatched = [candidates[i] for i in unmatched_at]
        if refs:
            forms = self._filter.forms
            participant_emails = {f for p in participants for f in forms(p.email)}
            for record in self._store.linked_records_for_message_ids(account.name, refs):
                if (record.kind, record.id) in linked:
                    continue
                if any(e in participant_emails for e in record.emails):
                    continue
                email = next((e for e in record.emails if not self._filter.excluded(e, own)), None)
                if email is None:
                    continue
                linked.add((record.kind, record.id))
                links.append(self._link(info, record, email, _THREAD_ROLE[direction], "thread"))
        new_records: list[Record] = []
        if self._unmatched == "create-lead":
            for participant in unmatched:
                lead = _new_lead(participant)
                new_records.append(lead)
                links.append(self._link(info, lead, participant.email, participant.role, "address"))
            unmatched = []
        emails = tuple([p.email for p in unmatched])
        if not links:
            return info, [], LinkResult("skipped", "no-match", 0, message_id, emails)
        return (
            info,
            links,
            LinkResult("linked", "", len(links), message_id, emails, tuple(new_records)),
        )

    def _address_matches(
        self, candidates: Sequence[tuple[str, Role]]
    ) -> tuple[list[tuple[Record, str, Role]], list[int]]:
        """The records the candidates' addresses link to, each once, through the first
        candidate naming it, as (record, address, role); and the positions of the candidates
        matching no record."""
        found: list[tuple[Record, str, Role]] = []
        linked: set[tuple[str, str]] = set()
        unmatched: list[int] = []
        for position, (email, role) in enumerate(candidates):
            records = self._match(email)
            if not records:
                unmatched.append(position)
            for record in records:
                if (record.kind, record.id) not in linked:
                    linked.add((record.kind, record.id))
                    found.append((record, email, role))
        return found, unmatched

    def plan_rows(
        self,
        account: str,
        folder: str,
        uniq: str,
        file: str,
        direction: Direction,
        draft: RowsDraft,
    ) -> tuple[MessageRows, LinkStatus] | None:
        """:meth:`plan` and :meth:`request` of a message whose draft is neither private nor
        ambiguous, as the rows ``Store.save_rows`` writes, and the status; None when its
        write would need more than rows (a hook event, a new lead, a thread link): then
        :meth:`plan`. ``draft`` holds the draft's fields this reads (see RowsDraft)."""
        message_id, subject, date, refs, skip, candidates = draft
        if skip:
            rows = MessageRows(
                account, uniq, folder, file, direction, message_id, subject, date, ()
            )
            return rows, "skipped"
        found, unmatched_at = self._address_matches(candidates)
        if unmatched_at and self._unmatched == "create-lead":
            return None  # leads to create
        if found and self._subscribers[MESSAGE_LINKED]:
            return None  # an event to write, with facts read from the file
        if refs and self._store.linked_records_for_message_ids(account, refs):
            return None  # records linked to the thread: plan decides which to link
        unmatched = (
            tuple([candidates[i][0] for i in unmatched_at]) if self._unmatched == "review" else ()
        )
        via: Via = "address"
        links = tuple([(r.kind, r.id, email, role, via) for r, email, role in found])
        rows = MessageRows(
            account, uniq, folder, file, direction, message_id, subject, date, links, unmatched
        )
        return rows, "linked" if links else "skipped"

    def explain_address(self, email: str) -> tuple[str, list[Record]]:
        """Why an address would (not) be linked, and to which records (``sentlink match``)."""
        why = self._filter.exclusion(email)
        if why:
            return f"excluded: {why}", []
        records = self._match(email)
        if not records:
            return "no record has this address", []
        forms = ", ".join(self._filter.forms(email))
        rule = "contact-first" if self._contact_first else "all"
        return f"address match on {forms} (multiple_match: {rule})", records

    def prime(self, account: str, emails: Iterable[str], refs: Iterable[str]) -> None:
        """Look up the records of these candidate addresses, and the records linked to the
        messages of these Message-IDs (those replied to by messages whose plan looks up thread
        links), together (inside a store batch), rather than one at a time as each message of
        the account is planned. The store reads the iterables only for what it has not loaded
        whole already."""
        forms = self._filter.forms
        self._store.prime_records(form for email in emails for form in forms(email))
        self._store.prime_thread_links(account, refs)

    def matching_records(self, email: str) -> list[Record]:
        """Records an address links to (normalized forms, ``multiple_match`` applied)."""
        return self._match(email)

    def _match(self, email: str) -> list[Record]:
        forms = self._filter.forms(email)
        if len(forms) == 1:  # one address has each record once (the store's key)
            records = self._store.records_by_email(forms[0])
        else:
            found: dict[tuple[str, str], Record] = {}
            for form in forms:
                for record in self._store.records_by_email(form):
                    found.setdefault((record.kind, record.id), record)
            records = list(found.values())
        if self._contact_first and records:
            contacts = [r for r in records if r.kind == "contact"]
            return contacts or records
        return records

    @staticmethod
    def _link(info: MessageInfo, record: Record, email: str, role: Role, via: Via) -> Link:
        return Link(
            account=info.account,
            message_id=info.message_id,
            record=record,
            email=email,
            role=role,
            via=via,
            direction=info.direction,
        )


def _new_lead(participant: Participant) -> Record:
    """A local lead for an unmatched address; its id is derived from the address so every node
    (and every later message) names the same lead."""
    digest = hashlib.sha256(participant.email.encode("utf-8", "surrogatepass")).hexdigest()
    name = participant.display_name or participant.email
    return Record("lead", f"sentlink-{digest[:16]}", name, (participant.email,))


def _sender(headers: HeaderBlock) -> Participant | None:
    """The first From mailbox, or None when there is none or it is ambiguous."""
    try:
        mailboxes = parse_mailboxes(headers.get("From"))
        if not mailboxes:
            return None
        name, addr = mailboxes[0]
        return Participant(normalize_address(addr), "from", name)
    except AmbiguousAddressError:
        return None


@lru_cache(maxsize=8192)
def _in_domains(domain: str, domains: frozenset[str]) -> bool:
    """``domain`` is one of ``domains`` or a subdomain of one."""
    if not domains:
        return False
    labels = domain.split(".")
    return any(".".join(labels[i:]) in domains for i in range(len(labels)))


def _domain_or_none(domain: str) -> str | None:
    try:
        return normalize_domain(domain)
    except AmbiguousAddressError:
        return None


def _message_id(value: str) -> str:
    """The id inside ``<...>`` compared exactly (RFC 5322 section 3.6.4); a bare token as is."""
    match = _MSG_ID.search(value)
    if match:
        return match.group(1).strip()
    token = value.strip()
    return token if token and not any(c.isspace() for c in token) else ""


def _references(headers: HeaderBlock) -> tuple[str, ...]:
    """Ids from In-Reply-To, then References (newest first), without repeats."""
    by_name = headers.by_name
    replied_values, reference_values = by_name.get("in-reply-to"), by_name.get("references")
    if not replied_values and not reference_values:
        return ()  # a message that starts a thread
    replied = [m.strip() for v in replied_values or () for m in _MSG_ID.findall(v)]
    references = [m.strip() for v in reference_values or () for m in _MSG_ID.findall(v)]
    ids = dict.fromkeys(replied)
    ids.update(dict.fromkeys(reversed(references[-_MAX_REFERENCES:])))
    ids.pop("", None)
    return tuple(ids)


def _decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded; undecodable bytes shown as U+FFFD."""
    if "=?" not in value:  # no encoded word: decoding would give the value back unchanged
        return value if value.isascii() else _SURROGATES.sub("\ufffd", value)
    try:
        text = str(make_header(decode_header(value)))
    except (HeaderParseError, LookupError, UnicodeError, ValueError):
        text = value
    return _SURROGATES.sub("\ufffd", text)


# The usual Date form (RFC 5322 section 3.3), optionally followed by a zone comment: read here
# as email.utils reads it (the day of the week is not checked, seconds default to 0), several
# times faster. Anything else goes to email.utils.
_PLAIN_DATE = re.compile(
    r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), )?([0-9]{1,2}) "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) ([1-9][0-9]{3}) "
    r"([0-9]{2}):([0-9]{2})(?::([0-9]{2}))? ([+-])([0-9]{2})([0-9]{2})(?: \([^()]*\))?"
)
_MONTHS = {
    m: i
    for i, m in enumerate(
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"], 1
    )
}


def iso_date(value: str) -> str:
    """ISO 8601 of the Date header, "" when missing or invalid. ``-0000`` (RFC 5322 section
    3.3: UTC, local offset unknown) gives a UTC time."""
    if not value:
        return ""
    try:
        plain = _plain_iso_date(value.strip())
        if plain is not None:
            return plain
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return ""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.isoformat()


def _plain_iso_date(value: str) -> str | None:
    """What iso_date gives through email.utils for a Date in the usual form, or None when it
    is not in that form. Raises ValueError for an impossible date or offset, as it does."""
    match = _PLAIN_DATE.fullmatch(value)
    if match is None:
        return None
    day, month, year, hour, minute, second, sign, zone_h, zone_m = match.groups()
    second = second or "00"
    # The fields but the day are digits of a fixed width: written out as they stand, with a
    # datetime built only for a date or time that may not exist, the one that email.utils'
    # datetime would refuse (2.5 -> 1.7 us per message of bench/watch.py).
    day_number = int(day)
    if not 1 <= day_number <= 28 or hour > "23" or minute > "59" or second > "59":
        datetime(int(year), _MONTHS[month], day_number, int(hour), int(minute), int(second))
    if zone_h < "24" and zone_m < "60" and (sign == "+" or zone_h != "00" or zone_m != "00"):
        zone = f"{sign}{zone_h}:{zone_m}"
    else:
        offset = int(zone_h) * 60 + int(zone_m)  # minutes; "+0260" is three hours, as there
        if offset >= 24 * 60:
            raise ValueError("UTC offset of a day or more")  # datetime.timezone refuses it too
        hours, minutes = divmod(offset, 60)
        sign = "-" if sign == "-" and offset else "+"  # -0000 reads as UTC
        zone = f"{sign}{hours:02d}:{minutes:02d}"
    return f"{year}-{_MONTHS[month]:02d}-{day_number:02d}T{hour}:{minute}:{second}{zone}"


def _relative(path: Path, root: Path) -> str:
    """The file name relative to the account's Maildir root, as the links query shows it."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        pass
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except (ValueError, OSError):
        return str(path)
