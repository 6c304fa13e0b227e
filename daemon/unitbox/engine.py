"""The run engine: every accepted run, from admission to its final record.

A run's whole path: `submit` records it and queues it (admission.py);
`_pump` gives it a slot and `_launch` starts its unit (launcher.py); the
unit's typed events (systemd.py) move it on; `_finish` collects output and
outcome and makes the final record (lifecycle.conclude). Every change of
phase goes through `_advance` (lifecycle.py), which also keeps each waiting
phase's deadline: if systemd's signals never come, the engine looks once and
settles the run. A lost bus is reconnected and every unit looked at again.

Durability: a run is recorded before it is acknowledged; its outcome is
written by the unit's own ExecStopPost; its output pipes are parked in
systemd's fd store. A daemon that restarts finds all three (recovery.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from unitbox import notify
from unitbox.admission import Admission
from unitbox.config import Config
from unitbox.errors import Busy, NotFound, SystemdError, Unavailable, UnitboxError
from unitbox.launcher import Launcher
from unitbox.lifecycle import STOP_GRACE_S, Phase, RunLife, conclude, deadline_s
from unitbox.limits import Limits
from unitbox.metrics import Metrics
from unitbox.outcome import RunState
from unitbox.profile import unit_name
from unitbox.recovery import Action, Plan, recover
from unitbox.retention import retention_loop
from unitbox.rundir import RunDir
from unitbox.runtimes import RuntimeInfo, Runtimes
from unitbox.store import RunRecord, RunStore
from unitbox.systemd import UnitActive, UnitEnd, UnitEvent, UnitManager

log = logging.getLogger(__name__)

PERSIST_RETRY_S = 2.0
CANCEL_GRACE_S = 2.0  # SIGTERM first; SIGKILL (the unit's stop) if it is still going after this
RECONNECT_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 5.0)
NATIVE_PRIVATE_TMPFS_SINCE = 256  # TemporaryFileSystem=/tmp beats DynamicUser's PrivateTmp (systemd PR #32724)
SLICE_PROPERTIES: Mapping[str, Any] = {
    "Description": "unitbox runs (created by the daemon: the host has no unitbox.slice)",
    "CPUAccounting": True, "MemoryAccounting": True, "TasksAccounting": True,
}


@dataclass(frozen=True, slots=True)
class Submission:
    code: bytes
    stdin: bytes
    args: list[str]
    limits: Limits
    runtime: str


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    reason: str = ""
    systemd_version: str = ""


def systemd_major(version: str) -> int:
    """"252.39-1~deb12u2" → 252 (0 if unreadable)."""
    digits = ""
    for char in version.strip():
        if not char.isdigit():
            break
        digits += char
    return int(digits or 0)


def new_run_id() -> str:
    return secrets.token_hex(8)


class Engine:
    def __init__(self, config: Config, systemd: UnitManager, store: RunStore, runtimes: Runtimes, *,
                 metrics: Metrics | None = None, stored_fds: Mapping[str, list[int]] | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self._systemd = systemd
        self._store = store
        self._runtimes = runtimes
        self._stored_fds = dict(stored_fds or {})  # from systemd's fd store, by name
        source = config.source
        # A config given with --config outside /etc/unitbox may hold tokens: hide it from runs too.
        secret_paths = (str(source),) if source and not source.is_relative_to("/etc/unitbox") else ()
        self._launcher = Launcher(config, systemd, runtimes, use_fd_store=notify.fd_store_available(),
                                  secret_paths=secret_paths)
        self._admission = Admission(config.queue_size, config.max_concurrent)
        self._runs: dict[str, RunLife] = {}
        self._unsaved: dict[str, RunRecord] = {}  # final, but the store could not take it yet
        self._accepting = False
        self._bus_ok = False
        self._stopped = False
        self._closing = asyncio.Event()  # set at shutdown: held `wait` requests answer at once
        self._tasks: set[asyncio.Task[Any]] = set()
        self.healthy = False  # the last health check's verdict (the watchdog is pinged only while True)
        self.metrics.gauge("unitbox_runs_in_flight", "Runs starting or running.", lambda: self.executing)
        self.metrics.gauge("unitbox_queue_depth", "Runs waiting for a free slot.", lambda: self.queue_depth)

    # -- start and stop ------------------------------------------------------------
    async def start(self) -> None:
        self.config.runs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config.state_dir.chmod(0o700)
        await self._store.open()
        self._systemd.open(self._on_bus_lost)
        self._bus_ok = True
        self._launcher.native_private_tmpfs = systemd_major(self._systemd.version()) >= NATIVE_PRIVATE_TMPFS_SINCE
        if self._systemd.ensure_slice(self.config.slice, SLICE_PROPERTIES):
            log.info("created transient %s (install units/unitbox.slice for the shipped caps)", self.config.slice)
        self._accepting = True
        self.healthy = True
        await self._take_over(await recover(self._store, self._systemd, self.config.runs_dir))
        self._spawn(self._retry_unsaved())
        self._spawn(retention_loop(self._store, self.config.runs_dir, self.config.retention,
                                   is_live=self._runs.__contains__))

    def begin_shutdown(self) -> None:
        """Stop accepting; answer every held `wait` request now (with the run as it is)."""
        self._accepting = False
        self._closing.set()

    async def stop(self, grace_s: float = 0.0) -> None:
        """Give running runs `grace_s` to finish, then save what is unsaved and
        let go. Queued runs stay recorded and start at the next start; runs
        still going are systemd units and go on (picked up again then)."""
        if self._stopped:
            return
        self._stopped = True
        self.begin_shutdown()
        going = [run.done for run in self._runs.values() if run.holds_slot]
        if grace_s > 0 and going:
            log.info("waiting up to %.1f s for %d running runs", grace_s, len(going))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(done.wait() for done in going)), grace_s)
        for task in list(self._tasks):
            task.cancel()
        for run in self._runs.values():
            if run.timer is not None:
                run.timer.cancel()
            for capture in run.captures.values():
                capture.close()  # the fd store keeps the pipes for the next start
        self._systemd.close()
        await self._save_unsaved()
        await self._store.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def queue_depth(self) -> int:
        return self._admission.depth

    @property
    def executing(self) -> int:
        return self._admission.executing

    # -- the service: what the HTTP handlers may call ------------------------------
    async def submit(self, submission: Submission) -> RunRecord:
        if not self._accepting:
            raise Busy("the server is shutting down", retry_after_s=5)
        self._runtimes.get(submission.runtime)  # unknown → 422 before anything is written
        self._admission.reserve()  # before the first await: concurrent submissions cannot overshoot
        run_id = new_run_id()
        run_dir = RunDir(self.config.runs_dir / run_id)
        record = RunRecord(id=run_id, state=RunState.QUEUED, created_at=time.time(),
                           limits=submission.limits, runtime=submission.runtime)
        try:
            await asyncio.to_thread(run_dir.create, submission.code, submission.stdin, submission.args)
            record = await self._store.insert(record)
        except BaseException as exc:
            self._admission.unreserve()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(run_dir.remove)
            if isinstance(exc, OSError):
                raise Unavailable(f"the run cannot be recorded ({exc.strerror or exc}); nothing was started") from exc
            raise
        run = RunLife(record, run_dir)
        self._runs[run_id] = run
        self._admission.admit(run_id)
        log.debug("run %s queued", run_id, extra={"run_id": run_id, "state": "queued"})
        self._pump()
        return run.live_view()

    async def get(self, run_id: str) -> RunRecord:
        run = self._runs.get(run_id)
        if run is not None:
            return run.live_view()
        if run_id in self._unsaved:
            return self._unsaved[run_id]
        record = await self._store.get(run_id)
        if record is None:
            raise NotFound(f"no run with id {run_id!r}")
        return record

    async def page(self, state: RunState | None, limit: int, before_seq: int | None) -> list[RunRecord]:
        """Newest first; runs in flight as they are now, not as last stored."""
        records = await self._store.page(state, limit, before_seq)
        return [self._runs[r.id].live_view() if r.id in self._runs else self._unsaved.get(r.id, r)
                for r in records]

    def run_dir(self, run_id: str) -> RunDir:
        return RunDir(self.config.runs_dir / run_id)

    async def runtimes(self) -> list[RuntimeInfo]:
        return await self._runtimes.describe()

    async def wait(self, run_id: str, timeout_s: float) -> RunRecord:
        """The run once it has finished, or as it is when `timeout_s` runs out
        or the daemon begins to shut down."""
        run = self._runs.get(run_id)
        if run is not None and not self._closing.is_set():
            waiters = [asyncio.ensure_future(run.done.wait()), asyncio.ensure_future(self._closing.wait())]
            try:
                await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
        return await self.get(run_id)

    async def cancel(self, run_id: str) -> tuple[RunRecord, bool]:
        """Cancel a run. Returns the run and whether it was still going (202)
        or had already finished (200, unchanged)."""
        run = self._runs.get(run_id)
        if run is None:
            return await self.get(run_id), False
        if run.phase is Phase.ENDING:  # over already: its true end, not a cancel
            await run.done.wait()
            return run.record, False
        now = time.time()
        if run.phase is Phase.QUEUED:
            self._admission.withdraw(run_id)
            run.cancel_at = now
            run.record = run.record.evolve(state=RunState.CANCELLED, finished_at=now, cancel_requested=True)
            await self._persist(run.record)
            if run.phase is Phase.QUEUED:
                self._advance(run, Phase.DONE)
            return run.record, True
        if run.cancel_at is None:
            run.cancel_at = now
            run.record = run.record.evolve(cancel_requested=True)
            await self._persist(run.record)  # stored before the signal: a crash in between still ends cancelled
            self._request_stop(run)
        return run.live_view(), True

    async def health(self) -> Health:
        """systemd answering and the store answering; remembered for the watchdog."""
        try:
            if not self._bus_ok:
                raise SystemdError("systemd does not answer: the bus connection is being re-made")
            version = self._systemd.version()
            await self._store.ping()
        except UnitboxError as exc:
            self.healthy = False
            reason = exc.message if isinstance(exc, SystemdError) else f"run store: {exc.message}"
            return Health(False, reason)
        self.healthy = True
        return Health(True, systemd_version=version)

    # -- the lifecycle ----------------------------------------------------------------
    def _advance(self, run: RunLife, to: Phase) -> None:
        held = run.holds_slot
        run.advance(to)
        if run.timer is not None:
            run.timer.cancel()
            run.timer = None
        if (limit := deadline_s(to, run.record.limits)) is not None:
            run.timer = asyncio.get_running_loop().call_later(limit, self._deadline_passed, run, to)
        if to is Phase.DONE:
            self._runs.pop(run.id, None)
            if held:
                self._admission.release_slot()
            self._count(run.record)
            run.done.set()
            self._pump()

    def _pump(self) -> None:
        while self._accepting and self._bus_ok:
            run_id = self._admission.next_to_launch()  # takes a slot
            if run_id is None:
                return
            run = self._runs.get(run_id)
            if run is None or run.phase is not Phase.QUEUED:
                self._admission.release_slot()
                continue
            self._advance(run, Phase.LAUNCHING)
            self._launch(run)

    def _launch(self, run: RunLife) -> None:
        name = unit_name(run.id)
        try:
            self._launcher.launch(run, self._watcher(run))
        except Exception as exc:  # anything at all: the run ends as error, its slot is freed
            run.error = _launch_problem(exc)
            log.error("run %s could not be started: %s", run.id, run.error, extra={"run_id": run.id, "unit": name})
            self._end(run)
            return
        log.info("run %s starting as %s", run.id, name, extra={"run_id": run.id, "unit": name})
        self._advance(run, Phase.STARTED)
        if run.end is not None:  # ended while the start call was answered
            self._end(run)
        elif run.cancel_at is not None:
            self._request_stop(run)

    def _watcher(self, run: RunLife) -> Callable[[UnitEvent], None]:
        return functools.partial(self._on_unit_event, run)

    def _on_unit_event(self, run: RunLife, event: UnitEvent) -> None:
        if isinstance(event, UnitActive):
            if run.phase is Phase.STARTED:
                self._advance(run, Phase.RUNNING)
                run.record = run.record.evolve(started_at=event.started_at or time.time())
                self._spawn(self._persist(run.record))
            return
        run.end = run.end or event
        if run.phase in (Phase.STARTED, Phase.RUNNING):
            self._end(run)

    def _end(self, run: RunLife) -> None:
        self._systemd.unwatch(unit_name(run.id))
        self._advance(run, Phase.ENDING)
        self._spawn(self._finish(run))

    async def _finish(self, run: RunLife) -> None:
        """The unit is over (or never started): output, outcome, final record."""
        try:
            self._launcher.drain(run)
            found, streams = await asyncio.to_thread(self._launcher.collect, run)
            run.record = conclude(run, found, streams)
        except Exception as exc:
            log.exception("run %s: collecting its outcome failed", run.id)
            run.record = run.record.evolve(state=RunState.ERROR, error=f"collecting the outcome failed: {exc}",
                                           finished_at=time.time())
        await self._persist(run.record)
        self._advance(run, Phase.DONE)

    def _request_stop(self, run: RunLife) -> None:
        """Cancel: SIGTERM to the program, its unit stopped (SIGKILL) after a grace."""
        if run.phase is Phase.LAUNCHING:
            return  # `_launch` stops it once systemd has taken it
        name = unit_name(run.id)
        try:
            if run.phase is Phase.RUNNING:
                self._systemd.kill_unit(name, signal.SIGTERM)
                asyncio.get_running_loop().call_later(CANCEL_GRACE_S, self._stop_unit_if_going, run)
            else:
                self._stop_unit_if_going(run)
        except SystemdError as exc:
            log.warning("run %s: stopping its unit: %s", run.id, exc.message, extra={"run_id": run.id})

    def _stop_unit_if_going(self, run: RunLife) -> None:
        if run.phase in (Phase.STARTED, Phase.RUNNING):
            with contextlib.suppress(SystemdError):
                self._systemd.stop_unit(unit_name(run.id))

    # -- deadlines: the engine looks for itself -----------------------------------------
    def _deadline_passed(self, run: RunLife, phase: Phase) -> None:
        run.timer = None
        if run.phase is not phase:
            return
        log.warning("run %s: no end seen by its deadline (%s); looking at its unit", run.id, phase.value,
                    extra={"run_id": run.id})
        if phase is Phase.LAUNCHING:  # cannot happen while the start call blocks; guards an async one
            run.error = "systemd did not answer the start of the run's unit in time"
            self._end(run)
        elif not self._look(run):
            self._stop_unit_if_going(run)
            run.timer = asyncio.get_running_loop().call_later(STOP_GRACE_S, self._give_up, run, phase)

    def _look(self, run: RunLife) -> bool:
        """Ask systemd once about a run's unit; end the run if it is over.
        True if the run was ended."""
        if run.phase not in (Phase.STARTED, Phase.RUNNING) or not self._bus_ok:
            return False
        try:
            seen = self._systemd.probe(unit_name(run.id))
        except SystemdError as exc:
            log.warning("run %s: looking at its unit: %s", run.id, exc.message, extra={"run_id": run.id})
            return False
        if isinstance(seen, UnitEnd):
            run.end = run.end or seen
            self._end(run)
            return True
        return False

    def _give_up(self, run: RunLife, phase: Phase) -> None:
        run.timer = None
        if run.phase is phase and not self._look(run):
            log.error("run %s: its unit is still there after being stopped; recording the run as error",
                      run.id, extra={"run_id": run.id, "unit": unit_name(run.id)})
            run.error = "the run's unit did not end by its deadline, even when stopped (systemd overloaded?)"
            self._end(run)

    # -- the bus ----------------------------------------------------------------------------
    def _on_bus_lost(self, reason: str) -> None:
        if not self._bus_ok:
            return
        self._bus_ok = False
        self.healthy = False
        self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        attempt = 0
        while not self._closing.is_set():
            await asyncio.sleep(RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)])
            attempt += 1
            try:
                self._systemd.open(self._on_bus_lost)
            except SystemdError as exc:
                log.warning("reconnecting to systemd (attempt %d): %s", attempt, exc.message)
                continue
            log.info("reconnected to systemd; looking at %d runs in flight", len(self._runs))
            self._bus_ok = True
            for run in list(self._runs.values()):
                if run.phase in (Phase.STARTED, Phase.RUNNING):
                    self._systemd.watch(unit_name(run.id), self._watcher(run))
                    self._look(run)  # its end may have come while the bus was gone
            self._pump()
            return

    # -- persistence ---------------------------------------------------------------------------
    async def _persist(self, record: RunRecord) -> None:
        """Record a state change. A final state the store cannot take now (disk
        full, store broken) is kept in memory, served from there, and retried."""
        try:
            await self._store.update(record)
        except Exception as exc:
            message = exc.message if isinstance(exc, UnitboxError) else repr(exc)
            log.error("run %s: cannot record state %s: %s", record.id, record.state, message)
            if record.state.terminal:
                self._unsaved[record.id] = record
        else:
            self._unsaved.pop(record.id, None)

    async def _save_unsaved(self) -> None:
        for record in list(self._unsaved.values()):
            await self._persist(record)

    async def _retry_unsaved(self) -> None:
        while True:
            await asyncio.sleep(PERSIST_RETRY_S)
            await self._save_unsaved()

    def _count(self, record: RunRecord) -> None:
        self.metrics.finished[str(record.state)] += 1
        if record.duration_ms is not None:
            self.metrics.run_duration.observe(record.duration_ms / 1000)
        log.info("run %s %s (exit %s, signal %s)", record.id, record.state, record.exit_code, record.signal,
                 extra={"run_id": record.id, "unit": unit_name(record.id), "state": str(record.state)})

    # -- restart reconciliation ------------------------------------------------------------------
    async def _take_over(self, plan: Plan) -> None:
        for record, action in plan.runs:
            if action is Action.REQUEUE:
                self._runs[record.id] = RunLife(record, self.run_dir(record.id))
                self._admission.requeue(record.id)
                continue
            run = RunLife.adopted(record, self.run_dir(record.id))
            self._runs[record.id] = run
            self._admission.take_slot()
            lost = self._launcher.adopt(run, self._stored_fds)
            if lost and action is not Action.LOST:
                self._launcher.mark_lost(run, lost)
                run.notes.append("the daemon restarted without systemd's fd store: the program's output after "
                                 "that was lost (its writes failed with EPIPE)")
            if action is Action.ATTACH:
                self._systemd.watch(unit_name(run.id), self._watcher(run))
                self._arm(run)
                self._look(run)  # it may have ended between list_units and watch
            elif action is Action.FINISH:
                self._end(run)
            else:
                run.error = "the run's unit disappeared while the daemon was down, without recording an outcome"
                self._end(run)
        for name, fds in self._stored_fds.items():  # pipes of runs that are no more
            for fd in fds:
                os.close(fd)
            notify.forget_fd(name)
        self._stored_fds.clear()
        self._pump()

    def _arm(self, run: RunLife) -> None:
        if (limit := deadline_s(run.phase, run.record.limits)) is not None:
            run.timer = asyncio.get_running_loop().call_later(limit, self._deadline_passed, run, run.phase)


def _launch_problem(exc: Exception) -> str:
    if isinstance(exc, UnitboxError):
        return exc.message
    if isinstance(exc, OSError):
        return f"the run could not be set up: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    return f"the run could not be started: {exc!r}"
