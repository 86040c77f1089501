"""Shared bits of the outbox and hook tests: the example verifier, configs, sample events."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import textwrap
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
HOOKS_DIR = ROOT / "hooks"


def load_example_verifier() -> ModuleType:
    """hooks/verify-webhook as a module (it has no .py suffix: it is an executable)."""
    path = HOOKS_DIR / "verify-webhook"
    loader = importlib.machinery.SourceFileLoader("verify_webhook", str(path))
    spec = importlib.util.spec_from_loader("verify_webhook", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def write_config(path: Path, store_url: str, hooks_yaml: str, outbox_yaml: str = "") -> Path:
    text = f"""\
        site_secret_file: {path.parent / "site.secret"}
        store: {{url: "{store_url}"}}
        log: {{level: info}}
        hooks:
        {textwrap.indent(textwrap.dedent(hooks_yaml), "  ")}
        outbox:
        {textwrap.indent(textwrap.dedent(outbox_yaml), "  ")}
        """
    path.write_text(textwrap.dedent(text))
    return path
