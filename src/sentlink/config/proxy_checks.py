"""Checks of the ``proxy:`` section and of per-account ``upstream:`` overrides."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable

from sentlink.config.models import Config, ProxyConfig, UpstreamConfig

Path_ = tuple[str | int, ...]
Fail = Callable[[Path_, str], None]


def parse_host_port(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port); ValueError with a message otherwise."""
    host, colon, port = spec.rpartition(":")
    if not colon or not host:
        raise ValueError(f"'{spec}' is not HOST:PORT (e.g. 127.0.0.1:10025)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"'{spec}': write an IPv6 address in brackets, [::1]:PORT")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{spec}': port must be a number from 1 to 65535")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"'{spec}': missing or malformed host")
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    """A literal loopback address or ``localhost`` (names are not resolved here)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_proxy(config: Config, fail: Fail) -> None:
    proxy = config.proxy
    for i, account in enumerate(config.accounts):
        if account.upstream is not None:
            _upstream(account.upstream, ("accounts", i, "upstream"), fail)
    if proxy is None:
        return
    at: Path_ = ("proxy",)
    listen_host = _host_port(proxy.listen, (*at, "listen"), fail)
    _host_port(proxy.reinject, (*at, "reinject"), fail)
    tls = proxy.tls
    if (tls.cert is None) != (tls.key is None):
        fail((*at, "tls"), "give both cert and key, or neither")
    if tls.implicit and tls.cert is None:
        fail((*at, "tls", "implicit"), "implicit TLS needs cert and key")
    if proxy.mode == "submission":
        _submission(config, proxy, listen_host, fail)
    for i, cidr in enumerate(proxy.internal_hosts):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            fail(
                (*at, "internal_hosts", i),
                f"'{cidr}' is not an IP address or network (e.g. 192.0.2.0/24)",
            )
    for f in dataclasses.fields(proxy.limits):
        if getattr(proxy.limits, f.name) <= 0:
            fail((*at, "limits", f.name), "must be a positive number")


def _submission(config: Config, proxy: ProxyConfig, listen_host: str | None, fail: Fail) -> None:
    if proxy.tls.cert is None and listen_host is not None and not is_loopback_host(listen_host):
        # RFC 8314 / RFC 4954 4: credentials must not cross a network in clear text.
        fail(
            ("proxy", "tls"),
            "submission mode on a non-loopback address needs tls cert and key "
            "(AUTH would travel in clear text)",
        )
    if proxy.upstream is not None:
        _upstream(proxy.upstream, ("proxy", "upstream"), fail)
    elif not any(a.upstream is not None for a in config.accounts):
        fail(("proxy", "mode"), "submission mode needs proxy.upstream or an account upstream")


def _host_port(spec: str, path: Path_, fail: Fail) -> str | None:
    try:
        return parse_host_port(spec)[0]
    except ValueError as error:
        fail(path, str(error))
        return None


def _upstream(upstream: UpstreamConfig, path: Path_, fail: Fail) -> None:
    if not upstream.host.strip():
        fail((*path, "host"), "is empty")
    if not 0 < upstream.port < 65536:
        fail((*path, "port"), "must be a number from 1 to 65535")
    if upstream.tls == "none" and not is_loopback_host(upstream.host):
        fail((*path, "tls"), "none is only allowed for a loopback upstream (127.0.0.1, ::1)")
    auth = upstream.auth
    if not isinstance(auth, str) and not auth.username:
        fail((*path, "auth", "username"), "is empty")
