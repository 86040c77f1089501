"""``make demo``: a private Postfix on loopback wired to sentlink, three sample messages, the
Sent copies and the links they made; then everything it started is stopped and removed.

Needs root and Postfix (``make deb`` installs it). The system's own Postfix is not touched:
the demo's instance has its own configuration, queue and high loopback ports.
"""

from __future__ import annotations

import email
import os
import shutil
import signal
import subprocess
import sys
import time
from email.policy import compat32
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the private-instance recipes of the test suite

from lab import PostfixLab, build_message, make_lab_dir, wait_for  # noqa: E402

ALICE = "alice@example.test"
CONTACTS = """\
kind,id,name,email
contact,c-100,Bob Buyer,bob@customer.example
contact,c-101,Dave Director,dave@customer.example
lead,l-200,Carol Prospect,carol@prospect.example
"""


def sentlink(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sentlink", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def show_copy(path: Path) -> None:
    with path.open("rb") as f:
        msg = email.message_from_binary_file(f, policy=compat32)
    print(f"  {path}")
    for name in ("From", "To", "Bcc", "Subject", "Message-ID", "X-Sentlink-Trace"):
        if msg[name] is not None:
            print(f"    {name}: {msg[name]}")


def main() -> int:
    if os.geteuid() != 0 or shutil.which("postfix") is None:
        print("make demo needs root and Postfix (run `make deb` as root first)", file=sys.stderr)
        return 69  # EX_UNAVAILABLE
    root = make_lab_dir(prefix="sentlink-demo-")
    socket_path = root / "milter.sock"
    postfix = PostfixLab(root / "mta", milter=f"unix:{socket_path}")
    serve: subprocess.Popen[bytes] | None = None
    try:
        (root / "mta").mkdir(mode=0o711)
        print(f"* private Postfix on 127.0.0.1 (config and queue in {root}/mta)")
        postfix.start()
        config = root / "sentlink.yaml"
        config.write_text(
            f"""\
site_secret_file: {root}/site.secret
store: {{url: "sqlite:///{root}/sentlink.db"}}
internal_domains: [example.test]
accounts:
  - name: alice
    addresses: [{ALICE}]
    maildir: {postfix.vmail}/alice
    owner: "5000:5000"
milter:
  listen: "unix:{socket_path}"
  socket_mode: "0666"
watch: {{rescan_seconds: 5}}
"""
        )
        (root / "contacts.csv").write_text(CONTACTS)
        print("* sentlink crm import contacts.csv")
        print("  " + sentlink(config, "crm", "import", str(root / "contacts.csv")).stdout.strip())
        print("* sentlink serve")
        log = (root / "sentlink.log").open("wb")
        serve = subprocess.Popen(
            [sys.executable, "-m", "sentlink", "-c", str(config), "serve"],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_for(socket_path.exists, 15.0, what="the milter socket")
        port = postfix.submission_port  # milter_macro_daemon_name=ORIGINATING: outbound
        samples = [
            ("a quote, Bcc to Dave", ["bob@customer.example"], ["dave@customer.example"]),
            ("hello Carol (a lead)", ["carol@prospect.example"], []),
            ("[private] lunch on Friday?", ["bob@customer.example"], []),
        ]
        for n, (subject, to, bcc) in enumerate(samples, 1):
            message_id = f"<demo-{n}-{int(time.time())}@example.test>"
            msg = build_message(ALICE, to, subject, message_id=message_id)
            queue_id = postfix.send(ALICE, [*to, *bcc], msg, port=port)
            shown = f"To: {', '.join(to)}" + (
                f", Bcc (envelope only): {', '.join(bcc)}" if bcc else ""
            )
            print(f"* sent {subject!r} ({shown}), Postfix queue id {queue_id}")
        sent = postfix.vmail / "alice" / ".Sent" / "cur"
        wait_for(lambda: len(list(sent.glob("*"))) >= 3, 15.0, what="three Sent copies")
        wait_for(
            lambda: len(sentlink(config, "links", "--json").stdout.splitlines()) >= 3,
            15.0,
            what="the links",
        )
        print(f"* Sent copies in {sent}:")
        for path in sorted(sent.glob("*")):
            show_copy(path)
        print("* sentlink links  (the private message is not linked)")
        print(sentlink(config, "links").stdout, end="")
        return 0
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait(5)
        postfix.stop()
        shutil.rmtree(root, ignore_errors=True)
        print("* stopped the demo's Postfix and sentlink; removed", root)


if __name__ == "__main__":
    sys.exit(main())
