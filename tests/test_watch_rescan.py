"""A rescan lists folders and compares names with the store: a message a client renamed (a flag
change) or moved between watched folders is the same message, and only its location changes."""

from __future__ import annotations

import os
from pathlib import Path

from sentlink.store import open_store
from sentlink.watch.oneshot import Reconcile
from test_watch_inbox import SECRET, drop, mail, make_config


def test_a_rescan_records_renamed_and_moved_files_without_handling_them_again(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    box = tmp_path / "alice"
    flagged = drop(box, "INBOX", mail("f@x"), flags="S")
    moved = drop(box, "INBOX", mail("m@x"))
    untouched = drop(box, "INBOX", mail("u@x"), flags="S")
    (box / ".Sent" / "cur").mkdir(parents=True)
    (box / ".Sent" / "new").mkdir()
    store = open_store(config.store.url)
    try:
        with Reconcile(config, config.accounts, store, SECRET) as r:
            assert r.run(r.pending()).as_dict()["seen"] == 3
        uniq_f, uniq_m = flagged.name.split(":")[0], moved.name
        os.rename(flagged, flagged.with_name(f"{uniq_f}:2,RS"))
        os.rename(moved, box / ".Sent" / "cur" / f"{uniq_m}:2,S")
        with Reconcile(config, config.accounts, store, SECRET) as r:
            assert all(not p for p in r.pending(record_moves=False).values())
            assert store.message_location("alice", uniq_f) == ("INBOX", f"cur/{flagged.name}")
            assert all(not p for p in r.pending().values())
        assert store.message_location("alice", uniq_f) == ("INBOX", f"cur/{uniq_f}:2,RS")
        assert store.message_location("alice", uniq_m) == ("Sent", f".Sent/cur/{uniq_m}:2,S")
        assert store.message_location("alice", untouched.name.split(":")[0]) == (
            "INBOX",
            f"cur/{untouched.name}",
        )
    finally:
        store.close()
