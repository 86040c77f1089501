"""Turn a round-trip YAML tree into frozen config dataclasses, driven by their type hints.

Nothing here knows a config key: the field names and hints of ``sentlink.config.models`` are the
schema. Supported hints: nested dataclasses, ``tuple[X, ...]``, ``dict[str, X]``, ``X | None``,
``Literal[...]``, ``bool``, ``int``, ``str`` and ``Path``. A field whose key is a Python keyword
names its key in ``metadata={"key": ...}``. A value that does not fit is reported with its position
and replaced by the field's default, so one pass finds every problem in the file.

YAML 1.2 (what ruamel.yaml reads) has no ``yes``/``no`` booleans and reads ``0660`` as the
decimal integer 660: booleans and integers are therefore never coerced from or into strings.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import re
import sys
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, cast, get_args, get_origin, get_type_hints

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarbool import ScalarBoolean

from sentlink.config.problems import Locations, Mark, ModelPath, Problems

T = TypeVar("T")


class _Missing:
    """A value that could not be built (its problem is already recorded)."""


MISSING = _Missing()

_YAML11_BOOLEANS = {"yes", "no", "on", "off", "y", "n"}


def describe(value: object) -> str:
    """What a YAML value is, in the words of an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool | ScalarBoolean):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):  # tuple: a flow sequence used as a key
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, datetime.date):
        return "a date"
    return type(value).__name__


