"""The SMTP proxy: submission in front of an outside SMTP server, or Postfix's content filter.

aiosmtpd parses the client side; handlers in submission.py and content_filter.py decide and
relay with aiosmtplib (relay.py); copies go through sentlink.capture off the event loop.
"""

from __future__ import annotations

from sentlink.proxy.server import run_proxy

__all__ = ["run_proxy"]
