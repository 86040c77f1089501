"""The INBOX watcher: self-sent filing, duplicates in Sent, user rules, --once and --dry-run.

Real files in a temporary Maildir, a real SQLite store, the real watcher thread or one reconcile;
the servers-and-fetchers versions are in test_watch_real.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dns_lab import TxtServer, dkim_key, dkim_sign
from sentlink.config import load_config_text
from sentlink.config.models import Config
from sentlink.errors import ConfigError
from sentlink.linker import Linker
from sentlink.model import Record
from sentlink.store import Store, open_store
from sentlink.trace import TRACE_HEADER, sign
from sentlink.watch import FolderWatcher, WatchPolicy, watched_folders
from sentlink.watch.oneshot import Reconcile, Unreadable

SECRET = b"s" * 32
ALICE = "alice@example.test"


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:.1f}s")
        time.sleep(0.02)


def mail(
    mid: str,
    *,
    frm: str = "bob@customer.test",
    to: str = ALICE,
    cc: str = "",
    subject: str = "hello",
    body: str = "body\n",
    extra: str = "",
    crlf: bool = False,
) -> bytes:
    head = f"From: {frm}\nTo: {to}\n" + (f"Cc: {cc}\n" if cc else "")
    head += f"Subject: {subject}\nMessage-ID: <{mid}>\n{extra}\n"
    text = head + body
    return (text.replace("\n", "\r\n") if crlf else text).encode()


def traced(mid: str, **kwargs: str) -> bytes:
    """A copy as the capture entrance writes it: with our signed trace header."""
    value = sign(SECRET, "alice", f"<{mid}>", 1_700_000_000)
    return mail(mid, extra=f"{TRACE_HEADER}: {value}\n", **kwargs)  # type: ignore[arg-type]


_seq = iter(range(1, 10**9))


def drop(maildir: Path, folder: str, data: bytes, flags: str | None = None) -> Path:
    """Deliver as Maildir writers do: tmp/ then rename into new/ (or cur/ with flags)."""
    base = maildir if folder == "INBOX" else maildir / f".{folder}"
    for sub in ("tmp", "new", "cur"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    name = f"{int(time.time())}.M{next(_seq)}P{os.getpid()}.host"
    tmp = base / "tmp" / name
    tmp.write_bytes(data)
    dest = base / "new" / name if flags is None else base / "cur" / f"{name}:2,{flags}"
    os.rename(tmp, dest)
    return dest


def files(maildir: Path, folder: str) -> list[Path]:
    base = maildir if folder == "INBOX" else maildir / f".{folder}"
    return sorted(p for sub in ("new", "cur") for p in (base / sub).glob("*"))


def message_ids(maildir: Path, folder: str) -> list[str]:
    found = (
        re.search(rb"^Message-ID: <([^>]*)>", p.read_bytes(), re.M) for p in files(maildir, folder)
    )
    return [m.group(1).decode() for m in found if m]


def make_config(tmp_path: Path, extra: str = "") -> Config:
    return load_config_text(
        f"""
