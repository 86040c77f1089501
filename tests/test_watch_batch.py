"""A reconcile writes many messages per store transaction; a crash in the middle of one loses
only index rows, and the next reconcile puts every message where it belongs, indexed once."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

from sentlink.config.models import Config
from sentlink.store import open_store
from sentlink.watch.oneshot import Reconcile
from sentlink.watch.scan import GC_GEN0, fewer_gc_passes
from test_watch_inbox import ALICE, SECRET, drop, files, mail, make_config

# Reconciles the mailbox with batches of 10 writes and dies on the 25th message it saves: two
# batches committed, the third (with its moves) in flight.
CRASHING_RECONCILE = """
import os, sys
from pathlib import Path
from sentlink.config import load_config
from sentlink.linker import Linker
from sentlink.store import open_store
from sentlink.watch import handler
from sentlink.watch.oneshot import Reconcile

handler.BATCH_WRITES = 10
handler.BATCH_SECONDS = 3600
saved = 0
real_save = Linker.save

def save(self, *args):
    global saved
    saved += 1
    if saved == 25:
        os._exit(3)
    return real_save(self, *args)

Linker.save = save
config = load_config(Path(sys.argv[1]))
store = open_store(config.store.url)
with Reconcile(config, config.accounts, store, b"s" * 32) as r:
    r.run(r.pending())
"""


def write_config(tmp_path: Path) -> tuple[Config, Path]:
    config = make_config(tmp_path)
    path = tmp_path / "sentlink.yaml"
    path.write_text(
        f"""
store: {{url: "sqlite:///{tmp_path}/s.db"}}
site_secret_file: {tmp_path}/site.secret
internal_domains: [example.test]
accounts:
  - name: alice
    addresses: [{ALICE}, a.smith@example.test]
    maildir: {tmp_path}/alice
"""
    )
    return config, path


def test_a_crash_mid_batch_is_made_good_by_the_next_reconcile(tmp_path: Path) -> None:
    (tmp_path / "site.secret").write_bytes(SECRET)
    (tmp_path / "site.secret").chmod(0o600)
    config, config_file = write_config(tmp_path)
    box = tmp_path / "alice"
    for n in range(40):
        if n % 2:  # self-sent, fetched back by POP: moves to Sent
            drop(box, "INBOX", mail(f"s{n}@x", frm=ALICE, to="bob@customer.test"))
        else:
            drop(box, "INBOX", mail(f"r{n}@x"))
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_RECONCILE, str(config_file)],
        capture_output=True,
        timeout=60,
    )
    assert crashed.returncode == 3, crashed.stderr.decode()
    store = open_store(config.store.url)
    try:
        assert len(store.account_uniqs("alice")) == 20  # two committed batches of ten
        with Reconcile(config, config.accounts, store, SECRET) as r:
            summary = r.run(r.pending())
        assert summary.seen == 20 and summary.failed == 0
        inbox, sent = files(box, "INBOX"), files(box, "Sent")
        # Every message exactly once, in the right folder, and indexed there.
        assert len(inbox) == 20 and len(sent) == 20
        assert all(b"From: bob@customer.test" in p.read_bytes() for p in inbox)
        assert all(f"From: {ALICE}".encode() in p.read_bytes() for p in sent)
        assert len(store.folder_files("alice", "INBOX")) == 20
        assert len(store.folder_files("alice", "Sent")) == 20
    finally:
        store.close()


def test_a_scan_runs_the_garbage_collector_less_often_and_restores_the_setting() -> None:
    before = gc.get_threshold()
    with fewer_gc_passes():
        assert gc.get_threshold() == (GC_GEN0, *before[1:])
    assert gc.get_threshold() == before
