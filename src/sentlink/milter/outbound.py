"""Is this SMTP session outbound? The vocabulary admins know from OpenDKIM and rspamd."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sentlink.config.models import OutboundConfig
from sentlink.errors import ConfigError

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class OutboundPolicy:
    auth: bool
    daemon_names: frozenset[str]
    internal_hosts: tuple[_Network, ...]

    @classmethod
    def from_config(cls, config: OutboundConfig) -> OutboundPolicy:
        networks: list[_Network] = []
        problems: list[str] = []
        for cidr in config.internal_hosts:
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError as exc:
                problems.append(f"milter.outbound.internal_hosts: {exc}")
        if problems:
            raise ConfigError(problems)
        return cls(config.auth, frozenset(config.daemon_name), tuple(networks))

    def why_outbound(self, login: str | None, daemon_name: str | None, client_addr: str) -> str:
        """Which rule makes the session outbound ("auth", "daemon_name", "internal_host"), or
        "" when none does."""
        if self.auth and login:
            return "auth"
        # Postfix: -o milter_macro_daemon_name=ORIGINATING on the submission service.
        if daemon_name and daemon_name in self.daemon_names:
            return "daemon_name"
        if client_addr and self._internal(client_addr):
            return "internal_host"
        return ""

    def _internal(self, client_addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(client_addr.strip("[]"))
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.internal_hosts)
