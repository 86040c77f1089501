"""Run the proxy: one asyncio loop serving one listener until told to stop."""

from __future__ import annotations

import asyncio
import logging
import queue
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from sentlink.accounts import Accounts
from sentlink.capture import Counters, SentCopyWriter
from sentlink.config.models import Config, ProxyConfig
from sentlink.config.proxy_checks import parse_host_port
from sentlink.proxy.content_filter import ContentFilterHandler
from sentlink.proxy.copies import CopyIndex
from sentlink.proxy.deps import ProxyDeps
from sentlink.proxy.pool import RelayPool, close_all
from sentlink.proxy.session import ProxySMTP, SessionCounter
from sentlink.proxy.submission import SubmissionHandler

log = logging.getLogger("sentlink.proxy")


def tls_context(config: ProxyConfig) -> ssl.SSLContext | None:
    if config.tls.cert is None or config.tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls.cert, config.tls.key)
    return context


def build_deps(config: Config, secret: bytes, counters: Counters) -> ProxyDeps:
    assert config.proxy is not None
    hostname = socket.gethostname()
    return ProxyDeps(
        config=config.proxy,
        accounts=Accounts(config.accounts),
        writer=SentCopyWriter(secret, hostname),
        counters=counters,
        index=CopyIndex(secret),
        hostname=hostname,
        executor=ThreadPoolExecutor(max_workers=4, thread_name_prefix="sentlink-proxy-copy"),
        pool=RelayPool(max_idle=16),
    )


class Reloads:
    """Configurations handed over by SIGHUP, applied on the proxy's event loop between polls."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Config] = queue.SimpleQueue()

    def put(self, config: Config) -> None:
        self._queue.put(config)

    def take(self) -> Config | None:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None


def reloaded(deps: ProxyDeps, config: Config) -> ProxyDeps:
    """``deps`` with the accounts and proxy settings of ``config``; the listener, TLS and the
    limits a running server was built with stay until a restart."""
    assert config.proxy is not None
    running = deps.config
    kept = ("listen", "mode", "tls", "limits")
    if any(getattr(config.proxy, k) != getattr(running, k) for k in kept):
        log.warning("reload: proxy listen/mode/tls/limits changes take effect after a restart")
    proxy = replace(config.proxy, **{k: getattr(running, k) for k in kept})
    return replace(deps, config=proxy, accounts=Accounts(config.accounts))


# How often idle upstream connections past pool.IDLE_SECONDS are closed.
SWEEP_SECONDS = 5.0


async def serve_proxy(
    deps: ProxyDeps,
    stop: threading.Event,
    ready: Callable[[], None] | None = None,
    reloads: Reloads | None = None,
) -> None:
    config = deps.config
    host, port = parse_host_port(config.listen)
    context = tls_context(config)
    implicit = context is not None and config.tls.implicit
    handler: SubmissionHandler | ContentFilterHandler = (
        SubmissionHandler(deps) if config.mode == "submission" else ContentFilterHandler(deps)
    )
    counter = SessionCounter(config.limits.max_sessions)
    loop = asyncio.get_running_loop()
    # aiosmtpd logs every command line at INFO; our own line per message is enough.
    logging.getLogger("mail.log").setLevel(logging.WARNING)

    def factory() -> ProxySMTP:
        return ProxySMTP(
            handler,
            counter,
            deps,
            data_size_limit=config.limits.max_message_bytes,
            hostname=deps.hostname,
            ident="sentlink",
            tls_context=None if implicit else context,
            timeout=config.limits.idle_timeout,
            # AUTH in clear only where the config check allowed it: loopback without TLS.
            auth_require_tls=context is not None and not implicit,
            loop=loop,
        )

    server = await loop.create_server(
        factory, host, port, ssl=context if implicit else None, reuse_address=True
    )
    log.info(
        "proxy listening on %s (%s%s)",
        config.listen,
        config.mode,
        ", implicit TLS" if implicit else ", STARTTLS" if context else ", no TLS",
    )
    if ready is not None:
        ready()
    sweeps: set[asyncio.Task[None]] = set()
    next_sweep = loop.time() + SWEEP_SECONDS
    try:
        while not stop.is_set():
            await asyncio.sleep(0.2)
            if loop.time() >= next_sweep:
                next_sweep = loop.time() + SWEEP_SECONDS
                expired = deps.pool.expired()
                if expired:
                    task = loop.create_task(close_all(expired))
                    sweeps.add(task)
                    task.add_done_callback(sweeps.discard)
            new = reloads.take() if reloads is not None else None
            if new is not None and new.proxy is not None:
                # New sessions and new transactions see the new accounts and upstreams; open
                # connections are not dropped.
                handler._deps = reloaded(handler._deps, new)
                log.info("proxy: configuration reloaded; accounts=%d", len(new.accounts))
    finally:
        server.close()
        await deps.pool.close()
        # Let upstream connections being closed (QUIT) finish before the loop goes.
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        await server.wait_closed()


def run_proxy(
    config: Config,
    stop: threading.Event,
    *,
    secret: bytes,
    counters: Counters,
    ready: Callable[[], None] | None = None,
    reloads: Reloads | None = None,
) -> None:
    """Serve until ``stop`` is set (blocking: run it in its own thread or process)."""
    deps = build_deps(config, secret, counters)
    try:
        asyncio.run(serve_proxy(deps, stop, ready, reloads))
    finally:
        deps.executor.shutdown(wait=True)
        deps.writer.close()
