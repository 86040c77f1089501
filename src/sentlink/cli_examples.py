"""Examples shown at the end of each command's ``--help`` (as in a man page's EXAMPLES)."""

from __future__ import annotations

import inspect

import click

EXAMPLES: dict[str, tuple[str, ...]] = {
    "check-config": ("sentlink -c /etc/sentlink/sentlink.yaml check-config",),
    "serve": (
        "sentlink -c /etc/sentlink/sentlink.yaml serve",
        "systemctl reload sentlink        # SIGHUP: reload the configuration",
    ),
    "milter": ("sentlink milter & sentlink watch     # capture and link in two processes",),
    "proxy": ("sentlink proxy                   # proxy: section of the configuration",),
    "watch": (
        "sentlink watch --once --json     # one reconcile, then a JSON summary",
        "sentlink watch --dry-run -a alice",
    ),
    "reindex": ("sentlink reindex --full --json",),
    "crm import": (
        "sentlink crm import contacts.csv # kind,id,name,email",
        "sentlink crm import export.vcf --json",
    ),
    "links": (
        "sentlink links --account alice",
        "sentlink links --email bob@customer.example --json | jq -r .subject",
        "sentlink links --record contact:c-100",
        "sentlink links --unmatched --json",
    ),
    "match": ("sentlink match bob@customer.example",),
    "status": ("sentlink status --json | jq .outbox",),
    "worker": ("sentlink worker                  # beside serve, or on another node",),
    "outbox list": ("sentlink outbox list --json",),
    "outbox retry": ("sentlink outbox retry --hook crm-webhook",),
    "db migrate": ("sentlink db migrate",),
}


def add_examples(group: click.Group) -> None:
    """Append each command's examples to its help text (click keeps \\b blocks unwrapped)."""
    for path, lines in EXAMPLES.items():
        command: click.Command | None = group
        for name in path.split():
            assert isinstance(command, click.Group)
            command = command.commands.get(name)
        if command is None:
            continue
        block = "\n".join(f"  {line}" for line in lines)
        text = inspect.cleandoc(command.help or "")
        command.help = f"{text}\n\n\b\nExamples:\n{block}"
