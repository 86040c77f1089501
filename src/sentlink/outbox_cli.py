"""``sentlink worker``, ``sentlink outbox list|retry|drop`` and ``sentlink db migrate``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, Protocol

import click

from sentlink import sysexits
from sentlink.config.models import Config
from sentlink.errors import SentlinkError
from sentlink.store import OutboxRow, Store

_STATES = ("pending", "dead", "done")


class _Context(Protocol):
    def load(self) -> Config: ...

    def reload(self) -> Config: ...


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"sentlink: {message}", err=True)
    raise SystemExit(code)


@contextmanager
def _store(config: Config) -> Iterator[Store]:
    from sentlink.store import open_store

    try:
        store = open_store(config.store.url)
    except SentlinkError as exc:
        _fail(f"store: {exc}", sysexits.TEMPFAIL)
    try:
        yield store
    finally:
        store.close()


@click.command()
@click.pass_obj
def worker(obj: _Context) -> None:
    """Deliver outbox events to the configured hooks until SIGTERM or SIGINT.

    `serve` runs a worker too; run more of them (on several nodes sharing a PostgreSQL store)
    to spread the work: each claims events under a lease (outbox.lease_seconds).
    """
    from sentlink.serve import serve as run_serve

    config = obj.load()
    if not config.hooks:
        _fail("no hooks: configured, nothing to deliver", sysexits.CONFIG)
    raise SystemExit(
        run_serve(
            config,
            with_milter=False,
            with_watcher=False,
            reload_config=obj.reload,
            with_proxy=False,
            with_outbox=True,
        )
    )


@click.group()
def outbox() -> None:
    """Events waiting for hooks, and dead-lettered ones."""


def _format_table(rows: list[OutboxRow]) -> str:
    if not rows:
        return ""
    columns = ("id", "type", "hook", "state", "attempts", "created", "next_attempt", "last_error")
    table = [[str(r[c]) for c in columns] for r in rows]  # type: ignore[literal-required]
    widths = [max(len(c), *(len(row[i][:60]) for row in table)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for row in table:
        lines.append("  ".join(v[:60].ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"


@outbox.command("list")
@click.option("--hook", default=None, help="Only this hook's deliveries.")
@click.option(
    "-s",
    "--state",
    "states",
    multiple=True,
    type=click.Choice(_STATES),
    help="Only these states (repeatable). Default: pending and dead.",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one delivery per line.")
@click.pass_obj
def outbox_list(
    obj: _Context, hook: str | None, states: tuple[str, ...], limit: int | None, as_json: bool
) -> None:
    """List deliveries, oldest first, and hooks a receiver disabled (410 Gone).

    JSON Lines members: id, type, hook, state, attempts, created, next_attempt, last_error,
    hook_disabled. Members are only ever added.
    """
    with _store(obj.load()) as store:
        rows = list(store.outbox_rows(states or ("pending", "dead"), hook, limit))
        disabled = store.disabled_hooks()
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, ensure_ascii=False))
        return
    click.echo(_format_table(rows), nl=False)
    for name, reason in sorted(disabled.items()):
        click.echo(f"hook {name} is DISABLED: {reason} (sentlink outbox retry --hook {name})")


def _ids_or_scope(hook: str | None, ids: tuple[str, ...], everything: bool) -> None:
    if not ids and hook is None and not everything:
        _fail("name event ids, --hook NAME, or --all", sysexits.USAGE)


def _change(
    obj: _Context,
    hook: str | None,
    ids: tuple[str, ...],
    everything: bool,
    as_json: bool,
    action: Callable[[Store], int],
    verb: str,
) -> None:
    _ids_or_scope(hook, ids, everything)
    with _store(obj.load()) as store:
        count = action(store)
    if as_json:
        click.echo(json.dumps({verb: count}))
    else:
        click.echo(f"{count} deliveries {verb}")


@outbox.command("retry")
@click.argument("ids", nargs=-1)
@click.option("--hook", default=None, help="Only this hook's deliveries; also re-enables it.")
@click.option("--all", "everything", is_flag=True, help="Every pending and dead delivery.")
@click.option("--json", "as_json", is_flag=True, help="Print the count as a JSON object.")
@click.pass_obj
def outbox_retry(
    obj: _Context, ids: tuple[str, ...], hook: str | None, everything: bool, as_json: bool
) -> None:
    """Deliver pending or dead events now, their dead-letter age restarted."""

    def action(store: Store) -> int:
        hooks = [hook] if hook is not None else list(store.disabled_hooks()) if everything else []
        for name in hooks:
            if store.enable_hook(name):
                click.echo(f"hook {name} enabled again", err=True)
        return store.retry_deliveries(hook, set(ids), time.time())

    _change(obj, hook, ids, everything, as_json, action, "retried")


@outbox.command("drop")
@click.argument("ids", nargs=-1)
@click.option("--hook", default=None, help="Only this hook's deliveries.")
@click.option("--all", "everything", is_flag=True, help="Every pending and dead delivery.")
@click.option("--json", "as_json", is_flag=True, help="Print the count as a JSON object.")
@click.pass_obj
def outbox_drop(
    obj: _Context, ids: tuple[str, ...], hook: str | None, everything: bool, as_json: bool
) -> None:
    """Delete pending or dead deliveries: those events never go to that hook."""
    _change(
        obj,
        hook,
        ids,
        everything,
        as_json,
        lambda store: store.drop_deliveries(hook, set(ids)),
        "dropped",
    )


@click.group()
def db() -> None:
    """The store's schema."""


@db.command("migrate")
@click.pass_obj
def db_migrate(obj: _Context) -> None:
    """Bring the store's schema up to date (SQLite or PostgreSQL); safe to run any time.

    Every command that opens the store migrates it too; run this before starting several
    nodes on a new version.
    """
    with _store(obj.load()) as store:
        version = store.schema_version()
    click.echo(f"store schema at version {version}")
