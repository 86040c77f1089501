"""The one small exception tree; policies live where these are caught (see docs/design.md)."""

from __future__ import annotations


class SentlinkError(Exception):
    """Base of every error sentlink raises on purpose."""


class ConfigError(SentlinkError):
    """The configuration is invalid; ``problems`` holds ``FILE:LINE:COL: message`` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class CaptureError(SentlinkError):
    """A Sent copy could not be written; mail still flows, the reason is logged and counted."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # short metric label: quota, permission, unsafe, io, ...


class StoreError(SentlinkError):
    """The link store failed."""


class HookError(SentlinkError):
    """A hook could not deliver an event."""
