"""The header reader splits and unfolds exactly as a plain line-by-line reading does."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from sentlink.headers import FieldSelection, _end_of_header, parse_header_bytes, read_header_bytes

_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")


def line_by_line(raw: bytes, truncated: bool) -> tuple[tuple[str, str], ...]:
    """RFC 5322 section 2.2.3 unfolding, one line at a time, each piece decoded on its own."""
    lines = raw.split(b"\n")
    cut_field = False
    if truncated and lines:
        cut_field = lines.pop()[:1] in (b" ", b"\t")
    fields: list[tuple[bytes, bytearray]] = []
    for number, line in enumerate(lines):
        line = line.removesuffix(b"\r")
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].extend(line)
            continue
        match = _FIELD.match(line)
        if match is None:
            if number == 0 and line.startswith(b"From "):
                continue
            break
        fields.append((match.group(1), bytearray(line[match.end() :])))
    if cut_field and fields:
        fields.pop()

    def text(b: bytes) -> str:
        return b.decode("utf-8", "surrogateescape")

    return tuple((text(n), text(bytes(v)).strip()) for n, v in fields)


piece = st.sampled_from(
    [
        b"From: a@x",
        b"To: b@y",
        b"Subject: caf\xc3\xa9 \xe9",
        b"X-A :v",
        b"From a@x Tue",
        b"junk",
        b" folded",
        b"\tmore",
        b"",
        b"\r",
        b":",
        b"A:",
        b"\xff:",
        b" ",
        b"a\rb: c",
    ]
)
header = st.lists(st.tuples(piece, st.sampled_from([b"\n", b"\r\n", b"\r\r\n"])), max_size=8).map(
    lambda parts: b"".join(p + sep for p, sep in parts)
)


@settings(max_examples=800, deadline=None)
@given(header, st.booleans(), st.binary(max_size=6))
@example(b"From a@x Tue\n folded\nTo: b@y\n", False, b"")
@example(b"Subject: x\r\n  y\r\nTo: b", True, b"")
def test_fields_are_those_of_a_line_by_line_reading(
    raw: bytes, truncated: bool, tail: bytes
) -> None:
    raw += tail
    assert parse_header_bytes(raw, truncated).fields == line_by_line(raw, truncated)


def test_lookups_ignore_case_and_keep_file_order() -> None:
    block = parse_header_bytes(b"To: a@x\nCc: c@x\nto: b@x")
    assert block.get_all("TO") == ["a@x", "b@x"]
    assert block.get("cC") == "c@x"
    assert block.get("Bcc", "none") == "none"


def test_reading_stops_at_the_empty_line_and_at_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.write_bytes(b"To: a@x\r\nSubject: s\r\n\r\nbody: not a header\r\n")
    assert read_header_bytes(path) == (b"To: a@x\r\nSubject: s", False)
    path.write_bytes(b"To: a@x\nSubject: " + b"s" * 100)
    assert read_header_bytes(path, max_bytes=20) == (b"To: a@x\nSubject: sss", True)


def test_reading_a_header_section_across_chunks_and_files_without_one(tmp_path: Path) -> None:
    path = tmp_path / "m"
    long = b"X-Long: " + b"v" * 40000 + b"\r\n"
    path.write_bytes(long + b"To: a@x\r\n\r\nbody")
    assert read_header_bytes(path) == (long + b"To: a@x", False)
    path.write_bytes(b"")
    assert read_header_bytes(path) == (b"", False)
    path.write_bytes(b"\r\nbody: x")
    assert read_header_bytes(path) == (b"", False)
    path.write_bytes(b"To: a@x")  # no body, no empty line
    assert read_header_bytes(path) == (b"To: a@x", False)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40).map(lambda b: b.replace(b"a", b"\n").replace(b"b", b"\r")))
def test_end_of_header_is_found_where_the_pattern_first_matches(buf: bytes) -> None:
    match = re.search(rb"\r?\n\r?\n", buf)
    assert _end_of_header(buf) == (match.start() if match else -1)


# The parser before fields were split with one findall (a finditer pass from the start, then a
# line-by-line loop from the first gap), kept to compare with: same fields, same index.
_OLD_FIELD = re.compile(r"([!-9;-~]+)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)\n?")


def finditer_then_loop(raw: bytes, truncated: bool) -> tuple[tuple[str, str], ...]:
    text = raw.decode("utf-8", "surrogateescape")
    cut_field = False
    if truncated:
        text, _newline, partial = text.rpartition("\n")
        cut_field = partial[:1] in (" ", "\t")
    fields: list[tuple[str, str]] = []

    def add(name: str, value: str) -> None:
        if "\n" in value:
            value = value.replace("\r\n", "").replace("\n", "")
        fields.append((name, value.strip()))

    pos, end = 0, len(text)
    # Unanchored, this search is quadratic on long lines of name characters: keep inputs short.
    for field in _OLD_FIELD.finditer(text):
        if field.start() != pos:
            break
        add(*field.groups())
        pos = field.end()
    while pos < end:
        match = _OLD_FIELD.match(text, pos)
        if match is not None:
            add(*match.groups())
            pos = match.end()
            continue
        line_end = text.find("\n", pos)
        line = text[pos:] if line_end < 0 else text[pos:line_end]
        if line[:1] not in (" ", "\t") and not (pos == 0 and line.startswith("From ")):
            break
        pos = end if line_end < 0 else line_end + 1
    if cut_field and fields:
        fields.pop()
    return tuple(fields)


_PIECES = [
    b"From: Person <a@x>",
    b"To: b@y, c@z",
    b"Received: from mx (mx [192.0.2.1])",
    b"Subject: =?utf-8?q?caf=C3=A9?= \xc3\xa9 \xe9\xff",
    b"X-A :v",
    b"X-B\t:\tv ",
    b"From a@x Tue",
    b"junk",
    b"junk: after a space",
    b" folded",
    b"\tmore",
    b"  ",
    b"",
    b"\r",
    b":",
    b"A:",
    b"\xff:",
    b"a\rb: c",
    b"Name:\x0bvertical tab\x0c",
    b"K: \xc2\xa0non-breaking\xc2\xa0",
    b"Long: " + b"v" * 300,
]


def random_block(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randrange(12)):
        piece = rng.choice(_PIECES)
        if rng.random() < 0.1:
            piece = bytes(rng.randrange(256) for _ in range(rng.randrange(8)))
        parts.append(piece + rng.choice([b"\n", b"\n", b"\r\n", b"\r\r\n", b"\r", b""]))
    block = b"".join(parts)
    return block[: rng.randrange(len(block) + 1)] if rng.random() < 0.2 else block


def test_fields_and_index_are_those_of_the_finditer_parser() -> None:
    rng = random.Random(20240604)
    blocks = [random_block(rng) for _ in range(20000)]
    blocks += [
        b"",
        b"\n",
        b"To: a@x",
        b"To: a@x\n",
        b"To: a@x\r\n",
        b" lead\nTo: a@x\n",
        b"From a@x Tue\nTo: a@x\n folded\n",
        b"To: a\n\r\n b\nCc: c",
        b"To: a\nnot a field\nCc: c\n",
        b"X\n\t: v\nTo: a",
        b"To:\n",
        b"To: a@x\n \n\t\nCc: b",
        b"Subject: x\r\n  y\r\nTo: b",
    ]
    for raw in blocks:
        for truncated in (False, True):
            block = parse_header_bytes(raw, truncated)
            expected = finditer_then_loop(raw, truncated)
            assert block.fields == expected, raw
            index: dict[str, list[str]] = {}
            for name, value in expected:
                index.setdefault(name.lower(), []).append(value)
            assert block.by_name == index, raw


def test_a_long_line_that_is_no_field_is_read_in_linear_time() -> None:
    # A search for the next field from every position of a 100 KB run of name characters
    # took minutes when the field pattern was not anchored at line starts.
    started = time.perf_counter()
    for raw in (b"A" * 100_000 + b"\nTo: a@x\n", b"To: a@x\n" + b"X-" * 50_000 + b" v: w\n"):
        assert parse_header_bytes(raw).fields in ((), (("To", "a@x"),))
    assert time.perf_counter() - started < 2.0


_SELECTIONS = [
    FieldSelection(names)
    for names in (
        ["From", "To", "Subject"],
        ["to"],
        ["X-A", "x-b", "K", "Name", "Long", "A"],
        ["Received", "junk", "From", "to", "cc"],
        ["T", "To", "Tox"],  # names that are prefixes of others
        [],
    )
]


def selected(
    block: tuple[tuple[str, str], ...], only: FieldSelection
) -> tuple[tuple[str, str], ...]:
    return tuple(field for field in block if field[0].lower() in only.names)


@settings(max_examples=800, deadline=None)
@given(header, st.booleans(), st.binary(max_size=6), st.sampled_from(_SELECTIONS))
@example(b"From a@x Tue\nTo: b@y\n", False, b"", _SELECTIONS[0])
@example(b" folded\nTo: b@y\n\tmore", False, b"", _SELECTIONS[1])
def test_a_selection_keeps_the_fields_of_its_names_and_nothing_else(
    raw: bytes, truncated: bool, tail: bytes, only: FieldSelection
) -> None:
    raw += tail
    block = parse_header_bytes(raw, truncated, only)
    assert block.fields == selected(line_by_line(raw, truncated), only)


def test_a_selection_of_random_blocks_is_the_whole_reading_filtered() -> None:
    rng = random.Random(20261128)
    for _ in range(20000):
        raw = random_block(rng)
        only = rng.choice(_SELECTIONS)
        truncated = rng.random() < 0.2
        whole = parse_header_bytes(raw, truncated)
        block = parse_header_bytes(raw, truncated, only)
        assert block.fields == selected(whole.fields, only), raw
        index: dict[str, list[str]] = {}
        for name, value in block.fields:
            index.setdefault(name.lower(), []).append(value)
        assert block.by_name == index, raw
        assert block.get("To") == (whole.get("To") if "to" in only.names else ""), raw


def test_a_selection_reads_long_lines_in_linear_time() -> None:
    started = time.perf_counter()
    only = FieldSelection(["To", "X-"])
    for raw in (
        b"A" * 100_000 + b"\nTo: a@x\n",
        b"To: a@x\n" + b"X-" * 50_000 + b" v: w\n",
        b"To: a@x\n" + b"\n".join([b"X-A: " + b"v" * 30] * 20_000),
        b"To: a@x\n" + b"To" * 50_000 + b"\n",
    ):
        assert parse_header_bytes(raw, only=only).get("To") in ("", "a@x")
    assert time.perf_counter() - started < 2.0