store: {{url: "sqlite:///{tmp_path}/s.db"}}
site_secret_file: {tmp_path}/site.secret
internal_domains: [example.test]
accounts:
  - name: alice
    addresses: [{ALICE}, a.smith@example.test]
    maildir: {tmp_path}/alice
{extra}
""",
        "test.yaml",
    )


@pytest.fixture
def config(tmp_path: Path) -> Config:
    (tmp_path / "site.secret").write_bytes(SECRET)
    (tmp_path / "site.secret").chmod(0o600)
    return make_config(tmp_path)


@pytest.fixture
def store(config: Config) -> Iterator[Store]:
    s = open_store(config.store.url)
    s.upsert_record(Record("contact", "c-bob", "Bob", ("bob@customer.test",)))
    yield s
    s.close()


def reconcile(config: Config, store: Store) -> dict[str, object]:
    with Reconcile(config, config.accounts, store, SECRET) as r:
        return r.run(r.pending()).as_dict()


def links(store: Store) -> list[tuple[str, str, str, str]]:
    return sorted(
        (row["message_id"], row["direction"], row["role"], row["folder"])
        for row in store.query_links(account="alice")
    )


def test_self_sent_mail_in_inbox_moves_to_sent_seen_and_is_linked_as_sent(
    config: Config, store: Store, tmp_path: Path
) -> None:
    box = tmp_path / "alice"
    drop(box, "INBOX", mail("out@x", frm=f"Alice <{ALICE}>", to="bob@customer.test"))
    drop(box, "INBOX", mail("in@x"))  # from a customer: stays, linked as received
    drop(box, "INBOX", mail("note@x", frm=ALICE, to="a.smith@example.test"))  # note to self
    summary = reconcile(config, store)
    assert summary["moved"] == 1
    sent = files(box, "Sent")
    assert len(sent) == 1 and sent[0].name.endswith(":2,S") and sent[0].parent.name == "cur"
    assert b"<out@x>" in sent[0].read_bytes()
    assert sorted(p.read_bytes().split(b"Message-ID: ")[1][:8] for p in files(box, "INBOX")) == [
        b"<in@x>\n\n",
        b"<note@x>",
    ]
    assert links(store) == [("in@x", "received", "from", "INBOX"), ("out@x", "sent", "to", "Sent")]


def test_self_cc_copy_from_a_customer_thread_moves_only_when_from_is_the_account(
    config: Config, store: Store, tmp_path: Path
) -> None:
    box = tmp_path / "alice"
    drop(box, "INBOX", mail("cc@x", frm=ALICE, to="bob@customer.test", cc=ALICE))
    drop(box, "INBOX", mail("reply@x", frm="bob@customer.test", to=ALICE, cc="x@other.test"))
    reconcile(config, store)
    assert [b"<cc@x>" in p.read_bytes() for p in files(box, "Sent")] == [True]
    assert len(files(box, "INBOX")) == 1


def test_forged_self_sent_mail_is_not_moved_when_trace_is_required(
    tmp_path: Path, store: Store
) -> None:
    config = make_config(tmp_path, "self_sent: {require: trace}")
    box = tmp_path / "alice"
    drop(box, "INBOX", mail("forged@x", frm=ALICE, to="bob@customer.test"))
    drop(box, "INBOX", traced("ours@x", frm=ALICE, to="bob@customer.test"))
    forged_trace = mail("bad@x", frm=ALICE, extra=f"{TRACE_HEADER}: v=1; a=alice; t=1; s=AAAA\n")
    drop(box, "INBOX", forged_trace)
    summary = reconcile(config, store)
    assert summary["moved"] == 1
    assert [b"<ours@x>" in p.read_bytes() for p in files(box, "Sent")] == [True]
    assert len(files(box, "INBOX")) == 2


@pytest.fixture(scope="module")
def dkim_key_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    return dkim_key(tmp_path_factory.mktemp("dkim"))


@dataclass
class DkimLab:
    """``self_sent.require: dkim`` with its key served by a loopback DNS server."""

    server: TxtServer
    config: Config
    store: Store
    box: Path
    private_key: bytes

    def signed(self, message: bytes, domain: str = "example.test") -> bytes:
        return dkim_sign(message, domain, "s1", self.private_key)


@pytest.fixture
def dkim_lab(tmp_path: Path, dkim_key_pair: tuple[bytes, str]) -> Iterator[DkimLab]:
    private, public = dkim_key_pair
    (tmp_path / "site.secret").write_bytes(SECRET)
    (tmp_path / "site.secret").chmod(0o600)
    with TxtServer({"s1._domainkey.example.test": public}) as server:
        config = make_config(
            tmp_path, f"self_sent:\n  require: dkim\n  dns_servers: ['{server.address}']"
        )
        store = open_store(config.store.url)
        yield DkimLab(server, config, store, tmp_path / "alice", private)
        store.close()


def test_with_dkim_required_only_an_aligned_valid_signature_or_our_trace_moves_mail(
    dkim_lab: DkimLab,
) -> None:
    lab, box = dkim_lab, dkim_lab.box
    # Sent from the provider's webmail and fetched back: signed by the account's domain.
    drop(box, "INBOX", lab.signed(mail("web@x", frm=ALICE, to="bob@customer.test", body="hi\n")))
    drop(box, "INBOX", mail("forged@x", frm=ALICE, to="bob@customer.test"))  # unsigned
    foreign = mail("foreign@x", frm=ALICE, to="bob@customer.test")
    drop(box, "INBOX", lab.signed(foreign, "forger.test"))  # valid, but not aligned
    edited = lab.signed(mail("edit@x", frm=ALICE, to="bob@customer.test"))
    drop(box, "INBOX", edited.replace(b"body", b"BODY"))
    drop(box, "INBOX", traced("ours@x", frm=ALICE, to="bob@customer.test"))
    with Reconcile(lab.config, lab.config.accounts, lab.store, SECRET) as r:
        plans = {
            p.message_id.strip("<>"): p.decision.describe()
            for p in r.explain(r.pending())
            if not isinstance(p, Unreadable)
        }
        summary = r.run(r.pending()).as_dict()
    assert summary["moved"] == 2
    assert sorted(message_ids(box, "Sent")) == ["ours@x", "web@x"]
    assert sorted(message_ids(box, "INBOX")) == ["edit@x", "foreign@x", "forged@x"]
    assert "move to Sent" in plans["web@x"] and "DKIM d=example.test" in plans["web@x"]
    assert plans["forged@x"].startswith("stay") and "no DKIM signature" in plans["forged@x"]
    assert "d=forger.test is not aligned with example.test" in plans["foreign@x"]
    assert "body hash mismatch" in plans["edit@x"]


def test_a_dns_outage_leaves_self_sent_mail_for_the_next_rescan(
    dkim_lab: DkimLab, caplog: pytest.LogCaptureFixture
) -> None:
    lab, box = dkim_lab, dkim_lab.box
    drop(box, "INBOX", lab.signed(mail("web@x", frm=ALICE, to="bob@customer.test")))
    lab.server.silent = True
    first = reconcile(lab.config, lab.store)
    assert first["moved"] == 0 and len(files(box, "INBOX")) == 1
    assert "DKIM check postponed to the next rescan" in caplog.text
    assert list(lab.store.query_links(account="alice")) == []  # not indexed: judged again
    lab.server.silent = False
    assert reconcile(lab.config, lab.store)["moved"] == 1
    assert len(files(box, "Sent")) == 1


def test_a_dns_server_that_is_not_an_address_is_refused_with_its_position(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, "self_sent:\n  require: dkim\n  dns_servers: [ns.example.test]")
    (problem,) = caught.value.problems
    assert problem.startswith("test.yaml:11:17: self_sent.dns_servers[0]: 'ns.example.test'")


def test_the_bcc_links_of_our_deleted_duplicate_stay_with_the_clients_copy(
    tmp_path: Path, store: Store
) -> None:
    (tmp_path / "site.secret").write_bytes(SECRET)
    (tmp_path / "site.secret").chmod(0o600)
    config = make_config(tmp_path, "hooks: [{name: crm, type: command, path: /bin/true}]")
    store.upsert_record(Record("contact", "c-carol", "Carol", ("carol@customer.test",)))
    box = tmp_path / "alice"
    # The client saved its own copy first (IMAP APPEND, no Bcc header)...
    client = drop(box, "Sent", mail("dup@x", frm=ALICE, to="bob@customer.test"), flags="S")
    assert reconcile(config, store)["linked"] == 1
    # ...then our capture copy, which lists the envelope's Bcc recipient, is filed.
    trace = sign(SECRET, "alice", "<dup@x>", 1_700_000_000)
    extra = f"Bcc: carol@customer.test\n{TRACE_HEADER}: {trace}\n"
    drop(box, "Sent", mail("dup@x", frm=ALICE, to="bob@customer.test", extra=extra), flags="S")
    summary = reconcile(config, store)
    assert summary["duplicates_removed"] == 1
    assert [p.name for p in files(box, "Sent")] == [client.name]
    rows = sorted((r["record"]["id"], r["role"], r["file"]) for r in store.query_links())
    client_file = str(client.relative_to(box))
    assert rows == [("c-bob", "to", client_file), ("c-carol", "bcc", client_file)]
    pending = list(store.outbox_rows({"pending"}))
    assert len(pending) == 2  # message.linked for bob, then one for carol alone


def test_our_duplicate_copy_is_deleted_and_the_clients_copy_stays_visible(
    config: Config, store: Store, tmp_path: Path
) -> None:
    box = tmp_path / "alice"
    ours = drop(box, "Sent", traced("dup@x", frm=ALICE, to="bob@customer.test"), flags="S")
    assert reconcile(config, store)["linked"] == 1
    # The client's own copy (IMAP APPEND): CRLF line ends, an extra trailing newline.
    client = drop(
        box, "Sent", mail("dup@x", frm=ALICE, to="bob@customer.test", body="body\n\n", crlf=True)
    )
    summary = reconcile(config, store)
    assert summary["duplicates_removed"] == 1
    assert not ours.exists()
    assert [p.name.split(":")[0] for p in files(box, "Sent")] == [client.name]
    assert links(store) == [("dup@x", "sent", "to", "Sent")]
    assert [r["file"] for r in store.query_links(account="alice")] == [str(client.relative_to(box))]


def test_keep_capture_flags_the_clients_copy_trashed_and_never_deletes_it(
    tmp_path: Path, store: Store
) -> None:
    config = make_config(tmp_path, "duplicates: {keep: capture}")
    box = tmp_path / "alice"
    client = drop(box, "Sent", mail("k@x", frm=ALICE, to="bob@customer.test"), flags="S")
    reconcile(config, store)
    ours = drop(box, "Sent", traced("k@x", frm=ALICE, to="bob@customer.test"), flags="S")
    summary = reconcile(config, store)
    assert summary["duplicates_trashed"] == 1
    names = sorted(p.name for p in files(box, "Sent"))
    assert names == sorted([ours.name, client.name.replace(":2,S", ":2,ST")])


def test_two_client_copies_keep_the_older_and_trash_the_newer(
    config: Config, store: Store, tmp_path: Path
) -> None:
    box = tmp_path / "alice"
    first = drop(box, "Sent", mail("two@x", frm=ALICE, to="bob@customer.test"), flags="S")
    reconcile(config, store)
    second = drop(box, "Sent", mail("two@x", frm=ALICE, to="bob@customer.test"), flags="S")
    reconcile(config, store)
    assert sorted(p.name for p in files(box, "Sent")) == sorted(
        [first.name, second.name.replace(":2,S", ":2,ST")]
    )


def test_reused_message_id_with_a_different_body_keeps_both_copies_visible(
    config: Config, store: Store, tmp_path: Path
) -> None:
    box = tmp_path / "alice"
    drop(box, "Sent", traced("re@x", frm=ALICE, to="bob@customer.test"), flags="S")
    reconcile(config, store)
    drop(box, "Sent", mail("re@x", frm=ALICE, to="bob@customer.test", body="other\n"), flags="S")
    summary = reconcile(config, store)
    assert summary["duplicates_removed"] == summary["duplicates_trashed"] == 0
    assert [p.name.endswith(":2,S") for p in files(box, "Sent")] == [True, True]


def test_self_sent_pop_copy_of_a_captured_message_leaves_one_visible_copy(
    config: Config, store: Store, tmp_path: Path
) -> None:
    box = tmp_path / "alice"
    drop(box, "Sent", traced("pop@x", frm=ALICE, to="bob@customer.test"), flags="S")
    reconcile(config, store)
    drop(box, "INBOX", mail("pop@x", frm=ALICE, to="bob@customer.test"))
    summary = reconcile(config, store)
    assert (summary["moved"], summary["duplicates_removed"]) == (1, 1)
    visible = files(box, "Sent")
    assert len(visible) == 1 and TRACE_HEADER.encode() not in visible[0].read_bytes()
    assert files(box, "INBOX") == []


RULES = """
watch:
  rules:
    - name: newsletters-skip-crm
      if: {header: {List-Id: ".+"}}
      then: {link: false}
    - name: flag-billing
      if: {from: "@billing\\\\.example\\\\.com$"}
      then: {flag: [F]}
      continue: true
    - name: invoices
      if: {subject: "^invoice"}
      then: {move: Invoices, flag: [S]}
