"""The proxy as Postfix's after-queue content filter, on a real Postfix, killed mid-stream.

Postfix (content_filter = sentlink:[127.0.0.1]:PORT) hands each queued message to
``sentlink proxy``; the proxy files alice's Sent copy and re-injects into a second smtpd
(-o content_filter=). When the proxy dies, Postfix keeps the messages and retries; the copies
filed before the crash are not filed again.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import (
    LOOPBACK,
    MailLab,
    find_binary,
    free_port,
    is_listening,
    maildir_files,
    make_lab_dir,
    message_id_of,
    wait_for,
)
from proxy_fixtures import ALICE, proxy_config

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "postfix"

pytestmark = pytest.mark.real

# The issue asks for 500; each message passes Postfix twice plus the proxy, which keeps the
# test well inside its time budget on two cores.
MESSAGES = 500
OUTSIDE = "dave@remote.test"


class ProxyProcess:
    """``sentlink proxy`` in its own process group (so SIGKILL reaches only it)."""

    def __init__(self, config: Path, workdir: Path, port: int) -> None:
        self.config, self.workdir, self.port = config, workdir, port
        self.log = workdir / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sentlink", "-c", str(self.config), "proxy"],
                cwd=self.workdir,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_for(lambda: is_listening(self.port), 15.0, what="sentlink proxy listening")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


@pytest.fixture
def filtered(lab_tmp_path: Path) -> Iterator[tuple[MailLab, ProxyProcess]]:
    proxy_port, reinject_port = free_port(), free_port()
    # contrib/postfix as shipped, on this lab's free ports instead of 10025/10026.
    master = (CONTRIB / "content-filter.master.cf").read_text()
    master = master.replace("127.0.0.1:10026", f"{LOOPBACK}:{reinject_port}")
    main = {}
    for line in (CONTRIB / "content-filter.main.cf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            main[name.strip()] = value.strip().replace(":10025", f":{proxy_port}")
    assert main == {"content_filter": f"sentlink:[{LOOPBACK}]:{proxy_port}"}
    lab = MailLab(
        make_lab_dir(lab_tmp_path),
        sasl=False,
        extra_main_cf=main,
        extra_master_cf=master,
    )
    workdir = make_lab_dir(lab_tmp_path, prefix="proxy-")
    text = proxy_config(
        workdir,
        lab.postfix.mailbox("alice"),
        mode="content_filter",
        reinject=f"{LOOPBACK}:{reinject_port}",
        port=proxy_port,
    )
    (workdir / "sentlink.yaml").write_text(text)
    proxy = ProxyProcess(workdir / "sentlink.yaml", workdir, proxy_port)
    lab.start()
    try:
        proxy.start()
        yield lab, proxy
    finally:
        proxy.stop()
        lab.stop()


def smtp_source(port: int, count: int) -> subprocess.Popen[bytes]:
    """Postfix's load generator: ``count`` 10 KB messages from alice over 10 sessions."""
    argv = [
        find_binary("smtp-source") or "smtp-source",
        "-c", "-m", str(count), "-s", "10", "-l", "10240",
        "-f", ALICE, "-t", OUTSIDE, f"{LOOPBACK}:{port}",
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def ids_of(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        message_id = message_id_of(path.read_bytes().split(b"\n\n", 1)[0] + b"\n\n")
        assert message_id is not None, path
        found.append(message_id)
    return found


def test_every_message_is_delivered_and_filed_once_across_a_proxy_crash(
    filtered: tuple[MailLab, ProxyProcess],
) -> None:
    lab, proxy = filtered
    postfix = lab.postfix
    alice = postfix.mailbox("alice")
    source = smtp_source(postfix.port, MESSAGES)
    wait_for(
        lambda: len(maildir_files(alice, "Sent")) >= MESSAGES // 3,
        60.0,
        what="a third of the copies",
    )
    proxy.kill()  # mid-stream: sessions in flight die with it
    killed_at = len(maildir_files(alice, "Sent"))
    assert source.wait(60) == 0, source.stderr.read() if source.stderr else ""
    proxy.start()
    # Every message relayed at least once (a few may arrive twice, see below), then nothing left.
    wait_for(
        lambda: len({m.message_id for m in postfix.relayed()}) >= MESSAGES,
        90.0,
        what=f"{MESSAGES} distinct messages relayed",
    )
    postfix.wait_queue_empty(timeout=60.0)

    copies = collections.Counter(ids_of(maildir_files(alice, "Sent")))
    delivered = collections.Counter(m.message_id for m in postfix.relayed())
    assert killed_at < MESSAGES
    assert "status=deferred" in postfix.maillog_text()  # the crash made Postfix retry
    assert len(delivered) == MESSAGES  # every message delivered
    assert set(copies) == set(delivered)  # every message filed
    assert max(copies.values()) == 1  # and filed once, retries included
    # Only a message whose re-injection had succeeded when the proxy died can arrive twice
    # (Postfix never got our 250): at most one per session then in flight.
    assert sum(delivered.values()) - MESSAGES <= 10
