"""The part of handling a message file that needs neither the store nor the disk beyond reading
the file: its header section, the rules' decision and the linker's draft.

A reconcile of many files computes this in a worker process, a chunk of files ahead of the main
process, which carries out moves and writes the store (watch/scan.py): on two cores the parsing
then overlaps the store work instead of adding to it. Single files (events) are prepared in the
watcher's thread, through the same code, so both paths decide alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from sentlink.config.models import AccountConfig
from sentlink.headers import FieldSelection, HeaderBlock, StrPath, read_headers
from sentlink.linker import Draft, DraftFields, LinkFilter, draft_of, iso_date
from sentlink.maildir.names import merge_flags
from sentlink.model import Direction
from sentlink.trace import TRACE_HEADER
from sentlink.watch.dkim_proof import DkimPending, DkimVerifier
from sentlink.watch.policy import WatchPolicy
from sentlink.watch.rules import (
    NO_RULE,
    Decision,
    MessageFacts,
    needs_dkim,
    own_addresses,
    self_sent_reason,
)


def direction_of(account: AccountConfig, folder: str) -> Direction:
    return "sent" if folder == account.sent_folder else "received"


# The header fields the main process still reads once a file is prepared: the sender, for hook
# events (Linker.request), and our trace header with the Message-ID it signs, to tell whose a
# duplicate copy is (MessageHandler._deduplicate). A worker sends only these back, and only for
# a message whose handling may read them (see Preparer.prepare_packed).
_TRACE_KEY = TRACE_HEADER.lower()
_KEPT_FIELDS = frozenset({"from", "message-id", _TRACE_KEY})


@dataclass(frozen=True)
class Prepared:
    """A message file read and judged: what the rules decided, and the linker's draft for the
    folder the message ends up in. ``headers`` may hold only the fields the rest of handling
    reads (see ``slim``)."""

    headers: HeaderBlock
    decision: Decision
    draft: Draft

    def slim(self) -> Prepared:
        """The same, with only the header fields read after preparing (less to send back)."""
        fields = tuple([f for f in self.headers.fields if f[0].lower() in _KEPT_FIELDS])
        return Prepared(HeaderBlock(fields, self.headers.truncated), self.decision, self.draft)


class Preparer:
    """Reads and judges message files; holds configuration only, so it can be sent to a worker
    process (its caches are rebuilt there). ``reads_sender``: writing a message reads its From
    field (``Linker.reads_sender``)."""

    def __init__(
        self, policy: WatchPolicy, link_filter: LinkFilter, reads_sender: bool = True
    ) -> None:
        self._policy = policy
        self._filter = link_filter
        self._reads_sender = reads_sender
        self._own: dict[str, frozenset[str]] = {}
        self._dkim: DkimVerifier | None = None
        # The header fields anything after reading looks at: the rules and the self-sent rule
        # (MessageFacts), the linker's draft, and the main process (_KEPT_FIELDS).
        self._fields = FieldSelection(
            (
                *MessageFacts.HEADER_NAMES,
                *policy.rules.header_names(),
                *link_filter.header_names(),
                *_KEPT_FIELDS,
            )
        )

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_own": {}, "_dkim": None}

    def read(self, path: StrPath) -> HeaderBlock:
        """The header fields of the file that handling it reads (see ``_fields``)."""
        return read_headers(path, self._policy.max_header_bytes, self._fields)

    def prepare(self, account: AccountConfig, folder: str, path: StrPath) -> Prepared:
        """Read and judge ``path`` in ``folder``. Raises OSError (FileNotFoundError when it
        vanished) like reading it does."""
        headers = self.read(path)
        decision, fields = self._judge(account, folder, headers, path)
        return Prepared(headers, decision, draft_of(fields))

    def prepare_packed(self, account: AccountConfig, folder: str, path: StrPath) -> Packed:
        """``prepare(...).slim()`` as a worker sends it back (``unpack`` gives that); raises
        like ``prepare``. Built as tuples from the start: no object per participant, nor a
        draft or preparation, to build and take apart again.

        The kept header fields are left out (no field at all) when nothing will read them:
        when writing the message does not read its sender, and it neither ends up in the Sent
        folder (where copies are told apart by their trace header) nor has a trace header."""
        headers = self.read(path)
        decision, fields = self._judge(account, folder, headers, path, raw_date=True)
        if (
            self._reads_sender
            or (decision.move or folder) == account.sent_folder
            or _TRACE_KEY in headers.by_name
        ):
            kept = tuple([f for f in headers.fields if f[0].lower() in _KEPT_FIELDS])
        else:
            kept = ()
        return (
            kept,
            headers.truncated,
            None if decision is NO_RULE or decision == NO_RULE else decision,
            *fields,
        )

    def _judge(
        self,
        account: AccountConfig,
        folder: str,
        headers: HeaderBlock,
        path: StrPath,
        raw_date: bool = False,
    ) -> tuple[Decision, DraftFields]:
        """The decision, and the draft for the folder the message ends up in."""
        decision, _facts = self.decide(account, folder, headers, path)
        direction = direction_of(account, decision.move or folder)
        draft = self._filter.draft_fields(account.name, headers, direction, raw_date)
        return decision, draft

    def facts(self, headers: HeaderBlock) -> MessageFacts:
        return MessageFacts(headers, self._policy.secret, self._filter.mailboxes)

    def decide(
        self,
        account: AccountConfig,
        folder: str,
        headers: HeaderBlock,
        path: StrPath | None = None,
    ) -> tuple[Decision, MessageFacts]:
        """User rules, then in INBOX the built-in self-sent rule (with ``self_sent.require:
        dkim``, its DKIM check reads the whole file at ``path``; without a path, no move).

        Raises DkimPending when the DKIM key lookup failed for now: the file is left as it is
        and judged again at the next rescan."""
        policy = self._policy
        facts = MessageFacts(headers, policy.secret, self._filter.mailboxes)
        decision = policy.rules.decide(facts)
        if decision.move is None and folder.upper() == "INBOX":
            own = self._own_of(account)
            require = policy.self_sent_require
            why = self_sent_reason(facts, account.name, own, require)
            if why is None and needs_dkim(facts, account.name, own, require):
                why, note = self._dkim_reason(facts, path)
                if note:
                    decision = replace(decision, reasons=(*decision.reasons, note))
            if why is not None:
                decision = replace(
                    decision,
                    move=account.sent_folder,
                    flags=merge_flags(decision.flags, "S"),
                    reasons=(*decision.reasons, why),
                )
        if decision.move is not None and decision.move == folder:
            decision = replace(decision, move=None)
        return decision, facts

    def _dkim_reason(self, facts: MessageFacts, path: StrPath | None) -> tuple[str | None, str]:
        """(the self-sent reason, or None with a note on why DKIM did not prove it)."""
        if path is None:
            return None, "From is the account's, DKIM not checked"
        if self._dkim is None:
            self._dkim = DkimVerifier(
                self._policy.dns_servers, max_bytes=self._policy.dkim_max_bytes
            )
        with open(path, "rb") as f:
            message = f.read(self._policy.dkim_max_bytes + 1)
        domain = facts.from_[0].rpartition("@")[2]
        proof = self._dkim.check(message, domain)
        if proof.verified:
            return f"self-sent (From is the account's, DKIM d={proof.domain})", ""
        if proof.temporary:
            raise DkimPending(f"DKIM check postponed to the next rescan: {proof.reason}")
        return None, f"From is the account's, no DKIM proof: {proof.reason}"

    def _own_of(self, account: AccountConfig) -> frozenset[str]:
        own = self._own.get(account.name)
        if own is None:
            own = self._own[account.name] = own_addresses(account)
        return own


# A slim Prepared as the worker sends it back (``Preparer.prepare_packed``): header fields,
# truncated, the decision (None for the default one), then the draft's fields (``DraftFields``)
# with the Date field as written: the main process turns it into the draft's date
# (``packed_date``). Of the two processes of a reconcile the worker is the busier one, and this
# step (about 2 us) weighs the same in either. Tuples and strings pickle and unpickle several
# times faster than the dataclasses they stand for (each an object with a state dictionary).
Packed = tuple[tuple[tuple[str, str], ...], bool, Decision | None, *DraftFields]


def unpack(packed: Packed) -> Prepared:
    """The slim Prepared that ``Preparer.prepare_packed`` stands for (with no header field
    at all where it left them out)."""
    return Prepared(kept_headers(packed), packed[2] or NO_RULE, packed_draft(packed))


def packed_draft(packed: Packed, date: str | None = None) -> Draft:
    """The draft of a packed Prepared; ``date``: its ``packed_date``, when known already."""
    if date is None:
        date = packed_date(packed)
    return draft_of((*packed[3:5], date, *packed[6:]))


def packed_date(packed: Packed) -> str:
    """The draft's date of a packed Prepared (ISO 8601, "" when missing or invalid)."""
    return iso_date(packed[5])


