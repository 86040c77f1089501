"""Who owns a sender address or a SASL login.

The authorization rule (docs/design.md): an authenticated login only ever gets copies into its
own account's mailbox; without authentication the envelope sender decides. Headers never do.
"""

from __future__ import annotations

from collections.abc import Sequence

from sentlink.addresses import AmbiguousAddressError, normalize_address
from sentlink.config.models import AccountConfig


def _normalized(addr: str) -> str | None:
    try:
        return normalize_address(addr)
    except AmbiguousAddressError:
        return None


class Accounts:
    """Lookups over the configured accounts; the first account listing a login/address wins."""

    def __init__(self, configs: Sequence[AccountConfig]) -> None:
        self._accounts = tuple(configs)
        self._by_login: dict[str, AccountConfig] = {}
        self._by_address: dict[str, AccountConfig] = {}
        self._owned: dict[str, frozenset[str]] = {}
        for account in self._accounts:
            for login in account.logins:
                self._by_login.setdefault(login, account)
            owned = set()
            for addr in account.addresses:
                norm = _normalized(addr)
                if norm is not None:
                    owned.add(norm)
                    self._by_address.setdefault(norm, account)
            self._owned[account.name] = frozenset(owned)

    def by_login(self, login: str) -> AccountConfig | None:
        """The account a SASL login belongs to (exact match: logins are identifiers)."""
        return self._by_login.get(login)

    def by_address(self, addr: str) -> AccountConfig | None:
        """The account owning ``addr``, compared normalized (case, IDNA domain)."""
        norm = _normalized(addr)
        return None if norm is None else self._by_address.get(norm)

    def owns(self, account: AccountConfig, addr: str) -> bool:
        """Whether ``addr`` is one of ``account``'s addresses."""
        norm = _normalized(addr)
        return norm is not None and norm in self._owned.get(account.name, frozenset())
