"""The ``sentlink`` command. Objects are built here and passed down; nothing below is global."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import click

from sentlink import __version__, sysexits
from sentlink.cli_examples import add_examples
from sentlink.config import default_config_path, load_config
from sentlink.config.models import AccountConfig, Config
from sentlink.errors import ConfigError, SentlinkError
from sentlink.logsetup import setup_logging


@dataclass(frozen=True)
class Context:
    config_path: Path
    verbose: bool

    def load(self) -> Config:
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            for problem in exc.problems:
                click.echo(problem, err=True)
            raise SystemExit(sysexits.CONFIG) from None
        except OSError as exc:
            click.echo(f"{self.config_path}: {exc.strerror}", err=True)
            raise SystemExit(sysexits.CONFIG) from None
        setup_logging(config.log, self.verbose)
        return config

    def reload(self) -> Config:
        """Load the file again for SIGHUP; raises ConfigError instead of exiting."""
        return load_config(self.config_path)


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"sentlink: {message}", err=True)
    raise SystemExit(code)


class SysexitsGroup(click.Group):
    """Usage errors exit 64 (EX_USAGE), as sysexits tools do, not click's 2."""

    def main(self, *args: object, **kwargs: object) -> NoReturn:
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[call-overload]
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            raise SystemExit(sysexits.TEMPFAIL) from None
        except click.UsageError as exc:
            exc.show()
            raise SystemExit(sysexits.USAGE) from None
        except click.ClickException as exc:
            exc.show()
            raise SystemExit(sysexits.USAGE) from None
        raise SystemExit(rv if isinstance(rv, int) else 0)


@click.group(cls=SysexitsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Configuration file. Default: $SENTLINK_CONFIG, else /etc/sentlink/sentlink.yaml.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(__version__, prog_name="sentlink")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, verbose: bool) -> None:
    """File every sent message in the sender's Sent folder and link mail to CRM records.

    sentlink runs beside Postfix or Sendmail: a milter captures outbound mail (with the Bcc
    recipients only the envelope knows) into the sender's Maildir Sent folder, and a watcher links
    each filed message to the CRM contacts and leads it was sent to.

    Exit codes follow sysexits(3): 0 ok, 64 usage, 65 bad data, 75 temporary failure, 78 bad
    configuration.
    """
    ctx.obj = Context(config_path or default_config_path(os.environ), verbose)


@cli.command("check-config")
@click.pass_obj
def check_config(obj: Context) -> None:
    """Validate the configuration file.

    Prints every problem as FILE:LINE:COL: message and exits 78 (EX_CONFIG), or exits 0.
    """
    obj.load()
    click.echo(f"{obj.config_path}: ok")


@cli.command()
@click.pass_obj
def serve(obj: Context) -> None:
    """Run every configured component until SIGTERM or SIGINT.

    The milter runs when the file has a milter: section, the SMTP proxy with proxy:, the outbox
    worker with hooks:, the metrics endpoint with metrics:; the watcher always runs (in a child
    process at a lower priority when a capture entrance runs here), linking what lands in the
    watched folders. SIGHUP reloads the configuration (a bad file is refused); SIGTERM lets
    SMTP sessions in flight finish, then exits 0.
    """
    from sentlink.serve import serve as run_serve

    raise SystemExit(
        run_serve(
            obj.load(), with_milter=True, reload_config=obj.reload, config_path=obj.config_path
        )
    )


@cli.command("milter")
@click.pass_obj
def milter_command(obj: Context) -> None:
    """Run only the milter (no watcher: nothing is linked until a watcher or reindex runs)."""
    from sentlink.serve import serve as run_serve

    config = obj.load()
    if config.milter is None:
        fail(f"{obj.config_path}: no milter: section", sysexits.CONFIG)
    raise SystemExit(
        run_serve(
            config,
            with_milter=True,
            with_watcher=False,
            reload_config=obj.reload,
            with_proxy=False,
            with_outbox=False,
        )
    )


@cli.command("proxy")
@click.pass_obj
def proxy_command(obj: Context) -> None:
    """Run only the SMTP proxy (submission or Postfix content filter, per proxy.mode).

    Copies land in the Sent folders; a watcher (serve, watch) or reindex links them.
    """
    from sentlink.serve import serve as run_serve

    config = obj.load()
    if config.proxy is None:
        fail(f"{obj.config_path}: no proxy: section", sysexits.CONFIG)
    raise SystemExit(
        run_serve(
            config,
            with_milter=False,
            with_watcher=False,
            reload_config=obj.reload,
            with_proxy=True,
            with_outbox=False,
        )
    )


