"""Checks that need more than a type: syntax of addresses, sockets, networks; uniqueness.

Run on the typed model; positions come from the Locations the builder recorded. The result is the
normalized model: addresses and domains lower-cased, as every later comparison expects.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from sentlink.config.listen import parse_listen
from sentlink.config.models import AccountConfig, Config, CrmConfig, MilterConfig
from sentlink.config.problems import Locations, Problems

_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9._-]+")
# A dot-atom local part (RFC 5322 3.4.1), UTF-8 allowed (RFC 6531); quoted local parts are not
# accepted: they never appear in the addresses people configure, and strict matching needs one form.
_ATOM = r"[^\s\x00-\x1f\x7f\"(),.:;<>@\[\]\\]+"
# Letters/digits/hyphens per label (RFC 1035 2.3.1), Unicode letters for IDN U-labels.
_LABEL = r"[^\W_](?:[\w-]{0,61}[^\W_])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_ADDRESS_RE = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_DOMAIN_RE.pattern}")
# RFC 5322 2.2: a field name is printable US-ASCII except the colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+")
_SOCKET_MODE = re.compile(r"0?[0-7]{3}")


def is_domain(value: str) -> bool:
    return _DOMAIN_RE.fullmatch(value) is not None and len(value) <= 253


def is_address(value: str) -> bool:
    """An addr-spec ``local@domain`` (no display name, no angle brackets)."""
    return _ADDRESS_RE.fullmatch(value) is not None


def check_config(config: Config, where: Locations, problems: Problems) -> Config:
    """Report every semantic problem; return the config with addresses and domains normalized."""
    _Checker(where, problems).config(config)
    return _normalized(config)


class _Checker:
    def __init__(self, where: Locations, problems: Problems) -> None:
        self.where = where
        self.problems = problems

    def fail(self, path: tuple[str | int, ...], message: str) -> None:
        self.problems.at(self.where.mark(path), message)

    def line_of(self, path: tuple[str | int, ...]) -> int:
        return self.where.mark(path).line

    def config(self, config: Config) -> None:
        self.store_url(config.store.url)
        for i, domain in enumerate(config.internal_domains):
            if not is_domain(domain):
                self.fail(("internal_domains", i), f"'{domain}' is not a domain name")
        self.accounts(config.accounts)
        if config.milter is not None:
            self.milter(config.milter)
        self.crm(config.crm)
        if config.watch.rescan_seconds <= 0:
            self.fail(("watch", "rescan_seconds"), "must be a positive number of seconds")

    def store_url(self, url: str) -> None:
        # The URL is not echoed: a postgresql:// URL may carry a password.
        if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
            return
        if url.startswith("postgresql://"):
            return
        hint = (
            " (postgres:// is spelled postgresql:// here)" if url.startswith("postgres://") else ""
        )
        self.fail(("store", "url"), f"must be sqlite:///PATH or postgresql://...{hint}")

    def accounts(self, accounts: tuple[AccountConfig, ...]) -> None:
        names: dict[str, int] = {}
        # value -> (index of the owning account, line of first use)
        addresses: dict[str, tuple[int, int]] = {}
        logins: dict[str, tuple[int, int]] = {}
        maildirs: dict[str, tuple[int, int]] = {}
        for i, account in enumerate(accounts):
            at = ("accounts", i)
            if not _ACCOUNT_NAME.fullmatch(account.name) or account.name in (".", ".."):
                self.fail(
                    (*at, "name"),
                    f"'{account.name}' is not an account name (letters, digits, '.', '_', '-')",
                )
            if account.name in names:
                self.fail(
                    (*at, "name"),
                    f"account '{account.name}' is defined twice "
                    f"(first at line {self.line_of(('accounts', names[account.name]))})",
                )
            names.setdefault(account.name, i)
            if not account.addresses:
                self.fail((*at, "addresses"), "an account needs at least one address")
            for j, address in enumerate(account.addresses):
                if not is_address(address):
                    self.fail(
                        (*at, "addresses", j), f"'{address}' is not an address (local@domain)"
                    )
                self.unique(addresses, address.lower(), accounts, i, (*at, "addresses", j))
            for j, login in enumerate(account.logins):
                self.unique(logins, login, accounts, i, (*at, "logins", j), "login ")
            self.unique(maildirs, str(account.maildir), accounts, i, (*at, "maildir"), "Maildir ")
            self.folder(account.sent_folder, (*at, "sent_folder"))
            if account.owner is not None and not account.owner.strip():
                self.fail((*at, "owner"), "is empty; write null for the process user")

    def unique(
        self,
        seen: dict[str, tuple[int, int]],
        value: str,
        accounts: tuple[AccountConfig, ...],
        index: int,
        path: tuple[str | int, ...],
        what: str = "",
    ) -> None:
        """An address, login or Maildir may belong to one account only."""
        line = self.line_of(path)
        if value in seen:
            owner, first = seen[value]
            if owner == index:
                self.fail(path, f"{what}'{value}' is listed twice (first at line {first})")
            else:
                name = accounts[owner].name
                self.fail(
                    path, f"{what}'{value}' already belongs to account '{name}' (line {first})"
                )
            return
        seen[value] = (index, line)

    def folder(self, name: str, path: tuple[str | int, ...]) -> None:
        # Maildir++ folders are ".NAME" directories under the Maildir root; "." separates levels.
        if not name or "/" in name or name.startswith(".") or name.endswith(".") or ".." in name:
            self.fail(path, f"'{name}' is not a Maildir++ folder name (e.g. Sent)")

    def milter(self, milter: MilterConfig) -> None:
        at = ("milter",)
        try:
            if parse_listen(milter.listen).family == "fd":
                # libmilter opens its own listening socket (smfi_setconn); it cannot adopt one.
                self.fail((*at, "listen"), "the milter cannot listen on an inherited fd: socket")
        except ValueError as error:
            self.fail((*at, "listen"), str(error))
        if not _SOCKET_MODE.fullmatch(milter.socket_mode):
            self.fail(
                (*at, "socket_mode"),
                f"'{milter.socket_mode}' is not an octal file mode like \"0660\"",
            )
        if milter.socket_group is not None and not milter.socket_group.strip():
            self.fail((*at, "socket_group"), "is empty; write null to keep the process group")
        if milter.timeout <= 0:
            self.fail((*at, "timeout"), "must be a positive number of seconds")
        if milter.max_header_bytes <= 0:
            self.fail((*at, "max_header_bytes"), "must be a positive number of bytes")
        for i, name in enumerate(milter.outbound.daemon_name):
            if not name.strip():
                self.fail((*at, "outbound", "daemon_name", i), "is empty")
        for i, cidr in enumerate(milter.outbound.internal_hosts):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                self.fail(
                    (*at, "outbound", "internal_hosts", i),
                    f"'{cidr}' is not an IP address or network (e.g. 192.0.2.0/24)",
                )

    def crm(self, crm: CrmConfig) -> None:
        for i, entry in enumerate(crm.never_log):
            domain = entry[1:] if entry.startswith("@") else None
            if not (is_domain(domain) if domain is not None else is_address(entry)):
                self.fail(
                    ("crm", "never_log", i),
                    f"'{entry}' is neither an address nor @domain",
                )
        header = crm.private.header
        if header and not _FIELD_NAME.fullmatch(header):
            self.fail(("crm", "private", "header"), f"'{header}' is not a header field name")


def _normalized(config: Config) -> Config:
    accounts = tuple(
        dataclasses.replace(a, addresses=tuple(x.lower() for x in a.addresses))
        for a in config.accounts
    )
    crm = dataclasses.replace(config.crm, never_log=tuple(x.lower() for x in config.crm.never_log))
    return dataclasses.replace(
        config,
        internal_domains=tuple(d.lower() for d in config.internal_domains),
        accounts=accounts,
        crm=crm,
    )