def kept_headers(packed: Packed) -> HeaderBlock:
    """The header fields a packed Prepared kept (``_KEPT_FIELDS``)."""
    return HeaderBlock(packed[0], packed[1])


def packed_candidates(packed: Packed) -> list[str]:
    """The addresses ``Linker.prime`` looks up for a packed Prepared's draft: its candidates'."""
    participants = packed[8]
    return [participants[i][0] for i in packed[11]]


def packed_thread_refs(packed: Packed) -> tuple[str, ...]:
    """The Message-IDs ``Linker.prime`` looks up for a packed Prepared's draft: those it
    replies to, when its plan looks up thread links (not private, ambiguous or skipped)."""
    return () if packed[7] or packed[9] or packed[10] else packed[6]


def prepare_chunk(
    preparer: Preparer, account: AccountConfig, folder: str, paths: Sequence[str]
) -> list[Packed | None]:
    """``Preparer.prepare_packed`` for each path, in a worker process (``unpack`` gives the
    slim Prepared back; watch/worker.py). A file that fails gives None: the main process then
    handles it from the start itself, and reports what goes wrong."""
    prepared: list[Packed | None] = []
    for path in paths:
        try:
            prepared.append(preparer.prepare_packed(account, folder, path))
        except Exception:
            prepared.append(None)
    return prepared
