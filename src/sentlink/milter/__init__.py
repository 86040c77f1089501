"""pymilter adapter: SMTP session callbacks -> Envelope + streamed body -> sentlink.capture.

A package, never a ``milter.py`` module: that name belongs to pymilter's C module ``milter``,
which the modules here import absolutely.
"""

from __future__ import annotations

from sentlink.milter.runner import libmilter_conn, run_milter, stop_milter
from sentlink.milter.session import MilterDeps, SentlinkMilter, deps_from_config, make_factory

__all__ = [
    "MilterDeps",
    "SentlinkMilter",
    "deps_from_config",
    "libmilter_conn",
    "make_factory",
    "run_milter",
    "stop_milter",
]