"""


def test_rules_first_match_wins_unless_continue(tmp_path: Path, store: Store) -> None:
    config = make_config(tmp_path, RULES)
    box = tmp_path / "alice"
    drop(box, "INBOX", mail("news@x", extra="List-Id: <news.customer.test>\n"))
    drop(box, "INBOX", mail("inv@x", frm="ar@billing.example.com", subject="Invoice 7"))
    drop(box, "INBOX", mail("inv2@x", frm="ar@shop.test", subject="Invoice 8"))
    drop(box, "INBOX", mail("flag@x", frm="ar@billing.example.com", subject="Reminder"))
    reconcile(config, store)
    invoices = {
        p.read_bytes().split(b"Message-ID: ")[1][:6]: p.name for p in files(box, "Invoices")
    }
    assert sorted(invoices) == [b"<inv2@", b"<inv@x"]
    assert invoices[b"<inv@x"].endswith(":2,FS")
    assert invoices[b"<inv2@"].endswith(":2,S")
    inbox = [p.name for p in files(box, "INBOX")]
    assert len(inbox) == 2 and sum(n.endswith(":2,F") for n in inbox) == 1
    # The newsletter is indexed (not read again) but linked to nobody, though Bob is a contact.
    assert [m for m, *_ in links(store)] == []


def run_cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sentlink", "-c", str(config_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dry_run_explains_each_message_and_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "site.secret").write_bytes(SECRET)
    (tmp_path / "site.secret").chmod(0o600)
    config_path = tmp_path / "sentlink.yaml"
    config_path.write_text(
        f"""store: {{url: "sqlite:///{tmp_path}/s.db"}}
