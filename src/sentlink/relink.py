"""Link past messages again once an address kept for review (``crm.unmatched: review``) belongs
to a record: what ``sentlink crm import`` does after importing.

Each such message is forgotten and its file linked afresh, so the new links, and the outbox
events for them, are written the way the linker writes every message: in one transaction. A
crash in between loses nothing: a forgotten file is not indexed, and the watcher's rescan (or
``sentlink reindex``) links it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sentlink.config.models import Config
from sentlink.linker import Linker
from sentlink.model import Direction
from sentlink.store import Store

log = logging.getLogger("sentlink.relink")


@dataclass(frozen=True)
class RelinkSummary:
    addresses: int  # addresses kept for review that now match a record
    messages: int  # messages linked again
    linked: int  # of those, how many got links
    missing: int  # files gone meanwhile (the rescan finds renamed ones)

    def as_dict(self) -> dict[str, int]:
        return {
            "addresses": self.addresses,
            "messages": self.messages,
            "linked": self.linked,
            "missing": self.missing,
        }


def relink_known_addresses(store: Store, linker: Linker, config: Config) -> RelinkSummary:
    """Link again every message with an unmatched address that now matches a record."""
    known = sorted(
        {
            row["email"]
            for row in store.unmatched_addresses()
            if linker.matching_records(row["email"])
        }
    )
    if not known:
        return RelinkSummary(0, 0, 0, 0)
    accounts = {a.name: a for a in config.accounts}
    plan = []
    for account_name, uniq in store.messages_for_emails(known):
        account = accounts.get(account_name)
        location = store.message_location(account_name, uniq) if account else None
        if account is None or location is None:
            continue  # an account no longer configured: its messages stay as they are
        plan.append((account, uniq, *location))
    store.forget_messages([(account.name, uniq) for account, uniq, _f, _n in plan])
    linked = missing = 0
    for account, _uniq, folder, file in plan:
        direction: Direction = "sent" if folder == account.sent_folder else "received"
        try:
            result = linker.link_file(account, folder, account.maildir / file, direction)
        except FileNotFoundError:
            missing += 1
            continue
        linked += result.status == "linked"
    log.info(
        "re-linked %d messages for %d newly known addresses: %d linked, %d files missing",
        len(plan),
        len(known),
        linked,
        missing,
    )
    return RelinkSummary(len(known), len(plan), linked, missing)
