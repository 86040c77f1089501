"""Logging to stderr (journald picks it up) in key=value lines, and to syslog when asked."""

from __future__ import annotations

import logging
import logging.handlers
import sys

from sentlink.config.models import LogConfig

FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup_logging(config: LogConfig, verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handlers: list[logging.Handler] = [handler]
    if config.syslog:
        # The mail facility, as Postfix and Dovecot log: one maillog for the whole path.
        try:
            syslog = logging.handlers.SysLogHandler(
                address=config.syslog_socket,
                facility=logging.handlers.SysLogHandler.LOG_MAIL,
            )
        except OSError as exc:
            print(f"sentlink: syslog {config.syslog_socket}: {exc}", file=sys.stderr)
        else:
            syslog.setFormatter(logging.Formatter("sentlink[%(process)d]: " + FORMAT))
            handlers.append(syslog)
    root = logging.getLogger()
    for old in root.handlers:
        if old not in handlers:
            old.close()
    root.handlers[:] = handlers
    level = config.level.upper()
    root.setLevel(logging.DEBUG if verbose else getattr(logging, level, logging.INFO))
    # One line per inotify event is noise even when debugging sentlink itself.
    logging.getLogger("watchdog").setLevel(max(root.level, logging.INFO))
