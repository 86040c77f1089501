"""DKIM as the self-sent proof: an aligned signature that verifies against a key served by a
real (loopback) DNS server; anything else is not proof, and a DNS outage is only temporary."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from dns_lab import TxtServer, dkim_ed25519_key, dkim_key, dkim_sign
from sentlink.config.listen import parse_dns_server
from sentlink.watch.dkim_proof import DkimVerifier, aligned

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@customer.test>\r\n"
    b"Subject: Quote\r\n"
    b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <q1@example.test>\r\n"
    b"\r\n"
    b"Hello Bob,\r\nthe quote.\r\n"
)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    return dkim_key(tmp_path_factory.mktemp("dkim"))


@pytest.fixture
def dns_server(key: tuple[bytes, str]) -> Iterator[TxtServer]:
    with TxtServer({"s1._domainkey.example.test": key[1]}) as server:
        yield server


def verifier(server: TxtServer, **options: object) -> DkimVerifier:
    return DkimVerifier([server.address], timeout=1.0, **options)  # type: ignore[arg-type]


def test_an_aligned_valid_signature_is_proof(dns_server: TxtServer, key: tuple[bytes, str]) -> None:
    signed = dkim_sign(MESSAGE, "example.test", "s1", key[0])
    proof = verifier(dns_server).check(signed, "example.test")
    assert (proof.verified, proof.domain) == (True, "example.test")
    assert dns_server.queries == ["s1._domainkey.example.test"]


def test_a_parent_domain_signature_is_aligned_with_a_subdomain_sender(
    dns_server: TxtServer, key: tuple[bytes, str]
) -> None:
    signed = dkim_sign(MESSAGE, "example.test", "s1", key[0])
    assert verifier(dns_server).check(signed, "mail.example.test").verified
    assert aligned("example.test", "EXAMPLE.test.")
    assert not aligned("test", "example.test")  # a bare TLD is no signing domain
    assert not aligned("ample.test", "example.test")


def test_no_signature_or_a_foreign_domain_is_no_proof(
    dns_server: TxtServer, key: tuple[bytes, str]
) -> None:
    check = verifier(dns_server).check
    unsigned = check(MESSAGE, "example.test")
    assert not unsigned.verified and unsigned.reason == "no DKIM signature"
    # A valid signature, but by the forger's own domain: proves nothing about example.test.
    foreign = check(dkim_sign(MESSAGE, "forger.test", "s1", key[0]), "example.test")
    assert not foreign.verified and "not aligned" in foreign.reason
    assert not foreign.temporary
    assert dns_server.queries == []  # an unaligned signature is not even looked up


def test_a_changed_body_or_a_missing_key_fails_for_good(
    dns_server: TxtServer, key: tuple[bytes, str]
) -> None:
    signed = dkim_sign(MESSAGE, "example.test", "s1", key[0])
    check = verifier(dns_server).check
    tampered = check(signed.replace(b"the quote.", b"the invoice."), "example.test")
    assert not tampered.verified and not tampered.temporary
    unknown = check(dkim_sign(MESSAGE, "example.test", "nokey", key[0]), "example.test")
    assert not unknown.verified and not unknown.temporary


def test_a_dns_outage_is_temporary(dns_server: TxtServer, key: tuple[bytes, str]) -> None:
    dns_server.silent = True
    proof = verifier(dns_server).check(
        dkim_sign(MESSAGE, "example.test", "s1", key[0]), "example.test"
    )
    assert not proof.verified and proof.temporary and "key lookup failed" in proof.reason


def test_keys_are_cached_between_messages(dns_server: TxtServer, key: tuple[bytes, str]) -> None:
    check = verifier(dns_server).check
    for _ in range(3):
        assert check(dkim_sign(MESSAGE, "example.test", "s1", key[0]), "example.test").verified
    assert len(dns_server.queries) == 1


def test_a_message_over_the_size_cap_is_not_verified(
    dns_server: TxtServer, key: tuple[bytes, str]
) -> None:
    signed = dkim_sign(MESSAGE, "example.test", "s1", key[0])
    proof = verifier(dns_server, max_bytes=100).check(signed, "example.test")
    assert not proof.verified and "larger than 100 bytes" in proof.reason


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("192.0.2.1", ("192.0.2.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:5353", ("::1", 5353)),
        ("::1", ("::1", 53)),
    ],
)
def test_dns_servers_are_ip_addresses_with_an_optional_port(
    text: str, parsed: tuple[str, int]
) -> None:
    assert parse_dns_server(text) == parsed


@pytest.mark.parametrize("text", ["ns.example.test", "127.0.0.1:0", "127.0.0.1:x", "[::1"])
def test_bad_dns_servers_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_dns_server(text)


def test_an_ed25519_signature_is_proof_and_a_forged_one_is_not() -> None:
    # RFC 8463; providers that sign twice (RSA and Ed25519) need only one to verify.
    seed, record = dkim_ed25519_key()
    with TxtServer({"ed._domainkey.example.test": record}) as server:
        check = verifier(server).check
        signed = dkim_sign(MESSAGE, "example.test", "ed", seed, b"ed25519-sha256")
        assert b"a=ed25519-sha256" in signed
        proof = check(signed, "example.test")
        assert (proof.verified, proof.domain) == (True, "example.test")
        other_seed, _record = dkim_ed25519_key()  # signed with a key DNS does not publish
        forged = check(
            dkim_sign(MESSAGE, "example.test", "ed", other_seed, b"ed25519-sha256"), "example.test"
        )
        assert not forged.verified and not forged.temporary
        assert forged.reason.startswith("d=example.test")


def test_of_two_signatures_one_that_verifies_is_enough(key: tuple[bytes, str]) -> None:
    seed, record = dkim_ed25519_key()
    zone = {"ed._domainkey.example.test": record, "s1._domainkey.example.test": key[1]}
    with TxtServer(zone) as server:
        # The Ed25519 signature on top no longer matches once the body is changed below it;
        # sign the changed message with RSA and put a stale Ed25519 signature above it.
        changed = MESSAGE.replace(b"the quote.", b"the quote, revised.")
        stale_ed = dkim_sign(MESSAGE, "example.test", "ed", seed, b"ed25519-sha256")
        stale_header = stale_ed[: len(stale_ed) - len(MESSAGE)]
        both = stale_header + dkim_sign(changed, "example.test", "s1", key[0])
        assert verifier(server).check(both, "example.test").verified
        stale_alone = verifier(server).check(stale_header + changed, "example.test")
        assert not stale_alone.verified and "body hash mismatch" in stale_alone.reason
