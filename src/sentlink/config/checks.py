"""Checks that need more than a type: syntax of addresses, sockets, networks; uniqueness.

Run on the typed model; positions come from the Locations the builder recorded. The result is the
normalized model: addresses and domains lower-cased, as every later comparison expects.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from sentlink.config.listen import parse_dns_server, parse_listen
from sentlink.config.models import (
    AccountConfig,
    Config,
    CrmConfig,
    HookConfig,
    MilterConfig,
    OutboxConfig,
    SelfSentConfig,
    WatchRule,
)
from sentlink.config.problems import Locations, Problems
from sentlink.config.proxy_checks import check_proxy

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


def parse_host_port(value: str) -> tuple[str, int] | None:
    """``HOST:PORT`` or ``[V6]:PORT`` as (host, port), or None when it is not that."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


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
        if config.metrics is not None and parse_host_port(config.metrics.listen) is None:
            self.fail(("metrics", "listen"), "expected HOST:PORT, e.g. 127.0.0.1:9469")
        self.crm(config.crm)
        check_proxy(config, self.fail)
        if config.watch.rescan_seconds <= 0:
            self.fail(("watch", "rescan_seconds"), "must be a positive number of seconds")
        self.watch_rules(config.watch.rules)
        self.self_sent(config.self_sent)
        self.hooks(config.hooks)
        self.outbox(config.outbox, config.hooks)

    def self_sent(self, self_sent: SelfSentConfig) -> None:
        for i, server in enumerate(self_sent.dns_servers):
            try:
                parse_dns_server(server)
            except ValueError as exc:
                self.fail(("self_sent", "dns_servers", i), str(exc))
        if self_sent.dkim_max_bytes <= 0:
            self.fail(("self_sent", "dkim_max_bytes"), "must be a positive number of bytes")

    def watch_rules(self, rules: tuple[WatchRule, ...]) -> None:
        for i, rule in enumerate(rules):
            at = ("watch", "rules", i)
            cond = rule.when
            tests: list[tuple[str, str | None, str]] = [
                ("header", name, rx) for name, rx in cond.header.items()
            ]
            for key in ("from", "to", "cc", "subject", "any_recipient"):
                rx = getattr(cond, "from_" if key == "from" else key)
                if rx is not None:
                    tests.append((key, None, rx))
            for key, name, rx in tests:
                try:
                    re.compile(rx)
                except re.error as exc:
                    where = (*at, "if", key) if name is None else (*at, "if", key, name)
                    self.fail(where, f"invalid regex: {exc}")
            for j, flag in enumerate(rule.then.flag):
                if not (len(flag) == 1 and flag.isascii() and flag.isalpha()):
                    self.fail((*at, "then", "flag", j), f"'{flag}' is not a Maildir flag letter")

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

    def hooks(self, hooks: tuple[HookConfig, ...]) -> None:
        first: dict[str, int] = {}
        for i, hook in enumerate(hooks):
            at = ("hooks", i)
            if not _ACCOUNT_NAME.fullmatch(hook.name):
                self.fail(
                    (*at, "name"),
                    f"'{hook.name}' is not a hook name (letters, digits, '.', '_', '-')",
                )
            if hook.name in first:
                self.fail(
                    (*at, "name"),
                    f"hook '{hook.name}' is defined twice "
                    f"(first at line {self.line_of(('hooks', first[hook.name]))})",
                )
            first.setdefault(hook.name, i)
            for j, event in enumerate(hook.events):
                if event not in _EVENT_TYPES:
                    self.fail((*at, "events", j), f"unknown event type '{event}'")
            if hook.timeout <= 0:
                self.fail((*at, "timeout"), "must be a positive number of seconds")
            for key in _HOOK_REQUIRED.get(hook.type, ()):
                if getattr(hook, key) is None:
                    self.fail(at, f"a {hook.type} hook needs '{key}'")
            if hook.url is not None and not hook.url.startswith(("https://", "http://")):
                self.fail((*at, "url"), "must be an http:// or https:// URL")

    def outbox(self, outbox: OutboxConfig, hooks: tuple[HookConfig, ...]) -> None:
        if not outbox.backoff_seconds or any(s < 0 for s in outbox.backoff_seconds):
            self.fail(("outbox", "backoff_seconds"), "must be a non-empty list of seconds >= 0")
        for key in ("dead_letter_seconds", "lease_seconds", "batch", "poll_seconds"):
            if getattr(outbox, key) <= 0:
                self.fail(("outbox", key), "must be a positive number")
        longest = max((h.timeout for h in hooks), default=0)
        if outbox.lease_seconds <= longest:
            self.fail(
                ("outbox", "lease_seconds"),
                f"must exceed the longest hook timeout ({longest} s), or events are sent twice",
            )


_EVENT_TYPES = frozenset({"message.linked", "record.created"})
_HOOK_REQUIRED: dict[str, tuple[str, ...]] = {
    "webhook": ("url", "secret_file"),
    "command": ("path",),
    "zoho-crm": (
        "api_domain",
        "accounts_url",
        "client_id_file",
        "client_secret_file",
        "refresh_token_file",
    ),
}


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
