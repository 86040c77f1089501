"""The faster forms of the linker's header readers give what the plain ones give, on many
seeded random inputs and the odd cases: dates (email.utils), references, encoded words,
display names and the exclusion checks (the former algorithms, kept here)."""

from __future__ import annotations

import random
import re
from datetime import UTC
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.utils import parsedate_to_datetime
from pathlib import Path

from sentlink.addresses import (
    AmbiguousAddressError,
    _decode_phrase,
    address_domain,
    normalize_address,
    parse_mailboxes,
)
from sentlink.config.models import AccountConfig, Config, CrmConfig
from sentlink.headers import parse_header_bytes
from sentlink.linker import LinkFilter, _decode_words, _in_domains, _references, iso_date

_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
_MSG_ID = re.compile(r"<([^<>]+)>")
_SURROGATES = re.compile("[\udc80-\udcff]")


def email_utils_iso_date(value: str) -> str:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return ""
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat()


def random_date(rng: random.Random) -> str:
    day = str(rng.randrange(0, 40))
    if rng.random() < 0.3:
        day = day.zfill(2)
    year = rng.choice([1000, 1900, 2000, 2023, 2024, 2100, 9999, rng.randrange(1000, 10000)])
    time = f"{rng.randrange(0, 30):02d}:{rng.randrange(0, 70):02d}"
    if rng.random() < 0.8:
        time += f":{rng.randrange(0, 70):02d}"
    zone = f"{rng.choice('+-')}{rng.randrange(0, 30):02d}{rng.randrange(0, 100):02d}"
    if rng.random() < 0.2:
        zone = rng.choice(["+0000", "-0000", "+2400", "-2359", "+0260", "+0099"])
    value = f"{day} {rng.choice(_MONTHS)} {year} {time} {zone}"
    if rng.random() < 0.5:
        value = f"{rng.choice(['Mon', 'Tue', 'Sun'])}, {value}"
    if rng.random() < 0.2:
        value += " (CEST)"
    return value


def test_plain_dates_read_as_email_utils_reads_them() -> None:
    rng = random.Random(1)
    values = [random_date(rng) for _ in range(20000)]
    values += [f"{d} Feb {y} 10:00 +0100" for d in (28, 29, 30) for y in (1900, 2000, 2023, 2024)]
    values += ["31 Apr 2024 10:00:00 +0200", "0 May 2024 10:00 +0000", "1 May 2024 24:00 +0000"]
    values += ["1 May 2024 23:59:60 +0000", "1 May 2024 10:00:00 -0000", " 1 May 2024 10:00 +0000"]
    for value in values:
        assert iso_date(value) == email_utils_iso_date(value), value


def former_references(values: dict[str, list[str]]) -> tuple[str, ...]:
    ids: dict[str, None] = {}
    for value in values.get("in-reply-to", []):
        ids.update((m.strip(), None) for m in _MSG_ID.findall(value))
    references = [m.strip() for v in values.get("references", []) for m in _MSG_ID.findall(v)]
    ids.update((m, None) for m in reversed(references[-50:]))
    ids.pop("", None)
    return tuple(ids)


def test_references_are_those_of_the_former_reader() -> None:
    rng = random.Random(2)
    ids = ["<a@x>", "< b@x >", "<>", "< >", "<a@x>", "junk", "<c@x", "<d@x><e@x>", "<a@x> <f@x>"]
    for _ in range(5000):
        lines = []
        for name in ("In-Reply-To", "References"):
            for _ in range(rng.choice([0, 0, 1, 1, 2])):
                count = rng.choice([0, 1, 3, 60])
                lines.append(f"{name}: " + " ".join(rng.choice(ids) for _ in range(count)))
        headers = parse_header_bytes("\n".join(lines).encode())
        assert _references(headers) == former_references(headers.by_name), lines


def former_decode_words(value: str) -> str:
    if "=?" not in value:
        return _SURROGATES.sub("\ufffd", value)
    try:
        text = str(make_header(decode_header(value)))
    except (HeaderParseError, LookupError, UnicodeError, ValueError):
        text = value
    return _SURROGATES.sub("\ufffd", text)


