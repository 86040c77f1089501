from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sentlink.crm_import import import_records, import_units
from sentlink.model import Record
from sentlink.store import Store, open_store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path}/sentlink.db")
    yield s
    s.close()


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def test_csv_rows_with_the_same_kind_and_id_are_one_record(tmp_path: Path, store: Store) -> None:
    path = write(
        tmp_path,
        "crm.csv",
        "kind,id,name,email\n"
        "contact,c1,Bob Buyer,bob@customer.test\n"
        "contact,c1,,Bob.Buyer@Customer.TEST\n"
        "lead,c1,Same id other kind,lee@prospect.test\n",
    )
    summary = import_records(path, store)
    assert (summary.records, summary.addresses, summary.errors) == (2, 3, ())
    assert store.records_by_email("bob.buyer@customer.test") == [
        Record("contact", "c1", "Bob Buyer", ("bob@customer.test", "bob.buyer@customer.test"))
    ]
    assert store.records_by_email("lee@prospect.test")[0].kind == "lead"


def test_csv_bad_rows_are_reported_with_line_numbers_and_the_rest_imported(
    tmp_path: Path, store: Store
) -> None:
    path = write(
        tmp_path,
        "crm.csv",
        "kind,id,name,email\n"  # 1
        "contact,c1,Bob,bob@customer.test\n"  # 2
        "customer,c2,Carol,carol@customer.test\n"  # 3: bad kind
        "contact,,Nobody,nobody@customer.test\n"  # 4: no id
        "contact,c3,Dan,dan-at-customer\n"  # 5: bad email
        "contact,c4,Eve\n"  # 6: missing field
        '"contact","c5","Multi\nline name","multi@customer.test"\n'  # 7-8: fine
        "contact,c6,Two,a@x.test b@y.test\n"  # 9: ambiguous
        "\n"  # 10: blank, ignored
        "lead,l1,Lee,lee@prospect.test\n",  # 11
    )
    summary = import_records(path, store)
    assert summary.records == 3
    assert [e.split(": ", 1)[0] for e in summary.errors] == [
        f"{path}:3",
        f"{path}:4",
        f"{path}:5",
        f"{path}:6",
        f"{path}:9",
    ]
    assert "kind must be contact or lead" in summary.errors[0]
    assert store.records_by_email("multi@customer.test")[0].name == "Multi\nline name"


def test_csv_with_a_wrong_header_imports_nothing(tmp_path: Path, store: Store) -> None:
    path = write(tmp_path, "crm.csv", "type,id,name,mail\ncontact,c1,Bob,bob@customer.test\n")
    summary = import_records(path, store)
    assert summary.records == 0
    assert summary.errors == (f"{path}:1: expected the header kind,id,name,email",)


def test_csv_from_a_spreadsheet_with_bom_and_crlf_is_read(tmp_path: Path, store: Store) -> None:
    path = write(
        tmp_path,
        "crm.csv",
        b"\xef\xbb\xbfkind,id,name,email\r\ncontact,c1,J\xc3\xb6rg,j@x.test\r\n",
    )
    summary = import_records(path, store)
    assert summary.errors == ()
    assert store.records_by_email("j@x.test")[0].name == "Jörg"


def test_csv_row_that_is_not_utf8_is_reported(tmp_path: Path, store: Store) -> None:
    path = write(
        tmp_path,
        "crm.csv",
        b"kind,id,name,email\ncontact,c1,J\xf6rg,j@x.test\ncontact,c2,Ok,ok@x.test\n",
    )
    summary = import_records(path, store)
    assert summary.errors == (f"{path}:2: not valid UTF-8",)
    assert summary.records == 1


def test_reimport_replaces_a_records_addresses(tmp_path: Path, store: Store) -> None:
    header = "kind,id,name,email\n"
    import_records(write(tmp_path, "a.csv", header + "contact,c1,Bob,old@customer.test\n"), store)
    import_records(write(tmp_path, "b.csv", header + "contact,c1,Bob,new@customer.test\n"), store)
    assert store.records_by_email("old@customer.test") == []
    assert [r.id for r in store.records_by_email("new@customer.test")] == ["c1"]


