"""sentlink.trace (the signed trace header) and sentlink.secret (its key)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from sentlink.errors import SentlinkError
from sentlink.secret import load_or_create_secret
from sentlink.trace import TRACE_HEADER, canonical_message_id, sign, verify

SECRET = b"0123456789abcdef0123456789abcdef"
MSGID = "<1700000000.abc@mail.example.test>"


def test_header_name_is_the_documented_one() -> None:
    assert TRACE_HEADER == "X-Sentlink-Trace"


def test_signed_value_verifies_to_its_account() -> None:
    value = sign(SECRET, "alice", MSGID, 1700000000)
    assert value.startswith("v=1; a=alice; t=1700000000; s=")
    assert verify(SECRET, value, MSGID) == "alice"


def test_signature_is_base64url_without_padding() -> None:
    sig = sign(SECRET, "alice", MSGID, 1).rpartition("s=")[2]
    assert len(sig) == 43
    assert set(sig) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_trace_for_another_message_id_does_not_verify() -> None:
    value = sign(SECRET, "alice", MSGID, 1700000000)
    assert verify(SECRET, value, "<other@mail.example.test>") is None


def test_trace_under_another_secret_does_not_verify() -> None:
    value = sign(b"another-secret-of-enough-length!", "alice", MSGID, 1700000000)
    assert verify(SECRET, value, MSGID) is None


@pytest.mark.parametrize(
    ("old", "new"),
    [("a=alice", "a=bob"), ("t=1700000000", "t=1700000001"), ("v=1", "v=2")],
)
def test_changing_any_signed_tag_breaks_the_trace(old: str, new: str) -> None:
    value = sign(SECRET, "alice", MSGID, 1700000000)
    assert verify(SECRET, value.replace(old, new), MSGID) is None


def test_folded_or_commented_message_id_verifies_like_the_plain_one() -> None:
    value = sign(SECRET, "alice", MSGID, 1700000000)
    folded = "\n " + MSGID + " (comment)"
    assert canonical_message_id(folded) == MSGID
    assert verify(SECRET, value, folded) == "alice"


def test_folded_trace_value_still_verifies() -> None:
    value = sign(SECRET, "alice", MSGID, 1700000000).replace("; s=", ";\n s=")
    assert verify(SECRET, value, MSGID) == "alice"


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "v=1",
        "v=1; a=alice; t=1700000000",
        "v=1; a=alice; t=soon; s=AAAA",
        "v=1; a=alice; t=1; s=\udcff\udcfe",
        "v=1; a=al;ice; t=1; s=x",
        "v=1; a=alice; a=bob; t=1; s=x",
        "v=1; a=alice; t=" + "9" * 5000 + "; s=x",
        "\x00\x01\x02",
        "s=" + "A" * 10000,
    ],
)
def test_garbage_trace_values_are_rejected_without_raising(garbage: str) -> None:
    assert verify(SECRET, garbage, MSGID) is None


def test_account_names_that_cannot_be_carried_are_refused() -> None:
    with pytest.raises(ValueError):
        sign(SECRET, "al;ice", MSGID, 1)


def test_missing_secret_file_is_created_private_with_32_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "var" / "site.secret"
    key = load_or_create_secret(path)
    assert len(key) == 64 and bytes.fromhex(key.decode())  # 32 bytes, hex
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["site.secret"]  # no temporary left


def test_admin_supplied_secret_is_used_as_written(tmp_path: Path) -> None:
    path = tmp_path / "site.secret"
    path.write_bytes(b"correct horse battery staple\n")
    path.chmod(0o600)
    assert load_or_create_secret(path) == b"correct horse battery staple"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_secret_accessible_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "site.secret"
    path.write_bytes(b"x" * 64)
    path.chmod(mode)
    with pytest.raises(SentlinkError, match="group or others"):
        load_or_create_secret(path)


def test_short_secret_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "site.secret"
    path.write_bytes(b"short\n")
    path.chmod(0o600)
    with pytest.raises(SentlinkError, match="shorter than 16"):
        load_or_create_secret(path)


def test_concurrent_first_starts_agree_on_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "site.secret"
    keys: list[bytes] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker() -> None:
        try:
            start.wait()
            keys.append(load_or_create_secret(path))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(keys)) == 1
    assert os.listdir(tmp_path) == ["site.secret"]
