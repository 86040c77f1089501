"""DKIM as proof that a fetched message really left from the account's own domain.

``self_sent.require: dkim``: a message whose From is the account's address moves to Sent only
when a DKIM signature on it verifies (RFC 6376) and its ``d=`` domain is the From domain or a
parent of it (relaxed identifier alignment, RFC 7489 3.1.1, with the parent-domain test standing
in for the organizational domain). Mail sent from the provider's webmail and fetched back by POP
carries the provider's signature; a forged From: from outside has no aligned valid signature.

Both signature algorithms in use are checked: rsa-sha256 (and rsa-sha1) and ed25519-sha256
(RFC 8463, through PyNaCl); providers that sign twice need only one of them to verify.

Public keys come from DNS TXT records (``selector._domainkey.domain``), through the system's
resolver or ``self_sent.dns_servers``; answers are cached for a few minutes. A lookup that times
out or fails on the server side is *temporary*: the watcher leaves the message where it is and
looks again at the next rescan, instead of deciding on a DNS outage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import dkim
import dkim.util
import dns.exception
import dns.resolver

from sentlink.config.listen import parse_dns_server
from sentlink.errors import SentlinkError

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
_CACHE_SECONDS = 300.0
_CACHE_ENTRIES = 1024


@dataclass(frozen=True)
class DkimProof:
    """The outcome for one message."""

    verified: bool
    domain: str = ""  # the d= of the aligned signature that verified
    reason: str = ""  # why not, for logs and --dry-run
    temporary: bool = False  # a DNS failure: decide again later


class DkimPending(SentlinkError):
    """The DKIM key could not be looked up for now: decide at the next rescan."""


class TemporaryDnsError(Exception):
    """The key lookup failed in a way that may pass (timeout, SERVFAIL, no server answered)."""


def aligned(signing_domain: str, from_domain: str) -> bool:
    """Relaxed alignment: the same domain, or ``d=`` a parent domain of the From domain."""
    d, f = signing_domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    return bool(d) and "." in d and (f == d or f.endswith("." + d))


class DkimVerifier:
    """Thread-safe; one per watcher, so its key cache serves every account."""

    def __init__(
        self,
        dns_servers: Sequence[str] = (),
        timeout: float = 5.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._timeout = timeout
        self.max_bytes = max_bytes
        servers = [parse_dns_server(s) for s in dns_servers]
        if servers:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [host for host, _ in servers]
            resolver.nameserver_ports = dict(servers)
        else:
            resolver = dns.resolver.Resolver()
        resolver.lifetime = timeout
        self._resolver = resolver
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, bytes | None]] = {}

    def check(self, message: bytes, from_domain: str) -> DkimProof:
        """Does an aligned DKIM signature on ``message`` (the whole message) verify?"""
        if len(message) > self.max_bytes:
            return DkimProof(False, reason=f"larger than {self.max_bytes} bytes: not verified")
        try:
            signer = dkim.DKIM(message, timeout=int(self._timeout))
        except Exception as exc:  # a message dkimpy cannot take is no proof, never a crash
            return DkimProof(False, reason=f"unparsable message: {exc}")
        signatures = [v for n, v in signer.headers if n.lower() == b"dkim-signature"]
        if not signatures:
            return DkimProof(False, reason="no DKIM signature")
        reasons: list[str] = []
        temporary = False
        for index, value in enumerate(signatures):
            try:
                tags = dkim.util.parse_tag_value(value)
            except dkim.util.InvalidTagValueList:
                reasons.append("unparsable signature")
                continue
            domain = tags.get(b"d", b"").decode("ascii", "replace")
            if not aligned(domain, from_domain):
                reasons.append(f"d={domain} is not aligned with {from_domain}")
                continue
            try:
                if signer.verify(idx=index, dnsfunc=self._txt):
                    return DkimProof(True, domain=domain)
                reasons.append(f"d={domain}: signature does not verify")
            except TemporaryDnsError as exc:
                temporary = True
                reasons.append(f"d={domain}: key lookup failed: {exc}")
            except Exception as exc:  # DKIMException: bad key, unknown algorithm...
                reasons.append(f"d={domain}: {exc}")
        return DkimProof(False, reason="; ".join(reasons), temporary=temporary)

    def _txt(self, name: bytes, timeout: float = 5.0) -> bytes | None:
        """dkimpy's dnsfunc: the TXT record at ``name`` (strings joined), None when there is
        none; TemporaryDnsError when the answer may be different later."""
        key = name.decode("ascii", "replace").lower()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        try:
            answer = self._resolver.resolve(key, "TXT", search=False, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            value = None
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise TemporaryDnsError(str(exc) or type(exc).__name__) from None
        except dns.exception.DNSException as exc:
            raise TemporaryDnsError(str(exc) or type(exc).__name__) from None
        else:
            records = [b"".join(r.strings) for r in answer] if answer.rrset is not None else []
            value = records[0] if records else None
        with self._lock:
            if len(self._cache) >= _CACHE_ENTRIES:
                self._cache.clear()
            self._cache[key] = (now + _CACHE_SECONDS, value)
        return value
