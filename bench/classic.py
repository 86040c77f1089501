"""The classic way to keep Sent copies, as the baseline for capture.

Postfix ``sender_bcc_maps`` adds a recipient ``alice@bcc.example.test`` to every message from
alice@example.test; ``transport_maps`` sends that domain to a pipe(8) transport running
``dovecot-lda -m Sent`` for the user (Dovecot's documented LDA-with-Postfix set-up, with
``destination_recipient_limit = 1`` as that set-up requires). The bcc map lives in a separate
cleanup service used only by the classic listener, so the other configurations of the same
Postfix never see it.

dovecot-lda writes into a Maildir tree of its own (``classic-vmail/``), so the sentlink
watchers, which watch ``vmail/alice/.Sent``, never see (or link) the classic copies.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
from pathlib import Path

from serve_instance import SENDER, count_folder

from lab import VMAIL_GID, VMAIL_UID, DovecotLab, LabError, MailUser, make_maildir

BCC_DOMAIN = "bcc.example.test"
TRANSPORT = "dovecot-sent"
CLEANUP = "cleanup-classic"
LDA = "/usr/lib/dovecot/dovecot-lda"


def vmail_user() -> str:
    """A passwd name for uid 5000, which pipe(8) requires (``user=`` takes a name, not an id).

    Created (``vmail``, no home, no login shell) when uid 5000 has none.
    """
    try:
        return pwd.getpwuid(VMAIL_UID).pw_name
    except KeyError:
        pass
    try:
        group_args = ["-g", grp.getgrgid(VMAIL_GID).gr_name]
    except KeyError:
        group_args = ["-U"]  # a group of the same name and id
    argv = ["useradd", "-u", str(VMAIL_UID), *group_args, "-M", "-d", "/nonexistent"]
    argv += ["-s", "/usr/sbin/nologin", "vmail"]
    done = subprocess.run(argv, capture_output=True, check=False)
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {done.stderr.decode('utf-8', 'replace')}")
    return "vmail"


class ClassicSetup:
    """The Postfix and Dovecot pieces of the classic path, under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.vmail = root / "classic-vmail"
        self.dovecot = DovecotLab(root, users=(MailUser(SENDER, "unused-pw"),), vmail=self.vmail)
        self.bcc_map = root / "classic" / "sender_bcc"
        self.transport_map = root / "classic" / "transport"
        # dovecot-lda runs as the mail user, outside Dovecot's log process: it opens log_path
        # itself, so it needs a file it may write (Dovecot's own log is root's).
        self.lda_log = root / "classic" / "dovecot-lda.log"

    @property
    def sent_folder(self) -> Path:
        return self.vmail / "alice" / ".Sent"

    def write_maps(self) -> None:
        self.bcc_map.parent.mkdir(parents=True, exist_ok=True)
        self.bcc_map.write_text(f"{SENDER} alice@{BCC_DOMAIN}\n", encoding="utf-8")
        self.transport_map.write_text(f"{BCC_DOMAIN} {TRANSPORT}:\n", encoding="utf-8")
        self.lda_log.touch(mode=0o600)
        os.chown(self.lda_log, VMAIL_UID, VMAIL_GID)

    def main_cf(self) -> dict[str, str]:
        return {
            "transport_maps": f"texthash:{self.transport_map}",
            f"{TRANSPORT}_destination_recipient_limit": "1",
        }

    def master_cf(self, user: str) -> str:
        conf = self.dovecot.config_file
        return (
            f"{CLEANUP} unix n - n - 0 cleanup\n"
            f"  -o sender_bcc_maps=texthash:{self.bcc_map}\n"
            f"{TRANSPORT} unix - n n - - pipe\n"
            f"  flags=DRhu user={user} argv={LDA} -c {conf} -o log_path={self.lda_log}"
            " -f ${sender} -d ${user}@example.test -m Sent\n"
        )

    def listener_options(self) -> dict[str, str]:
        return {"cleanup_service_name": CLEANUP}

    def start(self) -> None:
        self.vmail.mkdir(parents=True, exist_ok=True)
        make_maildir(self.vmail / "alice", ("Sent",))
        self.dovecot.start()

    def stop(self) -> None:
        self.dovecot.stop()

    def filed(self) -> int:
        return count_folder(self.sent_folder)
