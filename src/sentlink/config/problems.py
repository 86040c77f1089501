"""Where things are in the YAML file, and the problems found there.

Every problem is reported as ``FILE:LINE:COL: message`` (1-based, the format compilers and editors
use), so an admin can jump straight to the offending key or value.
"""

from __future__ import annotations

from dataclasses import dataclass

# A path into the *built model*: ("accounts", 0, "addresses", 1). Model indexes can differ from
# the file's when an invalid list item was dropped, so each path also keeps the display name it
# had in the file.
ModelPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Mark:
    """A node of the file: its dotted display name and its 1-based position."""

    name: str  # "milter.timeout", "accounts[0].addresses[1]"; "" for the top level
    line: int
    col: int

    def child(self, part: str | int, line: int, col: int) -> Mark:
        return Mark(join_name(self.name, part), line, col)


TOP = Mark("", 1, 1)


def join_name(name: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{name}[{part}]"
    return f"{name}.{part}" if name else part


class Locations:
    """Marks of the values that made it into the model, by model path."""

    def __init__(self) -> None:
        self._marks: dict[ModelPath, Mark] = {(): TOP}

    def record(self, path: ModelPath, mark: Mark) -> None:
        self._marks[path] = mark

    def forget(self, prefix: ModelPath) -> None:
        """Drop ``prefix`` and everything below it (a list item that did not build)."""
        for path in [p for p in self._marks if p[: len(prefix)] == prefix]:
            del self._marks[path]

    def mark(self, path: ModelPath) -> Mark:
        """The mark of ``path``, or of its nearest recorded ancestor (a value left at default)."""
        for cut in range(len(path), -1, -1):
            found = self._marks.get(path[:cut])
            if found is not None:
                name = found.name
                for part in path[cut:]:
                    name = join_name(name, part)
                return Mark(name, found.line, found.col)
        return TOP  # pragma: no cover - () is always recorded


class Problems:
    """Collects every problem so that all of them are reported at once."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self._found: list[tuple[int, int, str]] = []

    def __bool__(self) -> bool:
        return bool(self._found)

    def add(self, line: int, col: int, message: str) -> None:
        self._found.append((line, col, message))

    def at(self, mark: Mark, message: str) -> None:
        """A problem with the value at ``mark``, named as ``NAME: message``."""
        self.add(mark.line, mark.col, f"{mark.name}: {message}" if mark.name else message)

    def lines(self) -> list[str]:
        """``FILE:LINE:COL: message`` lines in file order, each once."""
        ordered = sorted(dict.fromkeys(self._found), key=lambda p: (p[0], p[1]))
        return [f"{self.filename}:{line}:{col}: {message}" for line, col, message in ordered]
