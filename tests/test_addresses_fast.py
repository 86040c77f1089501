"""The fast path of ``parse_mailboxes`` answers exactly as the strict parser does, or defers.

Every generated header value goes through both: whenever the fast path accepts a value, the
strict parser must accept it too and give the same ``(display name, addr-spec)`` list.
"""

from __future__ import annotations

import email._encoded_words as encoded_words  # type: ignore[import-not-found]

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sentlink.addresses import (
    AmbiguousAddressError,
    _parse_simple,
    _parse_strict,
    parse_mailboxes,
)

ATEXT = "abcxyzABCXYZ0189!#$%&'*+/=?^_`{|}~-"
SPECIALS = '"<>@,;:()[]\\.=? \t'

atom = st.text(ATEXT, min_size=1, max_size=6)
local_part = st.lists(atom, min_size=1, max_size=3).map(".".join)
label = st.text("abcXYZ09-", min_size=1, max_size=6)
domain = st.lists(label, min_size=1, max_size=3).map(".".join)
addr_spec = st.builds(lambda lp, d: f"{lp}@{d}", local_part, domain)
space = st.sampled_from(["", " ", "  ", "\t", " \t "])
some_space = st.sampled_from([" ", "  ", "\t", " \t "])
name_word = st.text("abcXYZ09!#$%&'*+/^_`{|}~.-", min_size=1, max_size=8)
name_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=12
)


@st.composite
def encoded_word(draw: st.DrawFn) -> str:
    text = draw(name_text.filter(bool))
    charset = draw(st.sampled_from(["utf-8", "UTF-8", "iso-8859-1", "us-ascii", "bogus"]))
    encoding = draw(st.sampled_from(["q", "b"]))
    try:
        word: str = encoded_words.encode(text, charset if charset != "bogus" else "utf-8", encoding)
    except UnicodeEncodeError:
        word = encoded_words.encode(text, "utf-8", encoding)
    if charset == "bogus":
        word = word.replace("=?utf-8?", "=?bogus?", 1)
    if draw(st.booleans()):
        word = word.replace("?q?", "?Q?").replace("?b?", "?B?")
    return word


raw_encoded_word = st.from_regex(r"=\?[a-z0-9-]{1,8}\?[qQbB]\?[!-<>@-~=]{1,10}\?=", fullmatch=True)
name_token = st.one_of(name_word, encoded_word(), raw_encoded_word)


@st.composite
def phrase(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(name_token, min_size=1, max_size=4))
    return "".join(
        t + (draw(some_space) if i < len(tokens) - 1 else "") for i, t in enumerate(tokens)
    )


quoted = st.text(" \tabcXYZ09!#$%&'()*+,./:;<=>?@[]^_`{|}~-", max_size=12).map(lambda s: f'"{s}"')


@st.composite
def mailbox(draw: st.DrawFn) -> str:
    form = draw(st.sampled_from(["bare", "angle", "phrase", "quoted"]))
    addr = draw(addr_spec)
    if form == "bare":
        return addr
    name = {"angle": "", "phrase": draw(phrase()), "quoted": draw(quoted)}[form]
    return f"{name}{draw(space)}<{addr}>"


@st.composite
def address_list(draw: st.DrawFn) -> str:
    boxes = draw(st.lists(mailbox(), min_size=1, max_size=4))
    out = draw(space)
    for i, box in enumerate(boxes):
        out += box + draw(space)
        if i < len(boxes) - 1:
            out += "," + draw(space)
    return out


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """A well-formed list with a few characters inserted, deleted or replaced."""
    value = draw(address_list())
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(value)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        char = draw(st.sampled_from(SPECIALS + "aé\udcff"))
        if op == "insert":
            value = value[:pos] + char + value[pos:]
        elif op == "delete":
            value = value[:pos] + value[pos + 1 :]
        else:
            value = value[:pos] + char + value[pos + 1 :]
    return value


def assert_same_as_strict(value: str) -> None:
    fast = _parse_simple(value)
    if fast is None:
        return
    try:
        strict = _parse_strict(value)
    except AmbiguousAddressError as exc:
        pytest.fail(f"fast path accepted {value!r}, the strict parser raises: {exc}")
    assert fast == strict, value


FAST = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(address_list())
@example('Bob <bob@customer.test>, carol@customer.test, "Smith, Dan" <dan@customer.test>')
@example("=?utf-8?q?J=C3=B6rg?= =?utf-8?q?_S?= <j@x.de>")
@example("John Q. Public <j@x.test>")
def test_fast_path_gives_the_strict_parsers_mailboxes_for_simple_lists(value: str) -> None:
    assert_same_as_strict(value)


@FAST
@given(mutated())
def test_fast_path_never_accepts_what_the_strict_parser_reads_differently(value: str) -> None:
    assert_same_as_strict(value)


@FAST
@given(st.text(SPECIALS + "abx@.-=?", max_size=30))
def test_fast_path_agrees_with_the_strict_parser_on_arbitrary_text(value: str) -> None:
    assert_same_as_strict(value)


@pytest.mark.parametrize(
    "value",
    [
        "bob@customer.test",
        "Bob <bob@customer.test>",
        '"Smith, Dan" <dan@customer.test>',
        "=?utf-8?q?J=C3=B6rg?= <j@x.de>",
        "=?utf-8?b?SsO2cmc=?= Smith <j@x.de>",
        "a@x.test, B <b@y.test>,c@z.test",
    ],
)
def test_the_common_forms_take_the_fast_path(value: str) -> None:
    assert _parse_simple(value) is not None


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
        "a..b@x.test",
        "a@x..test",
        "=?bogus?q?J=F6rg?= <j@x.test>",
        "=?utf-8?q?J=F6rg?= <j@x.test>",
        "John Q.<j@x.test>",
    ],
)
def test_ambiguous_or_odd_values_are_left_to_the_strict_parser(value: str) -> None:
    assert _parse_simple(value) is None
    assert_same_as_strict(value)


@pytest.mark.parametrize(
    "value",
    [
        "a@x)<b@y>",
        '"a@x" <b@y>@z',
        "Bob <bob@x.test",
        "a@x.test <b@y.test>",
        "a@b@c",
        "<>",
        "John Q.<j@x.test>",  # the stdlib's display_name raises AttributeError on it
    ],
)
def test_ambiguous_values_still_raise(value: str) -> None:
    with pytest.raises(AmbiguousAddressError):
        parse_mailboxes(value)
