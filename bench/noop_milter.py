"""A milter that does nothing: the cost of the milter protocol itself, the limit for any milter.

Every optional callback is negotiated away (``SMFIP_NO*``) together with its reply
(``SMFIP_NR_*``), no action is requested (flags 0), so per SMTP session the MTA only connects,
negotiates, sends end-of-message and reads our one reply: EOM cannot be skipped in milter
protocol v6.

Usage: ``python bench/noop_milter.py unix:/path/to/socket`` (or ``inet:PORT@HOST``); stops on
SIGTERM/SIGINT (libmilter's own handling).
"""

from __future__ import annotations

import os
import sys

import Milter

# Every step pymilter knows how to skip, and every reply it knows how to leave out.
_SKIP_ALL = 0
for _no_reply, _no_callback in Milter.OPTIONAL_CALLBACKS.values():
    _SKIP_ALL |= _no_reply | _no_callback


class NoopMilter(Milter.Base):  # type: ignore[misc]
    """One object per connection, as pymilter requires; answers CONTINUE at end of message."""

    def negotiate(self, opts: list[int]) -> int:
        # opts: actions, protocol steps, 2 reserved words (libmilter xxfi_negotiate). Take
        # every skip the MTA offers; ask for no action.
        opts[0] = self._actions = 0
        opts[1] = self._protocol = opts[1] & _SKIP_ALL
        opts[2] = opts[3] = 0
        return int(Milter.CONTINUE)

    def eom(self) -> int:
        return int(Milter.CONTINUE)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} unix:/path | inet:PORT@HOST", file=sys.stderr)
        return 64
    # libmilter creates the unix socket with 0777 & ~umask: Postfix's unprivileged smtpd must
    # be able to connect.
    os.umask(0)
    Milter.factory = NoopMilter
    Milter.set_flags(0)
    Milter.runmilter("bench-noop", argv[1], timeout=600)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
