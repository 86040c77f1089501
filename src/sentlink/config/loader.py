"""Read sentlink.yaml: YAML (round-trip, for positions) -> typed models -> semantic checks.

Every problem in the file is collected and raised together in one ConfigError whose lines read
``FILE:LINE:COL: message``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.reader import ReaderError

from sentlink.config.checks import check_config
from sentlink.config.models import Config
from sentlink.config.problems import TOP, Problems
from sentlink.config.schema import MISSING, ModelBuilder, describe
from sentlink.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("/etc/sentlink/sentlink.yaml")
CONFIG_ENV = "SENTLINK_CONFIG"


def default_config_path(env: Mapping[str, str]) -> Path:
    """``$SENTLINK_CONFIG`` when set and non-empty, else /etc/sentlink/sentlink.yaml."""
    value = env.get(CONFIG_ENV, "")
    return Path(value) if value else DEFAULT_CONFIG_PATH


def load_config(path: Path) -> Config:
    """Load and validate the file at ``path``; raises ConfigError listing every problem."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror or error}"]) from error
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        col = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ConfigError([f"{path}:{line}:{col}: not UTF-8 text"]) from error
    config = load_config_text(text, str(path))
    log.debug("loaded %s: %d accounts", path, len(config.accounts))
    return config


def load_config_text(text: str, filename: str) -> Config:
    """Load and validate YAML ``text``; ``filename`` is what problem lines start with."""
    problems = Problems(filename)
    tree = _parse(text, problems)
    if problems:
        raise ConfigError(problems.lines())
    if tree is None:
        tree = CommentedMap()  # an empty file (or only comments): every default
    if not isinstance(tree, CommentedMap):
        problems.at(TOP, f"the top level must be a mapping of keys, got {describe(tree)}")
        raise ConfigError(problems.lines())
    builder = ModelBuilder(problems)
    config = builder.build(Config, tree, TOP)
    if config is MISSING or not isinstance(config, Config):  # pragma: no cover - all defaulted
        raise ConfigError(problems.lines())
    config = check_config(config, builder.locations, problems)
    if problems:
        raise ConfigError(problems.lines())
    return config


def _parse(text: str, problems: Problems) -> object:
    try:
        return YAML(typ="rt").load(text)
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        message = error.problem or error.context or "invalid YAML"
        if error.context and error.problem and error.context_mark is not None:
            message += (
                f" ({error.context} at {error.context_mark.line + 1}:"
                f"{error.context_mark.column + 1})"
            )
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        problems.add(line, col, message)
    except ReaderError as error:
        # Characters YAML forbids (control characters, U+FFFE ...); position is an offset.
        before = text[: error.position]
        line = before.count("\n") + 1
        col = error.position - (before.rfind("\n") + 1) + 1
        char = error.character
        code = char if isinstance(char, int) else ord(str(char)[:1] or "\0")
        problems.add(line, col, f"character U+{code:04X} is not allowed in YAML")
    except YAMLError as error:
        problems.add(1, 1, f"invalid YAML: {error}")
    return None
