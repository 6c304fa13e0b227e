"""The run engine: admission (a bounded FIFO queue in front of a cap on runs
executing at once), and each run's life as a transient unit:
queued → starting → running → a terminal state (outcome.RunState).

Durability: a run is recorded before it is acknowledged; its outcome is
written by the unit's own ExecStopPost; the read ends of its output pipes
(and a write end, so they never hang up) are parked in systemd's fd store
when the daemon runs under systemd. A daemon that crashes or restarts finds
all three again at start (recovery.py) and loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Protocol

from unitbox import notify
from unitbox.capture import StreamCapture, make_pipe
from unitbox.config import Config
from unitbox.errors import Busy, NotFound, SystemdError, Unavailable, UnitboxError
from unitbox.limits import Limits
from unitbox.metrics import Metrics
from unitbox.outcome import Outcome, RunState, classify, outcome_from_properties
from unitbox.profile import UNIT_PREFIX, build_profile, unit_name
from unitbox.recovery import Action, plan_recovery
from unitbox.retention import retention_loop
from unitbox.rundir import RunDir
from unitbox.runtimes import Runtimes
from unitbox.store import RunRecord, RunStore
from unitbox.systemd import UnitInfo, UnitSnapshot, Watcher

log = logging.getLogger(__name__)

STREAMS = ("stdout", "stderr")
PERSIST_RETRY_S = 2.0
NATIVE_PRIVATE_TMPFS_SINCE = 256  # TemporaryFileSystem=/tmp beats DynamicUser's PrivateTmp (systemd PR #32724)
SLICE_PROPERTIES: Mapping[str, Any] = {
    "Description": "unitbox runs (created by the daemon: the host has no unitbox.slice)",
    "CPUAccounting": True, "MemoryAccounting": True, "TasksAccounting": True,
}


class UnitManager(Protocol):
    """What the engine needs of systemd (the real adapter, or a fake in API tests)."""

    def open(self) -> None: ...
    def close(self) -> None: ...
    def watch(self, name: str, watcher: Watcher) -> None: ...
    def unwatch(self, name: str) -> None: ...
    def start_transient_service(self, name: str, properties: Mapping[str, Any],
                                stdio: Mapping[str, int] | None = None) -> None: ...
    def stop_unit(self, name: str) -> None: ...
    def list_units(self, patterns: list[str]) -> list[UnitInfo]: ...
    def ensure_slice(self, name: str, properties: Mapping[str, Any]) -> bool: ...
    def version(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Submission:
    code: bytes
    stdin: bytes
    args: list[str]
    limits: Limits
    runtime: str


@dataclass(slots=True)
class ActiveRun:
    record: RunRecord
    dir: RunDir
    done: asyncio.Event = field(default_factory=asyncio.Event)
    captures: dict[str, StreamCapture] = field(default_factory=dict)
    launched: bool = False
    ran: bool = False
    finishing: bool = False
    service: dict[str, Any] = field(default_factory=dict)


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


def fd_name(run_id: str, stream: str) -> str:
    return f"{run_id}.{stream}"


def _usec(value: Any) -> float | None:
    return value / 1e6 if isinstance(value, int) and value > 0 else None


class Engine:
    def __init__(self, config: Config, systemd: UnitManager, store: RunStore, runtimes: Runtimes, *,
                 metrics: Metrics | None = None, stored_fds: Mapping[str, list[int]] | None = None) -> None:
        self.config = config
        self.systemd = systemd
        self.store = store
        self.runtimes = runtimes
        self.metrics = metrics or Metrics()
        self._stored_fds = dict(stored_fds or {})  # from systemd's fd store, by name
        self._use_fd_store = notify.fd_store_available()
        self._active: dict[str, ActiveRun] = {}
        self._unsaved: dict[str, RunRecord] = {}  # finished, but the store could not take it yet
        self._queue: deque[str] = deque()
        self._executing = 0
        self._accepting = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._native_private_tmpfs = False
        source = config.source
        # A config given with --config outside /etc/unitbox may hold tokens: hide it from runs too.
        self._secret_paths = (str(source),) if source and not source.is_relative_to("/etc/unitbox") else ()
        self.metrics.gauge("unitbox_runs_in_flight", "Runs starting or running.", lambda: self._executing)
        self.metrics.gauge("unitbox_queue_depth", "Runs waiting for a free slot.", lambda: len(self._queue))

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        self.config.runs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config.state_dir.chmod(0o700)
        await self.store.open()
        self.systemd.open()
        self._native_private_tmpfs = systemd_major(self.systemd.version()) >= NATIVE_PRIVATE_TMPFS_SINCE
        if self.systemd.ensure_slice(self.config.slice, SLICE_PROPERTIES):
            log.info("created transient %s (install units/unitbox.slice for the shipped caps)", self.config.slice)
        self._accepting = True
        await self._recover()
        self._spawn(self._retry_unsaved())
        self._spawn(retention_loop(self.store, self.config.runs_dir, self.config.retention,
                                   is_live=self._active.__contains__))

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop accepting; give running runs `grace_s` to finish. Queued runs
        stay recorded and start at the next start; runs still going are
        systemd units and go on (picked up again at the next start)."""
        self._accepting = False
        if grace_s > 0 and self._executing:
            log.info("waiting up to %.0f s for %d running runs", grace_s, self._executing)
            running = [run.done.wait() for run in self._active.values() if run.launched]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*running), grace_s)
        for task in list(self._tasks):
            task.cancel()
        for run in self._active.values():
            for capture in run.captures.values():
                capture.close()
        self.systemd.close()
        await self._save_unsaved()
        await self.store.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def executing(self) -> int:
        return self._executing

    # -- submissions -------------------------------------------------------------
    async def submit(self, submission: Submission) -> RunRecord:
        if not self._accepting:
            raise Busy("the server is shutting down", retry_after_s=5)
        if len(self._queue) >= self.config.queue_size and self._executing >= self.config.max_concurrent:
            raise Busy(f"the queue is full ({self.config.queue_size} runs waiting); try again later",
                       retry_after_s=max(1, len(self._queue) // max(1, self.config.max_concurrent)))
        self.runtimes.get(submission.runtime)  # unknown → 422 before anything is written
        run_id = new_run_id()
        run_dir = RunDir(self.config.runs_dir / run_id)
        loop = asyncio.get_running_loop()
        record = RunRecord(id=run_id, state=RunState.QUEUED, created_at=time.time(),
                           limits=submission.limits, runtime=submission.runtime)
        try:
            await loop.run_in_executor(None, run_dir.create, submission.code, submission.stdin, submission.args)
            record = await self.store.insert(record)
        except BaseException as exc:
            await loop.run_in_executor(None, run_dir.remove)
            if isinstance(exc, OSError):
                raise Unavailable(f"the run cannot be recorded ({exc.strerror or exc}); nothing was started") from exc
            raise
        self._active[run_id] = ActiveRun(record, run_dir)
        self._queue.append(run_id)
        log.debug("run %s queued", run_id, extra={"run_id": run_id, "state": "queued"})
        self._pump()
        return self._active[run_id].record

    def _pump(self) -> None:
        while self._accepting and self._queue and self._executing < self.config.max_concurrent:
            run = self._active.get(self._queue.popleft())
            if run is None or run.record.state is not RunState.QUEUED:
                continue
            self._executing += 1
            run.launched = True
            self._launch(run)

    def _launch(self, run: ActiveRun) -> None:
        record = run.record
        name = unit_name(record.id)
        run.record = record.evolve(state=RunState.STARTING)
        try:  # the runtime may have been removed, the run's files lost, since it was queued
            runtime = self.runtimes.get(record.runtime)
            stdin_fd = os.open(run.dir.stdin, os.O_RDONLY | os.O_CLOEXEC)
        except (UnitboxError, OSError) as exc:
            problem = exc.message if isinstance(exc, UnitboxError) else f"the run's input is gone: {exc}"
            self._spawn(self._finish(run, error=problem))
            return
        profile = build_profile(record.id, record.limits, run_dir=PurePosixPath(run.dir.path),
                                state_dir=PurePosixPath(self.config.state_dir), slice_name=self.config.slice,
                                runtime=runtime, native_private_tmpfs=self._native_private_tmpfs,
                                secret_paths=self._secret_paths)
        cap = record.limits.output_kb * 1024
        pipes = {stream: make_pipe() for stream in STREAMS}
        try:
            for stream, (read_fd, write_fd) in pipes.items():
                if self._use_fd_store:  # both ends: a stored pipe never hangs up, so systemd keeps it
                    notify.store_fd([read_fd, write_fd], fd_name(record.id, stream))
                run.captures[stream] = StreamCapture(read_fd, run.dir.output(stream), cap)
            self.systemd.watch(name, lambda snapshot: self._on_unit_change(run, snapshot))
            self.systemd.start_transient_service(
                name, profile, {"input": stdin_fd, "output": pipes["stdout"][1], "error": pipes["stderr"][1]})
        except SystemdError as exc:
            log.error("run %s: systemd refused %s: %s", record.id, name, exc.message,
                      extra={"run_id": record.id, "unit": name})
            self.systemd.unwatch(name)
            self._spawn(self._finish(run, error=exc.message))
        else:
            log.info("run %s starting as %s", record.id, name, extra={"run_id": record.id, "unit": name})
        finally:
            os.close(stdin_fd)
            for _, write_fd in pipes.values():
                os.close(write_fd)

    def _on_unit_change(self, run: ActiveRun, snapshot: UnitSnapshot) -> None:
        run.service = snapshot.service
        if snapshot.active_state == "active" and not run.ran:
            run.ran = True
            if run.record.state in (RunState.STARTING, RunState.QUEUED):
                started = _usec(snapshot.service.get("ExecMainStartTimestamp")) or time.time()
                run.record = run.record.evolve(state=RunState.RUNNING, started_at=started)
                self._spawn(self._persist(run.record))
        if snapshot.finished and not run.finishing:
            self.systemd.unwatch(unit_name(run.record.id))
            self._spawn(self._finish(run))

    async def _finish(self, run: ActiveRun, error: str | None = None) -> None:
        """The unit is gone (or never started): collect output and outcome."""
        run.finishing = True
        for stream, capture in run.captures.items():
            capture.finish()  # every writer is dead: what is in the pipe is all there is
            if self._use_fd_store:
                notify.forget_fd(fd_name(run.record.id, stream))
        found = None if error else await asyncio.get_running_loop().run_in_executor(None, run.dir.read_outcome)
        if found is None and not error and (fallback := outcome_from_properties(run.service)) is not None:
            # No outcome file (its ExecStopPost timed out on a loaded host, say):
            # what systemd said in its signals is the next best source.
            log.warning("run %s: no outcome file; using systemd's properties", run.record.id)
            found = fallback, time.time()
        run.record = self._final_record(run, found, error)
        await self._persist(run.record)
        self._retire(run)

    def _final_record(self, run: ActiveRun, found: tuple[Outcome, float] | None, error: str | None) -> RunRecord:
        record = run.record
        outcome, written = found if found else (None, time.time())
        started = _usec(run.service.get("ExecMainStartTimestamp")) or record.started_at
        ended = _usec(run.service.get("ExecMainExitTimestamp")) or written
        if outcome is None:
            state = RunState.CANCELLED if record.cancel_requested else RunState.ERROR
            exit_code, sig = None, None
            if state is RunState.ERROR:
                error = error or "the run ended without recording an outcome"
        else:
            # Result=timeout with a main process that exited by itself before the
            # deadline means only the stop of leftover processes timed out.
            in_time = started is not None and ended - started < record.limits.timeout_s
            # `ran` only when seen active: systemd stamps a start time even when
            # it fails to set the program up (2xx statuses), which is an error.
            verdict = classify(outcome, cancelled=record.cancel_requested, ran=run.ran, exited_in_time=in_time)
            state, exit_code, sig, error = verdict.state, verdict.exit_code, verdict.signal, verdict.error
        out, err = run.captures.get("stdout"), run.captures.get("stderr")
        return record.evolve(
            state=state, exit_code=exit_code, signal=sig, error=error, started_at=started,
            finished_at=max(written, started or 0),
            duration_ms=round(max(0.0, ended - started) * 1000, 3) if started else None,
            cpu_ms=round(outcome.cpu_ns / 1e6, 3) if outcome and outcome.cpu_ns is not None else None,
            memory_peak_bytes=outcome.memory_peak if outcome else None,
            stdout_bytes=out.kept if out else 0, stderr_bytes=err.kept if err else 0,
            stdout_truncated=bool(out and out.truncated), stderr_truncated=bool(err and err.truncated),
        )

    def _retire(self, run: ActiveRun) -> None:
        record = run.record
        if run.launched:
            self._executing -= 1
        self._active.pop(record.id, None)
        self.metrics.finished[str(record.state)] += 1
        if record.duration_ms is not None:
            self.metrics.run_duration.observe(record.duration_ms / 1000)
        log.info("run %s %s (exit %s, signal %s)", record.id, record.state, record.exit_code, record.signal,
                 extra={"run_id": record.id, "unit": unit_name(record.id), "state": str(record.state)})
        run.done.set()
        self._pump()

    # -- persistence ---------------------------------------------------------------
    async def _persist(self, record: RunRecord) -> None:
        """Record a state change; a final state the store cannot take now (disk
        full) is kept in memory, served from there, and retried."""
        try:
            await self.store.update(record)
        except Unavailable as exc:
            log.error("run %s: cannot record state %s: %s", record.id, record.state, exc.message)
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

    # -- restart reconciliation ------------------------------------------------------
    async def _recover(self) -> None:
        loop = asyncio.get_running_loop()
        unfinished = await self.store.unfinished()
        units = self.systemd.list_units([f"{UNIT_PREFIX}*.service"])

        def scan() -> tuple[set[str], set[str]]:
            dirs = {p.name for p in self.config.runs_dir.iterdir() if p.is_dir()}
            return dirs, {d for d in dirs if (self.config.runs_dir / d / "result").exists()}
        own_dirs, with_outcome = await loop.run_in_executor(None, scan)
        plan = plan_recovery(unfinished, units, with_outcome, own_dirs)
        for record, action in plan.runs:
            log.info("recovering run %s: %s", record.id, action.value, extra={"run_id": record.id})
            run = ActiveRun(record, RunDir(self.config.runs_dir / record.id))
            self._active[record.id] = run
            if action is Action.REQUEUE:
                self._queue.append(record.id)
                continue
            run.launched, run.ran = True, record.state is RunState.RUNNING
            self._executing += 1
            self._adopt_captures(run)
            if action is Action.ATTACH:
                self._reattach(run)
            elif action is Action.FINISH:
                self._spawn(self._finish(run))
            else:
                self._spawn(self._finish(run, error="the run's unit disappeared while the daemon was down, "
                                                    "without recording an outcome"))
        for name in plan.orphans:
            log.warning("stopping %s: it has no run record", name, extra={"unit": name})
            with contextlib.suppress(SystemdError):
                self.systemd.stop_unit(name)
        for name, fds in self._stored_fds.items():  # pipes of runs that are no more
            for fd in fds:
                os.close(fd)
            notify.forget_fd(name)
        self._stored_fds.clear()
        self._pump()

    def _adopt_captures(self, run: ActiveRun) -> None:
        cap = run.record.limits.output_kb * 1024
        for stream in STREAMS:
            for fd in self._stored_fds.pop(fd_name(run.record.id, stream), []):
                if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
                    run.captures[stream] = StreamCapture(fd, run.dir.output(stream), cap)
                else:
                    os.close(fd)  # our copy of the write end; the store keeps its own

    def _reattach(self, run: ActiveRun) -> None:
        name = unit_name(run.record.id)
        self.systemd.watch(name, lambda snapshot: self._on_unit_change(run, snapshot))
        # It may have ended between list_units and watch: look once more.
        state = next(iter(self.systemd.list_units([name])), None)
        if state is None or state.active_state in ("inactive", "failed"):
            self.systemd.unwatch(name)
            self._spawn(self._finish(run))

    # -- queries and control -------------------------------------------------------
    async def get(self, run_id: str) -> RunRecord:
        active = self._active.get(run_id)
        if active is not None:
            return active.record
        if run_id in self._unsaved:
            return self._unsaved[run_id]
        record = await self.store.get(run_id)
        if record is None:
            raise NotFound(f"no run with id {run_id!r}")
        return record

    def run_dir(self, run_id: str) -> RunDir:
        return RunDir(self.config.runs_dir / run_id)

    async def wait(self, run_id: str, timeout_s: float) -> RunRecord:
        """The run once it has finished, or as it is when `timeout_s` runs out."""
        active = self._active.get(run_id)
        if active is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(active.done.wait(), timeout_s)
        return await self.get(run_id)

    async def cancel(self, run_id: str) -> tuple[RunRecord, bool]:
        """Cancel a run. Returns the run and whether it was still going."""
        active = self._active.get(run_id)
        if active is None:
            return await self.get(run_id), False
        record = active.record.evolve(cancel_requested=True)
        active.record = record
        if record.state is RunState.QUEUED:
            with contextlib.suppress(ValueError):
                self._queue.remove(run_id)
            active.record = record.evolve(state=RunState.CANCELLED, finished_at=time.time())
            await self._persist(active.record)
            self._retire(active)
            return active.record, True
        await self._persist(record)
        try:
            self.systemd.stop_unit(unit_name(run_id))
        except SystemdError as exc:
            log.warning("run %s: stopping its unit: %s", run_id, exc.message)
        return active.record, True
