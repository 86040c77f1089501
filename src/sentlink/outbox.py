"""The outbox worker: claim due deliveries, hand them to their hook, record what happened.

Each hook gets its own thread, so a slow receiver never holds up another hook. Claims are leases
(``outbox.lease_seconds``): a worker that dies (SIGKILL, power cut) leaves its claims to expire,
and any worker (on any node sharing a PostgreSQL store) then claims them again: at-least-once
delivery, with the event id as the receiver's idempotency key. A worker renews its leases
before a delivery that could outlast them, so a live worker's events are never sent twice.

Retries back off along ``outbox.backoff_seconds`` with +-20% jitter (so receivers coming back
from an outage are not hit by every node at once), or at the receiver's Retry-After. An event
still failing ``outbox.dead_letter_seconds`` after it was written is dead-lettered, so one
poisoned event holds back the later events of its own records only, and not forever.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from sentlink.config.models import AccountConfig, Config, HookConfig, OutboxConfig
from sentlink.errors import ConfigError, StoreError
from sentlink.hooks import Event, Hook, Result, build_hooks
from sentlink.store import Attempt, Delivery, Store

log = logging.getLogger("sentlink.outbox")

# Margin kept between a delivery's timeout and the end of the lease it runs under.
_LEASE_MARGIN = 5.0
_MAX_BODY_CHARS = 1_000_000
# A batch's outcomes are saved at its end, or after this many seconds of a slow batch.
_SAVE_SECONDS = 1.0

BodyReader = Callable[[Mapping[str, Any]], str | None]


@dataclass(frozen=True)
class HookRunner:
    """A hook with the settings the worker needs about it."""

    hook: Hook
    timeout: float = 30.0
    include_body: bool = False


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def backoff(schedule: Sequence[int], attempts: int, rng: random.Random) -> float:
    """Seconds before retry number ``attempts`` (1-based): the schedule, +-20% jitter."""
    base = schedule[min(max(attempts, 1), len(schedule)) - 1]
    return float(base) * rng.uniform(0.8, 1.2)


class OutboxWorker:
    def __init__(
        self,
        store: Store,
        runners: Sequence[HookRunner],
        config: OutboxConfig,
        bodies: BodyReader | None = None,
        owner: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._runners = list(runners)
        self._config = config
        self._bodies = bodies
        self.owner = owner or worker_id()
        self._rng = rng or random.Random()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._results_lock = threading.Lock()
        self.results: dict[tuple[str, str], int] = {}
        """Deliveries by (hook, outcome) since start, for the metrics endpoint."""

    # running

    def start(self) -> None:
        for runner in self._runners:
            thread = threading.Thread(
                target=self._loop, args=(runner,), name=f"sentlink-hook-{runner.hook.name}"
            )
            thread.start()
            self._threads.append(thread)
        log.info("outbox worker %s: hooks %s", self.owner, [r.hook.name for r in self._runners])

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def wake(self) -> None:
        """New events were written: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 40.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    def _loop(self, runner: HookRunner) -> None:
        while not self._stop.is_set():
            try:
                full = self.deliver_batch(runner) >= self._config.batch
            except StoreError as exc:
                log.error("hook %s: store failed: %s", runner.hook.name, exc)
                full = False
            if not full:
                self._wake.wait(self._config.poll_seconds)
                self._wake.clear()

    # one round

    def deliver_batch(self, runner: HookRunner) -> int:
        """Claim and deliver one batch for ``runner``'s hook; returns how many were claimed.

        Outcomes are recorded together, one transaction per batch (or per second of a slow
        batch) rather than one per event: a worker killed in between delivers those events
        again, which at-least-once delivery and the event id as idempotency key allow.
        """
        name = runner.hook.name
        lease = float(self._config.lease_seconds)
        now = time.time()
        claimed = self._store.claim_deliveries(name, self.owner, self._config.batch, lease, now)
        lease_end = now + lease
        attempts: list[Attempt] = []
        saved_at = now
        try:
            for index, delivery in enumerate(claimed):
                if self._stop.is_set():
                    # Hand the rest back now instead of when the lease ends.
                    rest = [d.event_pk for d in claimed[index:]]
                    self._store.extend_lease(name, self.owner, rest, 0.0)
                    break
                if time.time() + runner.timeout + _LEASE_MARGIN > lease_end:
                    # Outcomes not saved yet hold the old lease only: save them first, so no
                    # delivered event's lease can run out and let another worker send it again.
                    self._store.finish_deliveries(name, attempts)
                    attempts, saved_at = [], time.time()
                    lease_end = time.time() + lease
                    rest = [d.event_pk for d in claimed[index:]]
                    self._store.extend_lease(name, self.owner, rest, lease_end)
                outcome, attempt = self._deliver(runner, delivery)
                attempts.append(attempt)
                with self._results_lock:
                    key = (runner.hook.name, outcome)
                    self.results[key] = self.results.get(key, 0) + 1
                if outcome == "disabled":
                    rest = [d.event_pk for d in claimed[index + 1 :]]
                    self._store.extend_lease(name, self.owner, rest, 0.0)
                    break
                if attempt.at - saved_at >= _SAVE_SECONDS:
                    self._store.finish_deliveries(name, attempts)
                    attempts, saved_at = [], attempt.at
        finally:
            self._store.finish_deliveries(name, attempts)
        return len(claimed)

    def _event(self, runner: HookRunner, delivery: Delivery) -> Event:
        body = delivery.payload.encode("utf-8")
        if not runner.include_body or self._bodies is None:
            return Event(delivery.event_id, delivery.type, body, {})
        parsed = json.loads(body)
        text = self._bodies(parsed.get("data") or {})
        if text is not None:
            parsed["data"]["body"] = text
        body = json.dumps(parsed, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return Event(delivery.event_id, delivery.type, body, parsed["data"])

    def _deliver(self, runner: HookRunner, delivery: Delivery) -> tuple[str, Attempt]:
        hook = runner.hook
        try:
            event = self._event(runner, delivery)
            result = hook.deliver(event)
        except Exception as exc:  # a hook bug must not stop the worker: retried later
            log.exception("hook %s: event %s: delivery raised", hook.name, delivery.event_id)
            result = Result.retry(f"hook raised {type(exc).__name__}")
        now = time.time()
        attempts = delivery.attempts + 1
        pk = delivery.event_pk
        if result.outcome == "done":
            log.debug("hook %s: event %s delivered", hook.name, delivery.event_id)
            return "done", Attempt(pk, "done", now, "", now)
        if result.outcome == "failed" and result.disable:
            log.error(
                "hook %s DISABLED: %s; `sentlink outbox retry --hook %s` enables it again",
                hook.name,
                result.reason,
                hook.name,
            )
            self._store.disable_hook(hook.name, result.reason, now)
            # The event stays pending: it goes out if the hook is enabled again.
            return "disabled", Attempt(pk, "pending", now, result.reason, now)
        if result.outcome == "failed":
            log.warning(
                "hook %s: event %s failed, dead-lettered: %s",
                hook.name,
                delivery.event_id,
                result.reason,
            )
            return "dead", Attempt(pk, "dead", now, result.reason, now)
        if now - delivery.since >= self._config.dead_letter_seconds:
            log.warning(
                "hook %s: event %s undelivered after %d attempts, dead-lettered: %s",
                hook.name,
                delivery.event_id,
                attempts,
                result.reason,
            )
            return "dead", Attempt(pk, "dead", now, result.reason, now)
        if result.retry_after is not None:
            delay = result.retry_after
        else:
            delay = backoff(self._config.backoff_seconds, attempts, self._rng)
        log.info(
            "hook %s: event %s attempt %d: %s; retry in %.0f s",
            hook.name,
            delivery.event_id,
            attempts,
            result.reason,
            delay,
        )
        return "retry", Attempt(pk, "pending", now + delay, result.reason, now)


class MaildirBodies:
    """The text of a message for hooks with ``include_body``: found again through the store,
    since the file may have moved or been renamed since the event was written."""

    def __init__(self, store: Store, accounts: Sequence[AccountConfig]) -> None:
        self._store = store
        self._roots = {a.name: a.maildir for a in accounts}

    def __call__(self, data: Mapping[str, Any]) -> str | None:
        account, uniq = str(data.get("account", "")), str(data.get("uniq", ""))
        root = self._roots.get(account)
        location = self._store.message_location(account, uniq) if root else None
        if root is None or location is None:
            return None
        try:
            with (root / location[1]).open("rb") as f:
                msg = email.parser.BytesParser(policy=email.policy.default).parse(f)
        except OSError:
            return None
        assert isinstance(msg, EmailMessage)
        part = msg.get_body(preferencelist=("plain", "html"))
        if part is None:
            return ""
        try:
            text = str(part.get_content())
        except (LookupError, ValueError):
            return ""
        return text[:_MAX_BODY_CHARS]


def runners_from_config(hooks: Sequence[HookConfig]) -> list[HookRunner]:
    """Build every configured hook; ConfigError lists the ones that cannot be built."""
    built = build_hooks(hooks)
    return [
        HookRunner(h, float(c.timeout), c.include_body) for h, c in zip(built, hooks, strict=True)
    ]


class OutboxComponent:
    """The worker as a ``serve`` component; a reload restarts it with the new hooks."""

    name = "outbox"

    def __init__(self, config: Config, store: Store) -> None:
        self._store = store
        self._worker = self._build(config)

    def _build(self, config: Config) -> OutboxWorker:
        return OutboxWorker(
            self._store,
            runners_from_config(config.hooks),
            config.outbox,
            MaildirBodies(self._store, config.accounts),
        )

    def start(self) -> None:
        self._worker.start()

    def alive(self) -> bool:
        return self._worker.alive()

    def reload(self, config: Config) -> None:
        try:
            worker = self._build(config)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload: outbox keeps its hooks: %s", problem)
            return
        self._worker.stop()
        self._worker = worker
        self._worker.start()

    def stop(self, timeout: float) -> None:
        self._worker.stop(timeout)

    def results(self) -> dict[tuple[str, str], int]:
        """Deliveries by (hook, outcome) of the running worker."""
        return dict(self._worker.results)
