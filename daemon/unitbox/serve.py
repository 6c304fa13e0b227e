"""`unitbox serve`: the daemon. Binds the configured sockets (or those systemd
passed), tells systemd when it is ready, pings the watchdog, and on SIGTERM
stops accepting and leaves the runs (systemd units) to go on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from pathlib import Path

from aiohttp import web

from unitbox.api.app import create_app
from unitbox.api.guard import ConnectionGuard, GuardedSite
from unitbox.broker.client import Broker, spawner_of
from unitbox.config import Config, parse_listen
from unitbox.engine import Engine
from unitbox.metrics import Metrics, watch_loop_lag
from unitbox.notify import InheritedFds, inherited_fds, notify, watchdog_interval_s
from unitbox.runtimes import Runtimes
from unitbox.store import open_store

log = logging.getLogger(__name__)

# Shutdown must end well inside the unit's TimeoutStopSec= (30 s): requests in
# progress get this long once held `wait` requests have been answered, then
# running runs get shutdown_grace_s (at most 15 s, see config.py).
HTTP_SHUTDOWN_S = 3.0


def build_engine(config: Config, inherited: InheritedFds | None = None) -> Engine:
    stored = inherited.stored if inherited else {}
    return Engine(config, Broker(spawner_of(config)), open_store(config), Runtimes(config),
                  metrics=Metrics(), stored_fds=stored)


def _listening_sockets(config: Config, inherited: InheritedFds) -> list[socket.socket]:
    """The sockets systemd passed (socket activation), else those of `listen`."""
    if inherited.sockets:
        return [socket.socket(fileno=fd) for fd in inherited.sockets]
    sockets: list[socket.socket] = []
    for address in config.listen:
        target = parse_listen(address)
        if isinstance(target, str):
            with contextlib.suppress(FileNotFoundError):
                Path(target).unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(target)
            sockets.append(sock)
        else:
            sockets.extend(_tcp_sockets(*target))
    return sockets


def _tcp_sockets(host: str, port: int) -> list[socket.socket]:
    """One socket per address the host name resolves to (as loop.create_server would bind)."""
    sockets = []
    seen = set()
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE):
        if (family, address) in seen:
            continue
        seen.add((family, address))
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sockets.append(sock)
    return sockets


def _sites(runner: web.AppRunner, config: Config, inherited: InheritedFds,
           guard: ConnectionGuard) -> list[web.BaseSite]:
    # A deep accept backlog: a burst of clients waits in the kernel (costing
    # no descriptor) rather than being turned away by SYN drops.
    backlog = min(config.max_connections, 4096)
    return [GuardedSite(runner, sock, guard, backlog=backlog) for sock in _listening_sockets(config, inherited)]


def connection_guard(config: Config, metrics: Metrics) -> ConnectionGuard:
    guard = ConnectionGuard(max_connections=config.max_connections,
                            max_per_client=config.max_connections_per_client,
                            header_timeout_s=config.header_timeout_s)
    metrics.gauge("unitbox_http_connections_open", "Open HTTP connections.", lambda: guard.open)
    metrics.gauge("unitbox_http_connections_refused", "Connections refused over a cap, since start.",
                  lambda: guard.refused_total)
    metrics.gauge("unitbox_http_head_timeouts", "Connections closed for sending no request head in time, "
                  "since start.", lambda: guard.head_timeouts_total)
    return guard


async def _status_loop(engine: Engine) -> None:
    """STATUS= for `systemctl status`; WATCHDOG=1 only while systemd and the
    store answer, so a daemon that lost them for good is restarted."""
    interval = watchdog_interval_s()
    while True:
        health = await engine.health()
        status = f"Serving: {engine.executing} running, {engine.queue_depth} queued" if health.ok \
            else f"Unhealthy: {health.reason}"
        notify(f"STATUS={status}", *(["WATCHDOG=1"] if interval and health.ok else []))
        await asyncio.sleep(min(interval or 5.0, 5.0))


async def serve(config: Config) -> None:
    inherited = inherited_fds()
    engine = build_engine(config, inherited)
    app = create_app(engine, shutdown_grace_s=config.shutdown_grace_s)
    # keepalive_timeout: an idle kept-alive connection, or one sending its
    # next request head, is closed after header_timeout_s (guard.py bounds the first head).
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=HTTP_SHUTDOWN_S,
                           keepalive_timeout=config.header_timeout_s)
    guard = connection_guard(config, engine.metrics)
    await runner.setup()  # starts the engine (cleanup_ctx)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for site in _sites(runner, config, inherited, guard):
            await site.start()
            log.info("listening on %s", site.name)
        notify("READY=1", f"STATUS=Serving on {', '.join(config.listen)}", f"MAINPID={os.getpid()}")
        status = asyncio.create_task(_status_loop(engine))
        lag = asyncio.create_task(watch_loop_lag(engine.metrics.loop_lag))
        await stop.wait()
        log.info("stopping: no new requests; running units go on and are picked up at the next start")
        notify("STOPPING=1", "STATUS=Stopping")
        engine.begin_shutdown()  # held `wait` requests answer now (202), so the HTTP side closes at once
        status.cancel()
        lag.cancel()
    finally:
        await runner.cleanup()
        guard.close()