VCARDS = """BEGIN:VCARD
VERSION:4.0
UID:urn:uuid:4fbe8971-0bc3-424c-9c26-36c3e1eff6b1
FN:Bob Buyer
EMAIL;TYPE=work:bob@customer.test
item1.EMAIL;TYPE="home,pref":Bob@Home.test
END:VCARD
BEGIN:VCARD
VERSION:3.0
UID:lead-7
FN:Lee
 Lead
CATEGORIES:Prospects,LEAD
EMAIL:lee@prospect.test
END:VCARD
"""


def test_vcard_uid_name_addresses_and_lead_category_are_imported(
    tmp_path: Path, store: Store
) -> None:
    summary = import_records(write(tmp_path, "book.vcf", VCARDS.replace("\n", "\r\n")), store)
    assert (summary.records, summary.addresses, summary.errors) == (2, 3, ())
    assert store.records_by_email("bob@home.test") == [
        Record(
            "contact",
            "urn:uuid:4fbe8971-0bc3-424c-9c26-36c3e1eff6b1",
            "Bob Buyer",
            ("bob@customer.test", "bob@home.test"),
        )
    ]
    # "FN:Lee\r\n Lead" is one folded line (RFC 6350 section 3.2).
    assert store.records_by_email("lee@prospect.test") == [
        Record("lead", "lead-7", "LeeLead", ("lee@prospect.test",))
    ]


def test_vcard_without_uid_gets_an_id_that_is_stable_across_imports(
    tmp_path: Path, store: Store
) -> None:
    card = "BEGIN:VCARD\nN:Buyer;Bob;;;\nEMAIL:bob@customer.test\nEND:VCARD\n"
    import_records(write(tmp_path, "a.vcf", card), store)
    import_records(write(tmp_path, "b.vcf", card), store)
    records = store.records_by_email("bob@customer.test")
    assert len(records) == 1
    assert records[0].id.startswith("vcf-") and records[0].name == "Bob Buyer"


def test_vcard_problems_are_reported_with_line_numbers(tmp_path: Path, store: Store) -> None:
    text = (
        "BEGIN:VCARD\n"  # 1
        "FN:No mail\n"  # 2
        "END:VCARD\n"  # 3: card without EMAIL (reported at its BEGIN)
        "BEGIN:VCARD\n"  # 4
        "FN:Half good\n"  # 5
        "EMAIL:not an address\n"  # 6: bad EMAIL
        "EMAIL:good@customer.test\n"  # 7
        "END:VCARD\n"  # 8
        "FN:stray\n"  # 9: outside a card
        "BEGIN:VCARD\n"  # 10
        "EMAIL:cut@customer.test\n"  # 11: never ended
    )
    path = write(tmp_path, "book.vcf", text)
    summary = import_records(path, store)
    assert [e.split(": ", 1)[0] for e in summary.errors] == [
        f"{path}:1",
        f"{path}:6",
        f"{path}:9",
        f"{path}:10",
    ]
    assert summary.records == 1
    assert store.records_by_email("good@customer.test")[0].name == "Half good"
    assert store.records_by_email("cut@customer.test") == []


def test_progress_is_reported_in_bytes_up_to_the_file_size(tmp_path: Path, store: Store) -> None:
    rows = "".join(f"contact,c{i},Name {i},p{i}@customer.test\n" for i in range(5000))
    path = write(tmp_path, "big.csv", "kind,id,name,email\n" + rows)
    steps: list[int] = []
    summary = import_records(path, store, progress=steps.append)
    assert summary.records == 5000
    assert sum(steps) == import_units(path) == path.stat().st_size
    assert len(steps) > 1


def test_csv_quoting_errors_are_reported_and_reading_goes_on(tmp_path: Path, store: Store) -> None:
    path = write(
        tmp_path,
        "crm.csv",
        'kind,id,name,email\ncontact,c1,"Bob"x,bob@x.test\ncontact,c2,Carol,carol@x.test\n'
        'contact,c3,"unterminated,c@x.test\n',
    )
    summary = import_records(path, store)
    assert [e.split(": ", 1)[0] for e in summary.errors] == [f"{path}:2", f"{path}:4"]
    assert summary.records == 1
