"""Logging to stderr (journald picks it up) in key=value lines."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str, verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else getattr(logging, level.upper(), logging.INFO))
    # One line per inotify event is noise even when debugging sentlink itself.
    logging.getLogger("watchdog").setLevel(max(root.level, logging.INFO))
