"""The Postfix lines that match a sentlink configuration (``sentlink postfix-config``).

Postfix names milters in its own syntax: ``unix:PATH`` or ``inet:HOST:PORT`` (MILTER_README),
not libmilter's ``inet:PORT@HOST``. Postfix daemons run with the queue directory as their working
directory, and chrooted ones (master.cf chroot=y, Debian's default for smtpd and cleanup) see
only what lies below it: a socket under the queue directory, named by a path relative to it,
works for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sentlink.config.listen import parse_listen
from sentlink.config.models import MilterConfig

DEFAULT_QUEUE_DIRECTORY = Path("/var/spool/postfix")


@dataclass(frozen=True)
class PostfixLines:
    main_cf: tuple[str, ...]
    master_cf: tuple[str, ...]
    warnings: tuple[str, ...]

    def render(self) -> str:
        return (
            "# main.cf\n"
            + "".join(f"{line}\n" for line in self.main_cf)
            + "\n# master.cf: add to the submission service (and smtps, if you run it)\n"
            + "".join(f"{line}\n" for line in self.master_cf)
        )


def postfix_milter_target(milter: MilterConfig, queue_directory: Path) -> tuple[str, list[str]]:
    """The milter as Postfix names it, and warnings about reaching it."""
    sock = parse_listen(milter.listen)
    warnings: list[str] = []
    if sock.family in ("inet", "inet6"):
        host = f"[{sock.host}]" if sock.family == "inet6" else sock.host
        return f"inet:{host}:{sock.port}", warnings
    if sock.path is None:
        raise ValueError(f"{milter.listen}: Postfix cannot connect to this socket")
    path = sock.path.absolute()
    try:
        relative = path.relative_to(queue_directory)
    except ValueError:
        warnings.append(
            f"{path} is outside Postfix's queue directory {queue_directory}: a chrooted smtpd "
            f"or cleanup (master.cf chroot=y) cannot see it. Put the socket below "
            f"{queue_directory} (e.g. {queue_directory}/sentlink/milter.sock) or run those "
            "services unchrooted."
        )
        return f"unix:{path}", warnings
    return f"unix:{relative}", warnings


def postfix_lines(milter: MilterConfig, queue_directory: Path) -> PostfixLines:
    target, warnings = postfix_milter_target(milter, queue_directory)
    others_may_write = milter.socket_mode[-1] in "2367"
    if target.startswith("unix:") and milter.socket_group is None and not others_may_write:
        warnings.append(
            "milter.socket_group is not set and socket_mode gives others no write access: "
            "Postfix (user postfix) cannot connect; set socket_group: postfix"
        )
    daemon_names = milter.outbound.daemon_name
    main_cf = (
        # default_action=accept: mail flows when sentlink is stopped or fails.
        f"sentlink_milter = {{ {target}, default_action=accept }}",
        "non_smtpd_milters = $sentlink_milter",
    )
    master_cf = ["  -o smtpd_milters=$sentlink_milter"]
    if daemon_names:
        master_cf.insert(0, f"  -o milter_macro_daemon_name={daemon_names[0]}")
    return PostfixLines(main_cf, tuple(master_cf), tuple(warnings))