@cli.command("config")
@click.option("--defaults", "which", flag_value="defaults", help="Built-in defaults (postconf -d).")
@click.option(
    "--non-default", "which", flag_value="non-default", help="Only what the file changes (-n)."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of lines.")
@click.pass_obj
def config_command(obj: Context, which: str | None, as_json: bool) -> None:
    """Print the effective configuration as NAME = VALUE lines (like postconf).

    Without options every key is printed with the value in force: the file's, else the default.

    \b
    Examples:
        sentlink config --non-default
        sentlink config --json | jq .milter
    """
    from sentlink.config.dump import as_data, non_default, render_json, render_lines
    from sentlink.config.models import Config

    if which == "defaults":
        data = as_data(Config())
    else:
        config = obj.load()
        data = non_default(config) if which == "non-default" else as_data(config)
    click.echo(render_json(data) if as_json else render_lines(data), nl=as_json)


@cli.command()
@click.argument("address")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_obj
def match(obj: Context, address: str, as_json: bool) -> None:
    """Show which CRM records ADDRESS would be linked to, and why (or why not).

    Applies the same rules as linking: the accounts' own addresses, internal_domains and
    crm.never_log exclude an address; crm.strip_plus_tags and crm.multiple_match choose records.
    Exits 65 (EX_DATAERR) when ADDRESS is not a valid address.
    """
    from sentlink.addresses import AmbiguousAddressError, normalize_address
    from sentlink.linker import Linker
    from sentlink.store import Store

    config = obj.load()
    try:
        normalized = normalize_address(address)
    except AmbiguousAddressError as exc:
        fail(f"{address!r}: {exc}", sysexits.DATAERR)
    with _store(config) as raw:
        store: Store = raw  # type: ignore[assignment]
        reason, records = Linker(store, config).explain_address(normalized)
    if as_json:
        rows = [
            {"kind": r.kind, "id": r.id, "name": r.name, "emails": list(r.emails)} for r in records
        ]
        click.echo(json.dumps({"address": normalized, "reason": reason, "records": rows}))
        return
    click.echo(f"{normalized}: {reason}")
    for r in records:
        click.echo(f"  {r.kind}:{r.id}\t{r.name}\t{', '.join(r.emails)}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_obj
def status(obj: Context, as_json: bool) -> None:
    """Show whether serve runs, its components, the last rescan, outbox depths and disabled hooks.

    Reads the state serve writes to status_file every few seconds, and the store. Exits 0 when
    serve runs with every component up, 69 (EX_UNAVAILABLE) otherwise.
    """
    from sentlink.status import healthy, read_status, render
    from sentlink.store import Store

    config = obj.load()
    with _store(config) as raw:
        store: Store = raw  # type: ignore[assignment]
        state = read_status(config.status_file, store)
    click.echo(json.dumps(state) if as_json else render(state), nl=as_json)
    if not healthy(state):
        raise SystemExit(sysexits.UNAVAILABLE)


@cli.command("postfix-config")
@click.option(
    "--queue-directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Postfix's queue_directory. Default: `postconf -h queue_directory`, else "
    "/var/spool/postfix.",
)
@click.pass_obj
def postfix_config(obj: Context, queue_directory: Path | None) -> None:
    """Print the main.cf and master.cf lines that connect Postfix to this configuration.

    Milters are named in Postfix's syntax (unix:PATH relative to the queue directory, or
    inet:HOST:PORT), with default_action=accept so mail flows when sentlink is down. Warns on
    stderr when a chrooted smtpd could not reach the socket.

    \b
    Example:
        sentlink postfix-config >> /tmp/lines && less /tmp/lines
    """
    from sentlink.postfix_config import DEFAULT_QUEUE_DIRECTORY, postfix_lines

    config = obj.load()
    if config.milter is None:
        fail(f"{obj.config_path}: no milter: section", sysexits.CONFIG)
    queue = queue_directory or _postconf_queue_directory() or DEFAULT_QUEUE_DIRECTORY
    lines = postfix_lines(config.milter, queue)
    for warning in lines.warnings:
        click.echo(f"sentlink: warning: {warning}", err=True)
    click.echo(lines.render(), nl=False)


def _postconf_queue_directory() -> Path | None:
    import shutil
    import subprocess

    postconf = shutil.which("postconf") or "/usr/sbin/postconf"
    try:
        out = subprocess.run(
            [postconf, "-h", "queue_directory"], capture_output=True, text=True, timeout=10
        )
    except OSError:
        return None
    value = out.stdout.strip()
    return Path(value) if out.returncode == 0 and value else None


@cli.command()
@click.option("-a", "--account", "accounts", multiple=True, help="Only this account (repeatable).")
@click.option("--once", is_flag=True, help="Run one reconcile of the watched folders and exit.")
@click.option("--dry-run", is_flag=True, help="Print what each new message would get; no changes.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines output (see below).")
@click.option("--child", is_flag=True, hidden=True, help="Run as serve's watcher process.")
@click.pass_obj
def watch(
    obj: Context,
    accounts: tuple[str, ...],
    once: bool,
    dry_run: bool,
    as_json: bool,
    child: bool,
) -> None:
    """Run only the watcher over each account's watch.folders (INBOX and Sent by default).

    New messages get the watch.rules, self-sent mail in INBOX moves to Sent, duplicate copies in
    Sent are reduced to one visible copy, and everything is linked. --once runs the startup
    reconcile only (progress bar on stderr, then a summary); --dry-run prints, per new message,
    which rules matched and what would happen, and changes nothing. With --json: one object per
    message for --dry-run (account, folder, file, message_id, reasons, move, flags, link,
    direction), and the summary as one object (seen, linked, already, skipped, failed, moved,
    duplicates_removed, duplicates_trashed, by_status). Exit 75 when a file could not be handled.
    """
    if not (once or dry_run):
        if accounts or as_json:
            fail("-a/--account and --json need --once or --dry-run", sysexits.USAGE)
        from sentlink.serve import serve as run_serve
        from sentlink.watch_process import child_status_file, lower_priority

        config = obj.load()
        if child:
            lower_priority()
        raise SystemExit(
            run_serve(
                config,
                with_milter=False,
                reload_config=obj.reload,
                with_proxy=False,
                with_outbox=False,
                status_file=child_status_file(config) if child else None,
                with_metrics=not child,  # serve's own metrics report the child's state
            )
        )
    raise SystemExit(_watch_once(obj.load(), accounts, dry_run, as_json))


def _watch_once(config: Config, names: tuple[str, ...], dry_run: bool, as_json: bool) -> int:
    from sentlink.secret import load_or_create_secret
    from sentlink.store import Store
    from sentlink.watch.oneshot import Reconcile

    try:
        secret = load_or_create_secret(config.site_secret_file)
    except (SentlinkError, OSError) as exc:
        fail(f"site secret: {exc}", sysexits.TEMPFAIL)
    with _store(config) as raw:
        store: Store = raw  # type: ignore[assignment]
        with Reconcile(config, _select_accounts(config, names), store, secret) as reconcile:
            pending = reconcile.pending(record_moves=not dry_run)
            if dry_run:
                for plan in reconcile.explain(pending):
                    line = plan.as_dict()
                    if as_json:
                        click.echo(json.dumps(line, ensure_ascii=False))
                    else:
                        click.echo(f"{plan.account} {plan.file}: {plan.describe()}")
                return sysexits.OK
            total = sum(len(paths) for paths in pending.values())
            with click.progressbar(
                length=total, label="reconcile", file=sys.stderr, show_pos=True
            ) as bar:
                summary = reconcile.run(pending, progress=bar.update)
    if as_json:
        click.echo(json.dumps(summary.as_dict()))
    else:
        click.echo(
            f"{summary.seen} new files: {summary.linked} linked, {summary.moved} moved, "
            f"{summary.duplicates_removed + summary.duplicates_trashed} duplicates, "
            f"{summary.skipped} skipped, {summary.failed} failed"
        )
    return sysexits.TEMPFAIL if summary.failed else sysexits.OK


def _select_accounts(config: Config, names: tuple[str, ...]) -> list[AccountConfig]:
    known = {a.name: a for a in config.accounts}
    for name in names:
        if name not in known:
            fail(f"unknown account {name!r}", sysexits.USAGE)
    return [known[n] for n in names] if names else list(config.accounts)


@contextmanager
def _store(config: Config) -> Iterator[object]:
    from sentlink.store import open_store

    try:
        store = open_store(config.store.url)
    except SentlinkError as exc:
        fail(f"store {config.store.url}: {exc}", sysexits.TEMPFAIL)
    try:
        yield store
    finally:
        store.close()


@cli.command()
@click.option("-a", "--account", "accounts", multiple=True, help="Only this account (repeatable).")
@click.option("--full", is_flag=True, help="Forget the accounts' indexed messages first.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.pass_obj
def reindex(obj: Context, accounts: tuple[str, ...], full: bool, as_json: bool) -> None:
    """Rebuild the index from the Maildirs: link every message file not yet indexed.

    The Maildir is the durable queue, so this is always safe to run, also beside serve.
    """
    from sentlink.linker import Linker
    from sentlink.store import Store
    from sentlink.watch.scan import count_files, scan_folders, sent_folders

    config = obj.load()
    refs = sent_folders(_select_accounts(config, accounts))
    with _store(config) as raw:
        store: Store = raw  # type: ignore[assignment]
        if full:
            for ref in refs:
                store.forget_account(ref.account.name)
        linker = Linker(store, config)
        total = count_files(refs)
        with click.progressbar(
            length=total, label="reindex", file=sys.stderr, show_pos=True
        ) as bar:
            summary = scan_folders(refs, store, linker, progress=bar.update)
    if as_json:
        click.echo(json.dumps(summary.as_dict()))
    else:
        click.echo(
            f"{summary.seen} new files: {summary.linked} linked, {summary.skipped} skipped, "
            f"{summary.failed} failed"
        )
    if summary.failed:
        raise SystemExit(sysexits.TEMPFAIL)


@cli.group()
def crm() -> None:
    """CRM records (contacts and leads) that mail is linked to."""


@crm.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.pass_obj
def crm_import(obj: Context, file: Path, as_json: bool) -> None:
    """Import contacts and leads from a CSV or vCard (.vcf) file, updating existing ones.

    CSV needs the header kind,id,name,email (kind is contact or lead), one row per address;
    rows with the same kind and id are one record. Bad rows are reported as FILE:LINE: message
    and skipped; the exit code is then 65 (EX_DATAERR).

    With crm.unmatched: review, past messages to addresses that now belong to a record are
    linked again (JSON member "relinked").
    """
    from sentlink.crm_import import import_records
    from sentlink.linker import Linker
    from sentlink.relink import RelinkSummary, relink_known_addresses
    from sentlink.store import Store

    config = obj.load()
    relinked = RelinkSummary(0, 0, 0, 0)
    with _store(config) as raw:
        store: Store = raw  # type: ignore[assignment]
        size = file.stat().st_size
        with click.progressbar(length=size, label="import", file=sys.stderr) as bar:
            summary = import_records(file, store, progress=bar.update)
        if config.crm.unmatched == "review":
            relinked = relink_known_addresses(store, Linker(store, config), config)
    for error in summary.errors:
        click.echo(error, err=True)
    if as_json:
        click.echo(json.dumps({**summary.as_dict(), "relinked": relinked.as_dict()}))
    else:
        click.echo(f"{summary.records} records, {summary.addresses} addresses imported")
        if relinked.messages:
            click.echo(
                f"{relinked.messages} past messages linked again "
                f"({relinked.addresses} addresses now known, {relinked.linked} linked)"
            )
    if summary.errors:
        raise SystemExit(sysexits.DATAERR)


@cli.command()
@click.option("-a", "--account", default=None, help="Only links of this account.")
@click.option("-e", "--email", default=None, help="Only links to this address.")
@click.option("-r", "--record", default=None, metavar="KIND:ID", help="Only this record.")
@click.option("-m", "--message-id", default=None, help="Only this Message-ID.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one link per line.")
@click.option(
    "--unmatched",
    is_flag=True,
    help="Addresses that matched no record (crm.unmatched: review), with counts per account.",
)
@click.pass_obj
def links(
    obj: Context,
    account: str | None,
    email: str | None,
    record: str | None,
    message_id: str | None,
    as_json: bool,
    unmatched: bool,
) -> None:
    """Show links between messages and CRM records.

    JSON Lines members: account, direction, message_id, subject, date, folder, file,
    record {kind, id, name, email}, role, via. With --unmatched: account, email, messages,
    first, last. Members are only ever added.
    """
    from sentlink.links_query import format_table, iter_links
    from sentlink.store import Store

    if unmatched:
        if email is not None or record is not None or message_id is not None:
            fail("--unmatched takes no --email, --record or --message-id", sysexits.USAGE)
        _unmatched(obj, account, as_json)
        return

    rec: tuple[str, str] | None = None
    if record is not None:
        kind, sep, rid = record.partition(":")
        if not sep or kind not in ("contact", "lead") or not rid:
            fail("--record takes KIND:ID with KIND contact or lead", sysexits.USAGE)
        rec = (kind, rid)
    config = obj.load()
    with _store(config) as raw:
        store: Store = raw  # type: ignore[assignment]
        rows = iter_links(store, account=account, email=email, record=rec, message_id=message_id)
        if as_json:
            for row in rows:
                click.echo(json.dumps(row, ensure_ascii=False))
        else:
            click.echo(format_table(list(rows)), nl=False)


def _unmatched(obj: Context, account: str | None, as_json: bool) -> None:
    from sentlink.links_query import format_unmatched_table
    from sentlink.store import Store

    config = obj.load()
    if config.crm.unmatched != "review":
        click.echo(
            f"sentlink: crm.unmatched is {config.crm.unmatched}: addresses are kept for review "
            "only with crm.unmatched: review",
            err=True,
        )
    with _store(config) as raw:
        store: Store = raw  # type: ignore[assignment]
        rows = store.unmatched_addresses(account)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, ensure_ascii=False))
    else:
        click.echo(format_unmatched_table(rows), nl=False)


def _add_outbox_commands() -> None:
    from sentlink.outbox_cli import db, outbox, worker

    for command in (worker, outbox, db):
        cli.add_command(command)


_add_outbox_commands()
add_examples(cli)


def main() -> None:
    cli(prog_name="sentlink")
