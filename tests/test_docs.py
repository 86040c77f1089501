"""The man pages render cleanly and cover every command and every top-level configuration key."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sentlink.cli import cli
from sentlink.config.dump import yaml_key
from sentlink.config.models import Config

DOCS = Path(__file__).resolve().parent.parent / "docs"


def roff_text(path: Path) -> str:
    # Undo roff escapes enough to search for names: "\-" is a hyphen.
    return path.read_text().replace("\\-", "-")


def test_sentlink_8_describes_every_command() -> None:
    bold = [
        line
        for line in roff_text(DOCS / "sentlink.8").splitlines()
        if line.startswith((".B ", ".BR ", ".BI "))
    ]
    for name in cli.commands:
        pattern = re.compile(rf"(^|[\s\"]){re.escape(name)}($|[\s\"])")
        assert any(pattern.search(line.split(None, 1)[1]) for line in bold), name


def test_sentlink_yaml_5_describes_every_top_level_key() -> None:
    text = roff_text(DOCS / "sentlink.yaml.5")
    for field in dataclasses.fields(Config):
        assert yaml_key(field) in text, field.name


@pytest.mark.parametrize("page", ["sentlink.8", "sentlink.yaml.5"])
def test_man_page_renders_without_groff_warnings(page: str) -> None:
    groff = shutil.which("groff")
    if groff is None:
        if os.environ.get("CI") == "true":
            pytest.fail("groff is required under CI=true (Debian package groff-base)")
        pytest.skip("groff not installed (Debian package groff-base)")
    result = subprocess.run(
        [groff, "-man", "-ww", "-z", str(DOCS / page)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_every_command_help_ends_with_examples() -> None:
    import click

    from sentlink.cli_examples import EXAMPLES

    def commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
        found = []
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                found += commands(command, f"{prefix}{name} ")
            else:
                found.append((f"{prefix}{name}", command))
        return found

    for path, command in commands(cli):
        if path in EXAMPLES:
            assert "Examples:" in (command.help or ""), path
    documented = {path for path, _ in commands(cli)}
    assert set(EXAMPLES) <= documented  # no examples for a command that does not exist
    assert len(EXAMPLES) >= len(documented) - 3  # nearly every command has some
