"""The daemon's side of the broker: starts `unitbox broker`, restarts it if
it dies (runs in flight go on: they are systemd units), and turns the
runner's calls into pipelined requests awaited on the event loop. Replies
come back in order; events (`active`, `end`) go to the run's watcher.

Liveness is cached, never asked for per probe: a heartbeat (`health`, which
the broker answers with a round trip to PID 1) goes out every
HEARTBEAT_S, and `liveness()` reads how long the last one has waited. A
broker that has not answered for WEDGED_S is killed and replaced."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unitbox.broker.server import BrokerServer
from unitbox.broker.wire import Channel, Message, end_from_wire, info_from_wire, socket_pair
from unitbox.config import Config
from unitbox.errors import SystemdError
from unitbox.limits import Limits
from unitbox.systemd import NoAnswer, UnitActive, UnitEnd, UnitInfo, UnitManager

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
UNRESPONSIVE_S = 1.0  # a heartbeat unanswered this long: systemd is reported unresponsive
WEDGED_S = 30.0  # … this long: the broker is killed and a new one started
READY_TIMEOUT_S = 20.0
CALL_TIMEOUT = "5s"  # sd-bus's method-call timeout in the broker ($SYSTEMD_BUS_TIMEOUT; default 25 s)
RESPAWN_DELAYS_S = (0.1, 0.5, 1.0, 2.0, 5.0)
FORGET_BATCH = 500  # run ids per `forget` (the broker takes up to checks.MAX_FORGET)


@dataclass(frozen=True, slots=True)
class ProgramExited:
    """A warm unit's program ended by itself with `code`, and its record will
    say no more than that (broker/warm.py); its unit is not over yet."""

    code: int


RunEvent = UnitActive | UnitEnd | ProgramExited
Watcher = Callable[[RunEvent], None]


class BrokerLost(NoAnswer):
    """The broker went away with the request unanswered: it may have been done."""


class BrokerRefused(SystemdError):
    """The broker's checks refused the request (a bug in the daemon, or tampering)."""


class UnitExists(SystemdError):
    """The run's unit is there already (an earlier start went through)."""


_ERRORS: dict[str, type[SystemdError]] = {"refused": BrokerRefused, "no_answer": NoAnswer, "exists": UnitExists}


@dataclass(slots=True)
class BrokerLink:
    """A started broker: the daemon's end of the wire and how to end it."""

    sock: socket.socket
    stop: Callable[[], Awaitable[None]]
    pid: int | None = None


Spawner = Callable[[], Awaitable[BrokerLink]]


def process_spawner(config: Config) -> Spawner:
    """`unitbox broker` as a child process, with the daemon's configuration."""
    async def spawn() -> BrokerLink:
        ours, theirs = socket_pair()
        isolated = ["-I"] if sys.flags.isolated else []  # as the daemon was started (the package's wrapper uses -I)
        given = ["--config", str(config.source)] if config.source else []
        argv = [sys.executable, *isolated, "-m", "unitbox", *given, "broker", "--fd", str(theirs.fileno()),
                "--state-dir", str(config.state_dir), "--slice", config.slice, "--log-level", config.log_level]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_", "LISTEN_"))}
        env["SYSTEMD_BUS_TIMEOUT"] = CALL_TIMEOUT
        try:
            process = await asyncio.create_subprocess_exec(*argv, pass_fds=[theirs.fileno()], env=env,
                                                           stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()

        async def stop() -> None:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await process.wait()
        return BrokerLink(ours, stop, process.pid)
    return spawn


def socket_spawner(path: Path) -> Spawner:
    """The packaged split: connect to unitbox-broker.socket, where systemd
    starts a broker (root, a unit of its own) for the connection. Stopping
    is hanging up: that broker then exits; the runs go on."""
    async def spawn() -> BrokerLink:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(path))
        except OSError as exc:
            sock.close()
            raise SystemdError(f"cannot connect to the broker at {path}: {exc.strerror or exc} "
                               "(is unitbox-broker.socket running?)") from exc

        async def stop() -> None:
            sock.close()
        return BrokerLink(sock, stop)
    return spawn


def spawner_of(config: Config) -> Spawner:
    return socket_spawner(config.broker_socket) if config.broker_socket else process_spawner(config)