def test_subjects_decode_as_with_the_former_reader() -> None:
    values = ["", "plain", "caf\udce9", "=?utf-8?q?caf=C3=A9?=", "=?x?", "=?utf-8?b?Zm9v?= \udcff"]
    values += ["d\u00e9j\u00e0 vu", "\x00\x7f", "a =? b"]
    for value in values:
        assert _decode_words(value) == former_decode_words(value), value


def former_decode_phrase(phrase: str) -> str:
    # The plain-word part of _decode_phrase: words split at whitespace, joined by one space.
    return " ".join(re.split(r"[ \t]+", phrase))


def test_plain_display_names_are_joined_as_before() -> None:
    rng = random.Random(3)
    for _ in range(5000):
        words = [rng.choice(["Bob", "Q.", "O'Neil", "x-y", "a_b", "J"]) for _ in range(4)]
        seps = [rng.choice([" ", " ", "  ", "\t", " \t"]) for _ in range(3)]
        phrase = words[0] + "".join(s + w for s, w in zip(seps, words[1:], strict=True))
        assert _decode_phrase(phrase) == former_decode_phrase(phrase), phrase


def test_exclusion_checks_are_those_of_the_former_ones(tmp_path: Path) -> None:
    config = Config(
        internal_domains=("example.test", "corp.test"),
        accounts=(AccountConfig("alice", ("alice@example.test",), tmp_path / "m"),),
        crm=CrmConfig(never_log=("boss@customer.test", "@secret.test"), strip_plus_tags=True),
    )
    link_filter = LinkFilter(config)
    own = link_filter.own("alice")
    rng = random.Random(4)
    locals_ = ["alice", "alice+x", "boss", "boss+tag", "bob"]
    domains = ["example.test", "sub.example.test", "corp.test", "customer.test", "secret.test"]
    domains += ["a.secret.test", "other.test", "xexample.test"]
    for _ in range(3000):
        email = f"{rng.choice(locals_)}@{rng.choice(domains)}"
        forms = link_filter.forms(email)
        internal = any(f in own for f in forms) or _in_domains(
            address_domain(email), frozenset({"example.test", "corp.test"})
        )
        never = any(f in link_filter._never_addresses for f in forms) or _in_domains(
            address_domain(email), frozenset({"secret.test"})
        )
        assert link_filter.is_internal(email, own) == internal, email
        assert link_filter.is_never_log(email) == never, email


def test_remembered_mailboxes_are_what_parsing_gives_and_stay_bounded(tmp_path: Path) -> None:
    """``LinkFilter.mailboxes`` (shared by the self-sent rule and the draft) answers as parsing
    and normalizing does, each time, an ambiguous value raising each time; and it holds no
    more than its bound however many values pass."""
    link_filter = LinkFilter(
        Config(accounts=(AccountConfig("alice", ("alice@example.test",), tmp_path / "m"),))
    )
    rng = random.Random(5)
    names = ["", "Bob", "=?utf-8?q?J=C3=B6rg?=", '"Doe, Jane"', "Q."]
    addrs = ["bob@Customer.TEST", "j@xn--mller-kva.de", "undisclosed-recipients:;", "x@[1.2.3.4]"]
    values = ['"unclosed <a@b.test>', "a@b.test, , c@d.test", "\udcff@x.test", "not an address"]
    for _ in range(400):
        parts = [
            f"{rng.choice(names)} <{rng.choice(addrs)}>"
            if rng.random() < 0.5
            else rng.choice(addrs)
            for _ in range(rng.randint(1, 3))
        ]
        values.append(", ".join(parts))
    for value in values * 2:  # the second time from what was remembered
        try:
            expected: object = [
                (name, normalize_address(addr)) for name, addr in parse_mailboxes(value)
            ]
        except AmbiguousAddressError:
            expected = AmbiguousAddressError
        try:
            got: object = list(link_filter.mailboxes(value))
        except AmbiguousAddressError:
            got = AmbiguousAddressError
        assert got == expected, value
    for n in range(5000):
        link_filter.mailboxes(f"user{n}@customer.test")
    assert len(link_filter._mailboxes) <= 1024
