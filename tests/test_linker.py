from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from datetime import UTC
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from sentlink.config.models import (
    AccountConfig,
    Config,
    CrmConfig,
    MilterConfig,
    PrivateConfig,
)
from sentlink.headers import parse_header_bytes, read_header_bytes
from sentlink.linker import Linker, LinkResult, iso_date
from sentlink.model import Direction, Record
from sentlink.store import LinkRow, Store, open_store

BOB = Record("contact", "c1", "Bob Buyer", ("bob@customer.test",))
CAROL = Record("contact", "c2", "Carol", ("carol@customer.test",))
DAN = Record("contact", "c3", "Dan", ("dan@customer.test",))
LEE = Record("lead", "l1", "Lee Lead", ("lee@prospect.test",))
SHARED_LEAD = Record("lead", "l2", "Shared Lead", ("bob@customer.test",))
PRIYA = Record("contact", "c4", "Priya", ("priya@private.test",))
INSIDER = Record("contact", "c5", "Insider", ("ivan@example.test",))

_names = itertools.count(1)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path}/sentlink.db")
    s.upsert_records([BOB, CAROL, DAN, LEE, PRIYA, INSIDER])
    yield s
    s.close()


def alice(tmp_path: Path) -> AccountConfig:
    return AccountConfig(
        name="alice",
        addresses=("alice@example.test", "a.smith@example.test"),
        maildir=tmp_path / "mail" / "alice",
    )


def make_config(tmp_path: Path, **crm: object) -> Config:
    return Config(
        internal_domains=("example.test",),
        accounts=(alice(tmp_path),),
        crm=CrmConfig(**crm),  # type: ignore[arg-type]
    )