def in_process_spawner(config: Config, systemd: UnitManager) -> Spawner:
    """The broker's server on the daemon's own loop, over a real socketpair
    (the fast tests: a fake systemd behind the real wire and checks; inputs
    staged under the state dir, not on the host's /run)."""
    async def spawn() -> BrokerLink:
        ours, theirs = socket_pair()
        server = BrokerServer(theirs, config, systemd, stage_root=config.state_dir / "stage")
        asyncio.get_running_loop().call_soon(server.start)

        async def stop() -> None:
            server.close()
        return BrokerLink(ours, stop)
    return spawn


class Broker:
    def __init__(self, spawn: Spawner) -> None:
        self._spawn = spawn
        self._link: BrokerLink | None = None
        self._channel: Channel | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._watchers: dict[str, Watcher] = {}
        self._ready: asyncio.Future[str] | None = None
        self._down_reason = ""
        self._on_down: Callable[[str], None] = lambda reason: None
        self._on_up: Callable[[], None] = lambda: None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.up = False
        self.version = ""
        self.warm: dict[str, float] = {}  # the warm pools' counts, as of the last heartbeat (broker/warm.py)
        self.restarts = 0
        self._ping_sent: float | None = None
        self._health_error = ""

    # -- life -----------------------------------------------------------------------------
    async def start(self, on_down: Callable[[str], None], on_up: Callable[[], None]) -> None:
        """Start the broker and wait until it is subscribed to systemd
        (SystemdError if it cannot be). Later losses and returns are told
        to `on_down(reason)` and `on_up()`."""
        self._on_down, self._on_up = on_down, on_up
        await self._connect()
        self._spawn_task(self._heartbeat())

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        if self._channel is not None:
            self._channel.close()
        if self._link is not None:
            await self._link.stop()

    @property
    def pid(self) -> int | None:
        return self._link.pid if self._link is not None else None

    async def _connect(self) -> None:
        link = await self._spawn()
        loop = asyncio.get_running_loop()
        self._link, self._ready = link, loop.create_future()
        self._channel = Channel(link.sock, self._on_message, self._on_closed)
        try:
            self.version = await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT_S)
        except (TimeoutError, SystemdError) as exc:
            self._channel.close()
            await link.stop()
            reason = exc.message if isinstance(exc, SystemdError) else "the broker did not get ready in time"
            raise SystemdError(f"cannot talk to systemd: {reason}") from exc
        self.up, self._ping_sent, self._health_error, self._down_reason = True, None, "", ""

    def _on_closed(self, reason: str) -> None:
        was_up, self.up = self.up, False
        reason = self._down_reason = self._down_reason or f"the broker exited ({reason})"
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(SystemdError(reason))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrokerLost(f"the broker went away before answering: {reason}"))
        self._pending.clear()
        if self._link is not None:
            self._spawn_task(self._link.stop())  # reap it (or kill it, if it only hung up)
        if was_up and not self._closing:
            log.error("%s; starting a new one", reason)
            self._on_down(reason)
            self._spawn_task(self._respawn())

    async def _respawn(self) -> None:
        for attempt in itertools.count():
            await asyncio.sleep(RESPAWN_DELAYS_S[min(attempt, len(RESPAWN_DELAYS_S) - 1)])
            if self._closing:
                return
            try:
                await self._connect()
            except (SystemdError, OSError) as exc:
                self._down_reason = str(exc)
                log.warning("starting the broker again (attempt %d): %s", attempt + 1, exc)
                continue
            self.restarts += 1
            log.debug("the broker is back (pid %s)", self.pid)
            self._on_up()
            return

    def _spawn_task(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the wire ---------------------------------------------------------------------------
    def _on_message(self, message: Message, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)  # the broker sends none; never keep what is not expected
        if (request := message.get("id")) is not None:
            future = self._pending.pop(request, None)
            if future is None or future.done():
                return
            if "error" in message:
                future.set_exception(_ERRORS.get(message.get("kind", ""), SystemdError)(str(message["error"])))
            else:
                future.set_result(message.get("ok"))
            return
        match message.get("ev"):
            case "ready":
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(str(message.get("version", "")))
            case "down":
                self._down_reason = f"the broker lost systemd: {message.get('reason', '')}"
            case "active":
                self._deliver(message.get("run"), UnitActive(message.get("at")))
            case "end":
                self._deliver(message.get("run"), end_from_wire(message["end"]))
            case "exited" if isinstance(message.get("code"), int):
                self._deliver(message.get("run"), ProgramExited(message["code"]))

    def _deliver(self, run_id: Any, event: RunEvent) -> None:
        watcher = self._watchers.get(run_id) if isinstance(run_id, str) else None
        if watcher is None:
            return  # not a run of ours, or no longer watched
        if isinstance(event, UnitEnd):
            del self._watchers[run_id]
        watcher(event)

    async def _call(self, op: str, fds: Sequence[int] = (), **fields: Any) -> Any:
        if not self.up or self._channel is None:
            raise BrokerLost(f"the broker is not running ({self._down_reason or 'starting'})")
        request = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request] = future
        try:
            self._channel.send({"id": request, "op": op, **fields}, fds)
        except ConnectionResetError as exc:
            self._pending.pop(request, None)
            raise BrokerLost(f"the broker went away: {exc}") from exc
        return await future

    # -- what the runner asks ---------------------------------------------------------------
    def watch(self, run_id: str, watcher: Watcher) -> None:
        """Call `watcher` with UnitActive (at most once), then UnitEnd (once)."""
        self._watchers[run_id] = watcher

    def unwatch(self, run_id: str) -> None:
        self._watchers.pop(run_id, None)

    def watching(self, run_id: str) -> bool:
        return run_id in self._watchers

    async def start_run(self, run_id: str, limits: Limits, runtime: str, inputs: Path,
                        stdio: Sequence[int], *, lint: str = "off") -> str | None:
        """Start run `run_id`'s unit; `stdio`: its stdin, stdout and stderr fds;
        `inputs`: its inputs directory, sent open (the broker takes no path).
        Returns the warm unit it was handed to, or None (a unit of its own)."""
        inputs_fd = os.open(inputs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            started = await self._call("start", [*stdio, inputs_fd], run=run_id, limits=limits.as_dict(),
                                       runtime=runtime, lint=lint)
        finally:
            os.close(inputs_fd)
        return str(started["warm"]) if isinstance(started, dict) and "warm" in started else None

    async def forget(self, run_ids: Sequence[str]) -> None:
        """Remove what root wrote for these runs (their ends directories)."""
        for first in range(0, len(run_ids), FORGET_BATCH):
            await self._call("forget", runs=list(run_ids[first:first + FORGET_BATCH]))

    async def stop_run(self, run_id: str) -> None:
        await self._call("stop", run=run_id)

    async def kill_run(self, run_id: str, signal: int) -> None:
        await self._call("kill", run=run_id, signal=signal)

    async def list_units(self) -> list[UnitInfo]:
        return [info_from_wire(unit) for unit in await self._call("list")]

    async def probe(self, run_id: str) -> UnitInfo | UnitEnd:
        seen = await self._call("probe", run=run_id)
        return info_from_wire(seen["info"]) if "info" in seen else end_from_wire(seen["end"])

    # -- liveness ----------------------------------------------------------------------------
    def liveness(self) -> str | None:
        """Why systemd cannot be relied on now, or None: from cached facts only."""
        if not self.up:
            return f"systemd cannot be reached: {self._down_reason or 'the broker is starting'}; a new broker " \
                   "is being started"
        if self._ping_sent is not None and (waited := time.monotonic() - self._ping_sent) > UNRESPONSIVE_S:
            return f"systemd does not answer (no reply for {waited:.1f} s)"
        return f"systemd: {self._health_error}" if self._health_error else None

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if not self.up:
                continue
            self._ping_sent = time.monotonic()
            ping = asyncio.ensure_future(self._call("health"))
            done, _ = await asyncio.wait([ping], timeout=WEDGED_S)
            if not done:
                log.error("the broker has not answered for %.0f s; killing it", WEDGED_S)
                ping.cancel()
                if self._link is not None:
                    await self._link.stop()  # EOF follows: _on_closed starts a new one
                continue
            self._ping_sent = None
            try:
                health = ping.result()
                self.version, self.warm = str(health["version"]), dict(health.get("warm") or {})
                self._health_error = ""
            except BrokerLost:
                pass
            except SystemdError as exc:
                self._health_error = exc.message
