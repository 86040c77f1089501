"""The streamed DATA path without sockets: checks, dot-unstuffing and re-stuffing across chunks."""

from __future__ import annotations

import asyncio
import random

import pytest

from sentlink.proxy.spool import DataReceiver, Spool, dot_stuffed, read_data

LINES = [b"", b".", b"..", b"a.b", b".x", b"end.", b"hello", b"\xc3\xa9t\xc3\xa9"]


def stuffed(message: bytes) -> bytes:
    """What a client sends for ``message`` (RFC 5321 4.5.2), without the final dot."""
    wire = b"." + message if message.startswith(b".") else message
    return wire.replace(b"\r\n.", b"\r\n..")


def receive(wire: bytes, cuts: list[int], **kwargs: int) -> tuple[DataReceiver, Spool]:
    spool = Spool(memory_limit=kwargs.pop("memory_limit", 1 << 20))
    receiver = DataReceiver(spool, kwargs.get("max_bytes", 0), kwargs.get("max_line", 1001))
    start = 0
    for cut in [*sorted(cuts), len(wire)]:
        if cut > start:
            receiver.feed(wire[start:cut])
            start = cut
    receiver.finish()
    return receiver, spool


def test_unstuffing_and_restuffing_round_trip_whatever_the_chunk_boundaries() -> None:
    rnd = random.Random(5321)
    for _ in range(2000):
        message = b"".join(rnd.choice(LINES) + b"\r\n" for _ in range(rnd.randint(0, 8)))
        wire = stuffed(message)
        cuts = [rnd.randint(0, len(wire)) for _ in range(rnd.randint(0, 6))]
        receiver, spool = receive(wire, cuts, memory_limit=rnd.choice([0, 7, 1 << 20]))
        assert receiver.problem is None
        assert b"".join(spool.chunks(size=rnd.randint(1, 9))) == message
        assert b"".join(dot_stuffed(b"", spool)) == wire + b".\r\n"


def test_restuffing_handles_a_crlf_split_between_prefix_and_message() -> None:
    spool = Spool()
    spool.write(b"\n.hidden\r\n")  # only legal after the prefix's CR: checks a chunk seam
    spool.finish()
    assert b"".join(dot_stuffed(b"X-A: 1\r", spool)) == b"X-A: 1\r\n..hidden\r\n.\r\n"


@pytest.mark.parametrize("data", [b"a\nb\r\n", b"a\rb\r\n", b"x\r\r\n", b"\n", b"end\r"])
def test_bare_cr_or_lf_is_found_at_every_chunk_boundary(data: bytes) -> None:
    for cut in range(len(data) + 1):
        receiver, _ = receive(data, [cut])
        assert receiver.problem == "bare_line_ending", (data, cut)


def test_size_limit_counts_bytes_as_sent_and_stops_writing() -> None:
    receiver, spool = receive(b"x" * 50 + b"\r\n", [10, 20], max_bytes=40)
    assert receiver.problem == "too_big"
    assert spool.size <= 40


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        (b"a" * 999 + b"\r\n", None),  # 1001 octets with CRLF: aiosmtpd's limit
        (b"a" * 1000 + b"\r\n", "line_too_long"),
        (b"ok\r\n" + b"b" * 1500 + b"\r\nok\r\n", "line_too_long"),
    ],
)
def test_line_length_limit_holds_across_chunks(wire: bytes, problem: str | None) -> None:
    for cut in (0, 1, 3, 500, 999, 1001, 1002):
        receiver, _ = receive(wire, [cut])
        assert receiver.problem == problem, cut


def test_large_message_goes_to_a_file_and_reads_back_by_position() -> None:
    message = b"".join(b"line %d\r\n" % i for i in range(100_000))
    receiver, spool = receive(message, list(range(0, len(message), 65536)), memory_limit=4096)
    assert receiver.problem is None
    assert spool.size == len(message)
    assert spool.read_at(len(message) - 12, 12) == b"line 99999\r\n"
    assert b"".join(spool.chunks(size=100_000)) == message
    spool.close()


def read_from_client(wire: bytes, cuts: list[int], limit: int) -> tuple[DataReceiver, Spool, bytes]:
    """``read_data`` on ``wire`` arriving in pieces cut at ``cuts``: the receiver, its spool and
    what was left unread."""

    async def run() -> tuple[DataReceiver, Spool, bytes]:
        reader = asyncio.StreamReader(limit=limit)
        spool = Spool()
        receiver = DataReceiver(spool, 0, 1001)
        reading = asyncio.create_task(read_data(reader, receiver))
        start = 0
        for cut in [*sorted(cuts), len(wire)]:
            reader.feed_data(wire[start:cut])
            start = max(start, cut)
            for _ in range(3):  # let the reader take this piece before the next arrives
                await asyncio.sleep(0)
        reader.feed_eof()
        await reading
        return receiver, spool, await reader.read()

    return asyncio.run(run())


def test_end_of_data_is_found_whatever_arrives_when() -> None:
    rnd = random.Random(4114)
    for _ in range(1500):
        message = b"".join(rnd.choice(LINES) + b"\r\n" for _ in range(rnd.randint(0, 8)))
        wire = stuffed(message) + b".\r\nQUIT\r\n"
        cuts = [rnd.randint(0, len(wire)) for _ in range(rnd.randint(0, 6))]
        receiver, spool, rest = read_from_client(wire, cuts, rnd.choice([3, 4, 5, 8, 13, 1 << 16]))
        assert receiver.problem is None
        assert b"".join(spool.chunks()) == message
        assert rest == b"QUIT\r\n"


def test_data_ends_at_the_first_crlf_dot_crlf_even_after_bare_line_ends() -> None:
    pieces = [b"\r\n", b"\n", b"\r", b".", b"a", b".\r\n", b"\n.\r\n", b"\r.\r\n"]
    rnd = random.Random(5322)
    for _ in range(1500):
        stream = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 10)))
        stream += b"\r\n.\r\nNEXT"
        # DATA's own CRLF comes first: ".CRLF" at the very start ends an empty message.
        end = (b"\r\n" + stream).find(b"\r\n.\r\n") + 3
        cuts = [rnd.randint(0, len(stream)) for _ in range(rnd.randint(0, 6))]
        receiver, _, rest = read_from_client(stream, cuts, rnd.choice([3, 4, 7, 1 << 16]))
        assert rest == stream[end:], stream
        assert receiver.received == end - 3, stream


def test_a_message_that_arrived_whole_is_read_in_one_piece() -> None:
    fed: list[bytes] = []

    class Recording(DataReceiver):
        def feed(self, chunk: bytes) -> None:
            fed.append(chunk)
            super().feed(chunk)

    async def run() -> None:
        reader = asyncio.StreamReader(limit=1 << 16)
        reader.feed_data(b"".join(b"line %d\r\n" % i for i in range(200)) + b".\r\n")
        await read_data(reader, Recording(Spool(), 0, 1001))

    asyncio.run(run())
    assert len(fed) == 1
