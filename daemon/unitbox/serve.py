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
from unitbox.config import Config, parse_listen
from unitbox.engine import Engine
from unitbox.metrics import Metrics, watch_loop_lag
from unitbox.notify import InheritedFds, inherited_fds, notify, watchdog_interval_s
from unitbox.runtimes import Runtimes
from unitbox.store import RunStore
from unitbox.systemd import Systemd

log = logging.getLogger(__name__)

# Shutdown must end well inside the unit's TimeoutStopSec= (30 s): requests in
# progress get this long once held `wait` requests have been answered, then
# running runs get shutdown_grace_s (at most 15 s, see config.py).
HTTP_SHUTDOWN_S = 3.0


def build_engine(config: Config, inherited: InheritedFds | None = None) -> Engine:
    stored = inherited.stored if inherited else {}
    return Engine(config, Systemd(), RunStore(config.database_path), Runtimes(config), metrics=Metrics(),
                  stored_fds=stored)


def _sites(runner: web.AppRunner, config: Config, inherited: InheritedFds) -> list[web.BaseSite]:
    if inherited.sockets:
        return [web.SockSite(runner, socket.socket(fileno=fd)) for fd in inherited.sockets]
    sites: list[web.BaseSite] = []
    for address in config.listen:
        target = parse_listen(address)
        if isinstance(target, str):
            with contextlib.suppress(FileNotFoundError):
                Path(target).unlink()
            sites.append(web.UnixSite(runner, target))
        else:
            sites.append(web.TCPSite(runner, target[0], target[1], reuse_address=True))
    return sites


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
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=HTTP_SHUTDOWN_S)
    await runner.setup()  # starts the engine (cleanup_ctx)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for site in _sites(runner, config, inherited):
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