site_secret_file: {tmp_path}/site.secret
accounts: [{{name: alice, addresses: [{ALICE}], maildir: {tmp_path}/alice}}]
{RULES}"""
    )
    box = tmp_path / "alice"
    drop(box, "INBOX", mail("news@x", extra="List-Id: <news.customer.test>\n"))
    drop(box, "INBOX", mail("self@x", frm=ALICE, to="bob@customer.test"))
    before = sorted(str(p) for p in box.rglob("*"))
    text = run_cli(config_path, "watch", "--dry-run")
    assert text.returncode == 0, text.stderr
    assert "index without linking (rule newsletters-skip-crm)" in text.stdout
    assert "move to Sent; flag S; link (self-sent (From is the account's))" in text.stdout
    result = run_cli(config_path, "watch", "--dry-run", "--json")
    plans = sorted((json.loads(line) for line in result.stdout.splitlines()), key=str)
    assert {p["message_id"]: (p["move"], p["link"], p["direction"]) for p in plans} == {
        "news@x": (None, False, "received"),
        "self@x": ("Sent", True, "sent"),
    }
    assert sorted(str(p) for p in box.rglob("*")) == before
    once = run_cli(config_path, "watch", "--once", "--json")
    assert once.returncode == 0, once.stderr
    summary = json.loads(once.stdout)
    assert (summary["seen"], summary["moved"]) == (2, 1)
    again = json.loads(run_cli(config_path, "watch", "--once", "--json").stdout)
    assert again["seen"] == 0


def test_watcher_files_self_sent_mail_from_its_event_and_links_received_mail(
    config: Config, store: Store, tmp_path: Path
) -> None:
    watcher = FolderWatcher(
        watched_folders(config),
        store,
        Linker(store, config),
        3600,
        WatchPolicy.from_config(config, SECRET),
    )
    watcher.start()
    try:
        wait_for(lambda: watcher.rescans == 1)
        box = tmp_path / "alice"
        drop(box, "INBOX", mail("ev-out@x", frm=ALICE, to="bob@customer.test"))
        drop(box, "INBOX", mail("ev-in@x"))
        wait_for(lambda: len(links(store)) == 2)
    finally:
        watcher.stop()
    assert links(store) == [
        ("ev-in@x", "received", "from", "INBOX"),
        ("ev-out@x", "sent", "to", "Sent"),
    ]
    assert len(files(tmp_path / "alice", "Sent")) == 1
    assert watcher.rescans == 1
