"""Hooks: where outbox events go. A hook is a small object with a ``name`` and one verb.

``deliver(event)`` sends one event and says what happened: ``done``, ``retry`` (temporarily
failed: the worker tries again later, at ``retry_after`` seconds when the receiver said so) or
``failed`` (permanently: the event is dead-lettered; with ``disable`` the hook is switched off,
as a webhook receiver asks with 410 Gone). Hooks never raise for a failed delivery; an exception
is treated as ``retry``.

Adapters are found by ``type``: the built-in ``webhook``, ``command`` and ``zoho-crm``, then
the entry points of the group ``sentlink.hooks``, so a third party ships an adapter as its own
package::

    [project.entry-points."sentlink.hooks"]
    my-crm = "my_package.hook:build"     # build(config: HookConfig) -> Hook

``sentlink.testing`` has helpers to test such an adapter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal, Protocol

from sentlink.config.models import HookConfig
from sentlink.errors import ConfigError, HookError

__all__ = [
    "ENTRY_POINT_GROUP",
    "Event",
    "Hook",
    "HookFactory",
    "Outcome",
    "Result",
    "build_hook",
    "build_hooks",
]

ENTRY_POINT_GROUP = "sentlink.hooks"
Outcome = Literal["done", "retry", "failed"]


@dataclass(frozen=True)
class Event:
    """One event: ``body`` is exactly the JSON that is sent (and signed)."""

    id: str
    type: str
    body: bytes
    data: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: bytes) -> Event:
        parsed = json.loads(body)
        return cls(parsed["id"], parsed["type"], body, parsed.get("data") or {})


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    reason: str = ""
    retry_after: float | None = None  # seconds, when the receiver named a time
    disable: bool = False

    @classmethod
    def done(cls) -> Result:
        return cls("done")

    @classmethod
    def retry(cls, reason: str, retry_after: float | None = None) -> Result:
        return cls("retry", reason, retry_after)

    @classmethod
    def failed(cls, reason: str, disable: bool = False) -> Result:
        return cls("failed", reason, None, disable)


class Hook(Protocol):
    @property
    def name(self) -> str: ...

    def deliver(self, event: Event) -> Result: ...


HookFactory = Callable[[HookConfig], Hook]


def _builtin(kind: str) -> HookFactory | None:
    if kind == "webhook":
        from sentlink.hooks.webhook import WebhookHook

        return WebhookHook.from_config
    if kind == "command":
        from sentlink.hooks.command import CommandHook

        return CommandHook.from_config
    if kind == "zoho-crm":
        from sentlink.hooks.zoho import ZohoCrmHook

        return ZohoCrmHook.from_config
    return None


def build_hook(config: HookConfig) -> Hook:
    """The hook a config names; ConfigError when its type is unknown or its settings unusable."""
    factory = _builtin(config.type)
    if factory is None:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == config.type]
        if not found:
            raise ConfigError(
                [
                    f"hook {config.name}: unknown type '{config.type}' (webhook, command, "
                    f"zoho-crm, or an adapter installed under the entry points "
                    f"{ENTRY_POINT_GROUP})"
                ]
            )
        factory = found[0].load()
    try:
        return factory(config)
    except HookError as exc:
        raise ConfigError([f"hook {config.name}: {exc}"]) from None


def build_hooks(configs: Sequence[HookConfig]) -> list[Hook]:
    hooks: list[Hook] = []
    problems: list[str] = []
    for config in configs:
        try:
            hooks.append(build_hook(config))
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return hooks