def close_match(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` when a choice is close to ``word``, else ""."""
    found = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{found[0]}'?)" if found else ""


def key_mark(node: CommentedMap, key: object, parent: Mark) -> Mark:
    """The position of ``key`` itself (1-based)."""
    try:
        line, col = node.lc.key(key)
    except (KeyError, TypeError):  # merged (<<) keys carry no position of their own
        return parent
    return parent.child(str(key), line + 1, col + 1)


def value_mark(node: CommentedMap, key: str, parent: Mark) -> Mark:
    """The position of the value of ``key``; an empty value points at its key."""
    try:
        kline, kcol = node.lc.key(key)
        line, col = node.lc.value(key)
    except (KeyError, TypeError):
        return parent.child(key, parent.line, parent.col)
    if node[key] is None and line != kline:
        # `key:` with nothing after it: ruamel places the null at the next token.
        line, col = kline, kcol
    return parent.child(key, line + 1, col + 1)


def item_mark(node: CommentedSeq, index: int, parent: Mark) -> Mark:
    try:
        line, col = node.lc.item(index)
    except (KeyError, IndexError, TypeError):
        return parent.child(index, parent.line, parent.col)
    return parent.child(index, line + 1, col + 1)


def node_mark(node: object, fallback: Mark) -> Mark:
    """Where a mapping or list starts (its first key or item)."""
    lc = getattr(node, "lc", None)
    if lc is None or lc.line is None:
        return fallback
    return Mark(fallback.name, lc.line + 1, lc.col + 1)


class ModelBuilder:
    """One use: build one model tree, recording problems and the positions of built values."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        self.locations = Locations()
        self._hints: dict[type, dict[str, Any]] = {}

    def build(self, cls: type[T], node: object, mark: Mark) -> T | _Missing:
        # _convert(cls, ...) returns an instance of cls or MISSING.
        return cast("T | _Missing", self._convert(cls, node, mark, ()))

    def _hints_of(self, cls: type) -> dict[str, Any]:
        if cls not in self._hints:
            # The models use `from __future__ import annotations`: resolve the strings in the
            # namespace of the module that defines them.
            module = vars(sys.modules[cls.__module__])
            self._hints[cls] = get_type_hints(cls, globalns=module)
        return self._hints[cls]

    def _convert(self, hint: Any, node: object, mark: Mark, path: ModelPath) -> object:
        self.locations.record(path, mark)
        origin = get_origin(hint)
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            return self._dataclass(hint, node, mark, path)
        if origin in (types.UnionType, Union):
            return self._optional(hint, node, mark, path)
        if origin is tuple:
            return self._tuple(hint, node, mark, path)
        if origin is dict:
            return self._dict(hint, node, mark, path)
        if origin is Literal:
            return self._literal(hint, node, mark)
        if hint is bool:
            return self._bool(node, mark)
        if hint is int:
            return self._int(node, mark)
        if hint is str or hint is Path:
            return self._str(hint, node, mark)
        raise TypeError(f"config models: unsupported type hint {hint!r} at {mark.name}")

    def _wrong(self, mark: Mark, expected: str, node: object, hint: str = "") -> _Missing:
        self.problems.at(mark, f"expected {expected}, got {describe(node)}{hint}")
        return MISSING

    def _dataclass(self, cls: type, node: object, mark: Mark, path: ModelPath) -> object:
        if node is None:
            node = CommentedMap()  # `section:` left empty: the section with its defaults
        if not isinstance(node, CommentedMap):
            return self._wrong(mark, "a mapping", node)
        hints = self._hints_of(cls)
        fields = {yaml_key(f): f for f in dataclasses.fields(cls) if f.init}
        values: dict[str, object] = {}
        complete = True
        for key in node:
            if not isinstance(key, str):
                here = key_mark(node, key, mark)
                self.problems.add(here.line, here.col, f"keys must be strings, got {describe(key)}")
                continue
            if key not in fields:
                self._unknown_key(node, key, mark, list(fields))
                continue
            f = fields[key]
            here = value_mark(node, key, mark)
            value = self._convert(hints[f.name], node[key], here, (*path, key))
            if isinstance(value, _Missing):
                complete = complete and _has_default(f)
            else:
                values[f.name] = value
        start = node_mark(node, mark)
        for name, f in fields.items():
            if name not in node and not _has_default(f):
                self.problems.at(start, f"missing required key '{name}'")
                complete = False
        return cls(**values) if complete else MISSING

    def _unknown_key(self, node: CommentedMap, key: str, mark: Mark, known: list[str]) -> None:
        where = f"in {mark.name}" if mark.name else "at the top level"
        here = key_mark(node, key, mark)
        self.problems.add(
            here.line, here.col, f"unknown key '{key}' {where}{close_match(key, known)}"
        )

    def _optional(self, hint: Any, node: object, mark: Mark, path: ModelPath) -> object:
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 2 and len(get_args(hint)) == 2 and get_origin(args[0]) is Literal:
            # `Literal[...] | Section`: a word, or a mapping for the section (proxy auth:
            # passthrough | none | {username: ..., password_file: ...}).
            if isinstance(node, CommentedMap):
                return self._convert(args[1], node, mark, path)
            return self._literal(args[0], node, mark)
        if len(args) != 1 or len(get_args(hint)) != 2:
            raise TypeError(f"config models: only `X | None` unions are supported, not {hint!r}")
        inner = args[0]
        if node is None and not dataclasses.is_dataclass(inner):
            return None
        # A dataclass section that is present but empty (`milter:`) means "on, with defaults".
        return self._convert(inner, node, mark, path)

    def _tuple(self, hint: Any, node: object, mark: Mark, path: ModelPath) -> object:
        args = get_args(hint)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"config models: only tuple[X, ...] is supported, not {hint!r}")
        if node is None:
            return ()  # `key:` left empty: an empty list
        if not isinstance(node, CommentedSeq):
            return self._wrong(mark, "a list", node)
        items: list[object] = []
        for index, item in enumerate(node):
            # Model index len(items), file index `index`: they differ once an item is dropped.
            item_path = (*path, len(items))
            value = self._convert(args[0], item, item_mark(node, index, mark), item_path)
            if isinstance(value, _Missing):
                self.locations.forget(item_path)
            else:
                items.append(value)
        return tuple(items)

    def _dict(self, hint: Any, node: object, mark: Mark, path: ModelPath) -> object:
        """``dict[str, X]``: a mapping whose keys are data (header names), not config keys."""
        args = get_args(hint)
        if len(args) != 2 or args[0] is not str:
            raise TypeError(f"config models: only dict[str, X] is supported, not {hint!r}")
        if node is None:
            return {}
        if not isinstance(node, CommentedMap):
            return self._wrong(mark, "a mapping", node)
        items: dict[str, object] = {}
        for key in node:
            if not isinstance(key, str):
                here = key_mark(node, key, mark)
                self.problems.add(here.line, here.col, f"keys must be strings, got {describe(key)}")
                continue
            value = self._convert(args[1], node[key], value_mark(node, key, mark), (*path, key))
            if not isinstance(value, _Missing):
                items[key] = value
        return items

    def _literal(self, hint: Any, node: object, mark: Mark) -> object:
        choices = get_args(hint)
        for choice in choices:
            if type(node) is type(choice) and node == choice:
                return choice
        listed = ", ".join(repr(c) for c in choices)
        got = repr(str(node)) if isinstance(node, str) else describe(node)
        words = [c for c in choices if isinstance(c, str)]
        suggestion = close_match(node, words) if isinstance(node, str) else ""
        self.problems.at(mark, f"expected one of {listed}, got {got}{suggestion}")
        return MISSING

    def _bool(self, node: object, mark: Mark) -> object:
        if isinstance(node, bool | ScalarBoolean):
            return bool(node)
        hint = ""
        if isinstance(node, str) and node.lower() in _YAML11_BOOLEANS:
            hint = " (write true or false)"
        return self._wrong(mark, "a boolean (true or false)", node, hint)

    def _int(self, node: object, mark: Mark) -> object:
        if isinstance(node, int) and not isinstance(node, bool | ScalarBoolean):
            return int(node)
        hint = ""
        if isinstance(node, str) and re.fullmatch(r"\s*[+-]?\d+\s*", node):
            hint = " (remove the quotes)"
        return self._wrong(mark, "an integer", node, hint)

    def _str(self, hint: type, node: object, mark: Mark) -> object:
        expected = "a path" if hint is Path else "a string"
        if not isinstance(node, str):
            quote = ""
            if isinstance(node, int | float | datetime.date):
                # e.g. socket_mode: 0660 is the integer 660 in YAML 1.2.
                quote = " (put the value in quotes)"
            return self._wrong(mark, expected, node, quote)
        if hint is Path:
            if not node.strip():
                self.problems.at(mark, "expected a path, got an empty string")
                return MISSING
            return Path(node)
        return str(node)


def yaml_key(f: dataclasses.Field[Any]) -> str:
    """The key of a field in the file: its name, or ``metadata["key"]`` for names Python
    reserves (``if``, ``from``, ``continue``)."""
    return str(f.metadata.get("key", f.name))


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
