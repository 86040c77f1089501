"""sentlink: Sent copies and CRM links for mail passing a Postfix or Sendmail server."""

from __future__ import annotations

__version__ = "0.1.0"