def deliver(tmp_path: Path, headers: str, folder: str = "Sent", body: str = "hello\n") -> Path:
    """A message file in the account's Maildir folder, as a client or the capture leaves it."""
    root = tmp_path / "mail" / "alice"
    base = root if folder == "INBOX" else root / f".{folder}"
    for sub in ("cur", "new", "tmp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    path = base / "cur" / f"1700000000.M{next(_names)}P1.host:2,S"
    text = headers.strip("\n").replace("\n", "\r\n") + "\r\n\r\n" + body
    path.write_bytes(text.encode("utf-8"))
    return path


def link(
    tmp_path: Path, store: Store, path: Path, direction: Direction = "sent", **crm: object
) -> LinkResult:
    config = make_config(tmp_path, **crm)
    folder = "INBOX" if direction == "received" else "Sent"
    return Linker(store, config).link_file(config.accounts[0], folder, path, direction)


def linked(store: Store, message_id: str) -> list[tuple[str, str, str, str]]:
    rows: list[LinkRow] = list(store.query_links(message_id=message_id))
    return sorted((r["record"]["id"], r["record"]["email"], r["role"], r["via"]) for r in rows)


def headers(message_id: str, to: str = "", cc: str = "", bcc: str = "", extra: str = "") -> str:
    lines = ["From: Alice <alice@example.test>", f"Message-ID: <{message_id}>"]
    lines += [f"{n}: {v}" for n, v in (("To", to), ("Cc", cc), ("Bcc", bcc)) if v]
    lines += ["Subject: Offer", "Date: Wed, 01 May 2024 10:00:00 +0200"]
    if extra:
        lines.append(extra)
    return "\n".join(lines)


def test_to_cc_and_bcc_recipients_are_linked_with_their_roles(tmp_path: Path, store: Store) -> None:
    path = deliver(
        tmp_path,
        headers(
            "m1@x", to="Bob <bob@customer.test>", cc="carol@customer.test", bcc="dan@customer.test"
        ),
    )
    result = link(tmp_path, store, path)
    assert (result.status, result.links, result.message_id) == ("linked", 3, "m1@x")
    assert linked(store, "m1@x") == [
        ("c1", "bob@customer.test", "to", "address"),
        ("c2", "carol@customer.test", "cc", "address"),
        ("c3", "dan@customer.test", "bcc", "address"),
    ]


def test_address_matching_ignores_case_and_unicode_domain_form(
    tmp_path: Path, store: Store
) -> None:
    store.upsert_record(Record("contact", "c9", "Jörg", ("jorg@bücher.test",)))
    path = deliver(tmp_path, headers("m1@x", to="BOB@Customer.Test, jorg@xn--bcher-kva.test"))
    assert link(tmp_path, store, path).links == 2


def test_lead_and_contact_are_linked_with_their_kind(tmp_path: Path, store: Store) -> None:
    path = deliver(tmp_path, headers("m1@x", to="bob@customer.test, lee@prospect.test"))
    link(tmp_path, store, path)
    kinds = {r["record"]["id"]: r["record"]["kind"] for r in store.query_links()}
    assert kinds == {"c1": "contact", "l1": "lead"}


def test_multiple_matches_link_every_record_by_default(tmp_path: Path, store: Store) -> None:
    store.upsert_record(SHARED_LEAD)
    path = deliver(tmp_path, headers("m1@x", to="bob@customer.test"))
    assert link(tmp_path, store, path).links == 2
    assert [row[0] for row in linked(store, "m1@x")] == ["c1", "l2"]


def test_contact_first_links_only_the_contact_when_one_matches(
    tmp_path: Path, store: Store
) -> None:
    store.upsert_record(SHARED_LEAD)
    path = deliver(tmp_path, headers("m1@x", to="bob@customer.test"))
    link(tmp_path, store, path, multiple_match="contact-first")
    assert [row[0] for row in linked(store, "m1@x")] == ["c1"]


def test_contact_first_links_leads_when_no_contact_matches(tmp_path: Path, store: Store) -> None:
    store.upsert_record(Record("lead", "l3", "Other lead", ("lee@prospect.test",)))
    path = deliver(tmp_path, headers("m1@x", to="lee@prospect.test"))
    link(tmp_path, store, path, multiple_match="contact-first")
    assert [row[0] for row in linked(store, "m1@x")] == ["l1", "l3"]


def test_never_log_address_is_not_linked(tmp_path: Path, store: Store) -> None:
    path = deliver(tmp_path, headers("m1@x", to="bob@customer.test, carol@customer.test"))
    link(tmp_path, store, path, never_log=("Carol@Customer.test",))
    assert [row[0] for row in linked(store, "m1@x")] == ["c1"]


def test_never_log_domain_covers_the_domain_and_its_subdomains(
    tmp_path: Path, store: Store
) -> None:
    store.upsert_record(Record("contact", "c8", "Sub", ("sam@mail.private.test",)))
    path = deliver(tmp_path, headers("m1@x", to="priya@private.test, sam@mail.private.test"))
    result = link(tmp_path, store, path, never_log=("@private.test",))
    assert (result.status, result.reason) == ("skipped", "never-log")
    assert linked(store, "m1@x") == []


def test_message_among_own_and_internal_addresses_only_is_skipped(
    tmp_path: Path, store: Store
) -> None:
    path = deliver(
        tmp_path,
        headers("m1@x", to="ivan@example.test", cc="a.smith@example.test, x@dev.example.test"),
    )
    result = link(tmp_path, store, path)
    assert (result.status, result.reason) == ("skipped", "internal-only")
    assert linked(store, "m1@x") == []
    assert store.has_message("alice", path.name.split(":2,")[0])


def test_internal_participants_are_not_linked_beside_external_ones(
    tmp_path: Path, store: Store
) -> None:
    path = deliver(tmp_path, headers("m1@x", to="bob@customer.test", cc="ivan@example.test"))
    link(tmp_path, store, path)
    assert [row[0] for row in linked(store, "m1@x")] == ["c1"]


@pytest.mark.parametrize("value", ["yes", "1", "TRUE", "private"])
def test_private_header_links_nothing(tmp_path: Path, store: Store, value: str) -> None:
    path = deliver(
        tmp_path, headers("m1@x", to="bob@customer.test", extra=f"X-CRM-Private: {value}")
    )
    result = link(tmp_path, store, path)
    assert (result.status, result.reason) == ("skipped", "private")
    assert linked(store, "m1@x") == []


@pytest.mark.parametrize("value", ["no", "0", "false", "off", ""])
def test_private_header_with_a_false_value_does_not_make_mail_private(
    tmp_path: Path, store: Store, value: str
) -> None:
    path = deliver(
        tmp_path, headers("m1@x", to="bob@customer.test", extra=f"X-CRM-Private: {value}")
    )
    assert link(tmp_path, store, path).status == "linked"


def test_private_subject_tag_matches_case_insensitively(tmp_path: Path, store: Store) -> None:
    text = headers("m1@x", to="bob@customer.test").replace(
        "Subject: Offer", "Subject: =?utf-8?q?Lunch_=5BPRIVATE=5D?="
    )
    path = deliver(tmp_path, text)
    assert link(tmp_path, store, path).reason == "private"


def test_private_marker_names_come_from_config(tmp_path: Path, store: Store) -> None:
    path = deliver(tmp_path, headers("m1@x", to="bob@customer.test", extra="X-Personal: 1"))
    result = link(tmp_path, store, path, private=PrivateConfig(header="X-Personal", subject_tag=""))
    assert result.reason == "private"


def test_reply_links_the_records_of_the_thread(tmp_path: Path, store: Store) -> None:
    first = deliver(tmp_path, headers("m1@x", to="bob@customer.test"))
    link(tmp_path, store, first)
    reply = deliver(
        tmp_path,
        headers(
            "m2@x", to="lee@prospect.test", extra="In-Reply-To: <m1@x>\nReferences: <m0@x> <m1@x>"
        ),
    )
    assert link(tmp_path, store, reply).links == 2
    assert linked(store, "m2@x") == [
        ("c1", "bob@customer.test", "to", "thread"),
        ("l1", "lee@prospect.test", "to", "address"),
    ]


def test_thread_does_not_override_an_address_decision(tmp_path: Path, store: Store) -> None:
    store.upsert_record(SHARED_LEAD)
    first = deliver(tmp_path, headers("m1@x", to="bob@customer.test"))
    link(tmp_path, store, first)  # "all": links c1 and l2
    reply = deliver(tmp_path, headers("m2@x", to="bob@customer.test", extra="In-Reply-To: <m1@x>"))
    link(tmp_path, store, reply, multiple_match="contact-first")
    assert linked(store, "m2@x") == [("c1", "bob@customer.test", "to", "address")]


def test_thread_links_nothing_for_a_private_reply(tmp_path: Path, store: Store) -> None:
    link(tmp_path, store, deliver(tmp_path, headers("m1@x", to="bob@customer.test")))
    reply = deliver(
        tmp_path,
        headers("m2@x", to="lee@prospect.test", extra="In-Reply-To: <m1@x>\nX-CRM-Private: yes"),
    )
    assert link(tmp_path, store, reply).reason == "private"
    assert linked(store, "m2@x") == []


def test_thread_continuity_stays_within_the_account(tmp_path: Path, store: Store) -> None:
    config = make_config(tmp_path)
    bert = AccountConfig(name="bert", addresses=("bert@example.test",), maildir=tmp_path / "b")
    first = deliver(tmp_path, headers("m1@x", to="bob@customer.test"))
    Linker(store, config).link_file(bert, "Sent", first, "sent")
    reply = deliver(tmp_path, headers("m2@x", to="lee@prospect.test", extra="In-Reply-To: <m1@x>"))
    link(tmp_path, store, reply)
    assert [row[0] for row in linked(store, "m2@x")] == ["l1"]


def test_ambiguous_address_links_nothing_and_is_not_parsed_again(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    path = deliver(tmp_path, headers("m1@x", to="bob@customer.test", cc="a@x)<lee@prospect.test>"))
    with caplog.at_level(logging.WARNING, logger="sentlink.linker"):
        result = link(tmp_path, store, path)
    assert result.status == "ambiguous"
    assert "Cc:" in result.reason
    assert linked(store, "m1@x") == []
    assert any("ambiguous address" in r.getMessage() for r in caplog.records)
    assert link(tmp_path, store, path).status == "already"


def test_linking_twice_is_idempotent_on_the_unique_name(tmp_path: Path, store: Store) -> None:
    path = deliver(tmp_path, headers("m1@x", to="bob@customer.test"))
    assert link(tmp_path, store, path).status == "linked"
    renamed = path.with_name(path.name + "T")  # a client flags it: ":2,ST"
    path.rename(renamed)
    assert link(tmp_path, store, renamed).status == "already"
    assert len(linked(store, "m1@x")) == 1
    row = next(store.query_links(message_id="m1@x"))
    assert row["file"] == f".Sent/cur/{renamed.name}"


def test_second_file_with_the_same_message_id_is_not_linked_again(
    tmp_path: Path, store: Store
) -> None:
    text = headers("m1@x", to="bob@customer.test")
    assert link(tmp_path, store, deliver(tmp_path, text)).status == "linked"
    result = link(tmp_path, store, deliver(tmp_path, text))
    assert (result.status, result.reason) == ("already", "message-id already indexed")
    assert len(linked(store, "m1@x")) == 1


def test_a_later_copy_adds_the_bcc_links_the_first_copy_lacked(
    tmp_path: Path, store: Store
) -> None:
    # The client's own copy has no Bcc; the capture copy, indexed after it, lists the envelope's.
    client = deliver(tmp_path, headers("m1@x", to="bob@customer.test"))
    assert link(tmp_path, store, client).status == "linked"
    ours = deliver(tmp_path, headers("m1@x", to="bob@customer.test", bcc="dan@customer.test"))
    assert link(tmp_path, store, ours).status == "already"
    assert linked(store, "m1@x") == [
        ("c1", "bob@customer.test", "to", "address"),
        ("c3", "dan@customer.test", "bcc", "address"),
    ]
    # A third copy names nobody new: nothing changes.
    third = deliver(tmp_path, headers("m1@x", to="bob@customer.test", bcc="dan@customer.test"))
    assert link(tmp_path, store, third).status == "already"
    assert len(linked(store, "m1@x")) == 2


def test_another_copy_adds_no_links_to_a_private_message(tmp_path: Path, store: Store) -> None:
    private = deliver(tmp_path, headers("m1@x", to="bob@customer.test", extra="X-CRM-Private: yes"))
    assert link(tmp_path, store, private).status == "skipped"
    other = deliver(tmp_path, headers("m1@x", to="bob@customer.test", bcc="dan@customer.test"))
    link(tmp_path, store, other)
    assert linked(store, "m1@x") == []


def test_received_mail_links_from_and_cc(tmp_path: Path, store: Store) -> None:
    text = "\n".join(
        [
            "From: Bob <bob@customer.test>",
            "To: alice@example.test, lee@prospect.test",
            "Cc: carol@customer.test, alice@example.test",
            "Message-ID: <r1@customer.test>",
        ]
    )
    path = deliver(tmp_path, text, folder="INBOX")
    link(tmp_path, store, path, direction="received")
    rows = list(store.query_links(message_id="r1@customer.test"))
    assert {(r["record"]["id"], r["role"], r["direction"]) for r in rows} == {
        ("c1", "from", "received"),
        ("c2", "cc", "received"),
    }
    assert rows[0]["folder"] == "INBOX" and rows[0]["file"] == f"cur/{path.name}"


def test_plus_tags_are_stripped_for_matching_when_configured(tmp_path: Path, store: Store) -> None:
    first = deliver(tmp_path, headers("m1@x", to="bob+orders@customer.test"))
    assert link(tmp_path, store, first).status == "skipped"
    second = deliver(tmp_path, headers("m2@x", to="bob+orders@customer.test"))
    assert link(tmp_path, store, second, strip_plus_tags=True).links == 1
    assert linked(store, "m2@x") == [("c1", "bob+orders@customer.test", "to", "address")]


def test_no_matching_record_is_skipped_as_no_match(tmp_path: Path, store: Store) -> None:
    result = link(tmp_path, store, deliver(tmp_path, headers("m1@x", to="who@nowhere.test")))
    assert (result.status, result.reason) == ("skipped", "no-match")


def test_subject_and_date_are_stored_decoded(tmp_path: Path, store: Store) -> None:
    text = headers("m1@x", to="bob@customer.test").replace(
        "Subject: Offer", "Subject: =?iso-8859-1?q?Caf=E9?= menu"
    )
    link(tmp_path, store, deliver(tmp_path, text))
    row = next(store.query_links(message_id="m1@x"))
    assert row["subject"] == "Café menu"
    assert row["date"] == "2024-05-01T10:00:00+02:00"


def test_bad_date_is_stored_empty(tmp_path: Path, store: Store) -> None:
    text = headers("m1@x", to="bob@customer.test").replace(
        "Date: Wed, 01 May 2024 10:00:00 +0200", "Date: yesterday-ish"
    )
    link(tmp_path, store, deliver(tmp_path, text))
    assert next(store.query_links(message_id="m1@x"))["date"] == ""


@pytest.mark.parametrize(
    "value",
    [
        "Wed, 01 May 2024 10:00:00 +0200",
        "1 May 2024 10:00 -0530",
        "Wed, 01 May 2024 10:00:00 -0000",
        "Wed, 01 May 2024 10:00:00 +0000 (UTC)",
        "Wed, 01 May 2024 10:00:00 +0260",
        "Wed, 01 May 2024 10:00:00 +2400",
        "Wed, 31 Apr 2024 10:00:00 +0200",
        "Wed, 01 May 2024 25:00:00 +0200",
        "Wed, 01 May 0024 10:00:00 +0200",
        "Wed, 01 May 24 10:00:00 +0200",
        "Wed, 01 may 2024 10:00:00 +0200",
        "Wed, 01 May 2024 10:00:00 GMT",
        "Wed,  01 May 2024 10:00:00 +0200",
    ],
)
def test_dates_read_as_email_utils_reads_them(value: str) -> None:
    # The usual form has a faster reader of its own; every form gives what email.utils gives.
    try:
        when = parsedate_to_datetime(value)
        expected = (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat()
    except ValueError:
        expected = ""
    assert iso_date(value) == expected


def test_eight_bit_garbage_headers_do_not_stop_linking(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "mail" / "alice" / ".Sent" / "cur"
    root.mkdir(parents=True)
    path = root / "garbage:2,S"
    path.write_bytes(
        b"To: J\xf6rg \xff\xfe <bob@customer.test>\r\nSubject: \xe9t\xe9\r\n"
        b"Message-ID: <g1@x>\r\n\r\nbody"
    )
    assert link(tmp_path, store, path).status == "linked"
    assert next(store.query_links(message_id="g1@x"))["subject"] == "\ufffdt\ufffd"


def test_folded_headers_are_unfolded(tmp_path: Path, store: Store) -> None:
    text = headers("m1@x", to="bob@customer.test,\n carol@customer.test")
    assert link(tmp_path, store, deliver(tmp_path, text)).links == 2


def test_header_section_over_the_cap_uses_the_fields_before_it(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    filler = "\n".join(f"X-Filler-{i}: {'y' * 60}" for i in range(200))  # ~15 KB
    text = "To: bob@customer.test\nMessage-ID: <m1@x>\n" + filler + "\nCc: carol@customer.test"
    path = deliver(tmp_path, text)
    config = Config(
        internal_domains=("example.test",),
        accounts=(alice(tmp_path),),
        milter=MilterConfig(max_header_bytes=4096),
    )
    with caplog.at_level(logging.WARNING, logger="sentlink.headers"):
        result = Linker(store, config).link_file(config.accounts[0], "Sent", path, "sent")
    assert result.links == 1
    assert [row[0] for row in linked(store, "m1@x")] == ["c1"]
    assert any("exceeds 4096 bytes" in r.getMessage() for r in caplog.records)


def test_header_reader_stops_at_the_empty_line(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.write_bytes(b"To: a@x.test\r\nSubject: s\r\n\r\nTo: not-a-header@x.test\r\n")
    raw, truncated = read_header_bytes(path)
    assert (raw, truncated) == (b"To: a@x.test\r\nSubject: s", False)


def test_header_cut_inside_a_field_drops_that_field() -> None:
    block = parse_header_bytes(b"Subject: s\r\nTo: a@x.test, bob@custo", truncated=True)
    assert block.get_all("To") == [] and block.get("Subject") == "s"
    folded = parse_header_bytes(b"To: a@x.test,\r\n bob@custo", truncated=True)
    assert folded.get_all("To") == []


def test_vanished_file_raises_file_not_found(tmp_path: Path, store: Store) -> None:
    path = deliver(tmp_path, headers("m1@x", to="bob@customer.test"))
    path.unlink()
    with pytest.raises(FileNotFoundError):
        link(tmp_path, store, path)
