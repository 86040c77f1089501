from __future__ import annotations

import pytest

from sentlink.addresses import AmbiguousAddressError, normalize_address, parse_mailboxes
from sentlink.errors import SentlinkError


def test_comma_separated_mailboxes_give_one_address_each() -> None:
    value = 'Bob <bob@customer.test>, carol@customer.test, "Smith, Dan" <dan@customer.test>'
    assert parse_mailboxes(value) == [
        ("Bob", "bob@customer.test"),
        ("", "carol@customer.test"),
        ("Smith, Dan", "dan@customer.test"),
    ]


def test_group_expands_to_its_members_and_an_empty_group_to_none() -> None:
    assert parse_mailboxes("undisclosed-recipients:;") == []
    assert parse_mailboxes("Team: a@x.test, B <b@y.test>;") == [("", "a@x.test"), ("B", "b@y.test")]


def test_empty_value_gives_no_mailboxes() -> None:
    assert parse_mailboxes("  ") == []


def test_rfc2047_display_name_is_decoded() -> None:
    assert parse_mailboxes("=?utf-8?q?J=C3=B6rg?= <j@x.de>") == [("Jörg", "j@x.de")]


def test_encoded_word_quirks_of_common_clients_are_not_ambiguous() -> None:
    # Quoted encoded words and a missing space before "<" change only how the name shows.
    assert parse_mailboxes('"=?utf-8?q?J=C3=B6rg?=" <j@x.de>') == [("Jörg", "j@x.de")]
    assert parse_mailboxes("=?utf-8?q?J=C3=B6rg?=<j@x.de>") == [("Jörg", "j@x.de")]


@pytest.mark.parametrize(
    "value",
    [
        "a@x)<b@y>",
        '"a@x" <b@y>@z',
        "Bob <bob@x.test",
        "a@x.test <b@y.test>",
        "<a@x.test> b@y.test",
        "a@x.test (b@y.test, c@z.test",
        "a@b@c",
        "bob",
        "@x.test",
        "a@",
        "<>",
    ],
)
def test_ambiguous_or_broken_mailbox_raises(value: str) -> None:
    with pytest.raises(AmbiguousAddressError):
        parse_mailboxes(value)


def test_ambiguous_address_error_is_a_sentlink_error() -> None:
    assert issubclass(AmbiguousAddressError, SentlinkError)


def test_undecodable_bytes_in_an_address_make_it_ambiguous() -> None:
    garbage = b"caf\xe9@x.test".decode("utf-8", "surrogateescape")
    with pytest.raises(AmbiguousAddressError, match="undecodable"):
        parse_mailboxes(garbage)


def test_undecodable_bytes_in_a_display_name_become_replacement_characters() -> None:
    garbage = b"J\xf6rg <j@x.test>".decode("utf-8", "surrogateescape")
    assert parse_mailboxes(garbage) == [("J\ufffdrg", "j@x.test")]


def test_utf8_address_is_accepted() -> None:
    assert parse_mailboxes("Jörg <jörg@bücher.de>") == [("Jörg", "jörg@bücher.de")]


def test_deeply_nested_comments_raise_instead_of_crashing() -> None:
    with pytest.raises(AmbiguousAddressError):
        parse_mailboxes("(" * 5000 + "a@x.test")


def test_normalize_lowercases_and_idna_encodes_the_domain() -> None:
    assert normalize_address("Bob@Bücher.DE") == "bob@xn--bcher-kva.de"
    assert normalize_address("A@Example.COM.") == "a@example.com"


def test_normalize_strips_plus_tag_only_when_asked() -> None:
    assert normalize_address("bob+news@x.test") == "bob+news@x.test"
    assert normalize_address("bob+news@x.test", strip_plus=True) == "bob@x.test"
    assert normalize_address("+only@x.test", strip_plus=True) == "+only@x.test"


def test_normalize_rejects_what_is_not_an_address() -> None:
    for value in ("bob", "@x.test", "bob@"):
        with pytest.raises(AmbiguousAddressError):
            normalize_address(value)
