"""The run engine: admission (a bounded FIFO queue in front of a cap on runs
executing at once), and each run's life as a transient unit:
queued → starting → running → a terminal state (outcome.RunState)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Protocol

from unitbox.capture import StreamCapture, make_pipe
from unitbox.config import Config
from unitbox.errors import Busy, NotFound, SystemdError
from unitbox.limits import Limits
from unitbox.metrics import Metrics
from unitbox.outcome import Outcome, RunState, classify
from unitbox.profile import build_profile, unit_name
from unitbox.rundir import RunDir
from unitbox.runtimes import Runtimes
from unitbox.store import RunRecord, RunStore
from unitbox.systemd import UnitInfo, UnitSnapshot, Watcher

log = logging.getLogger(__name__)

PIPE_DRAIN_GRACE_S = 5.0  # after the unit is gone, how long output may still trickle in
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


def new_run_id() -> str:
    return secrets.token_hex(8)


def _usec(value: Any) -> float | None:
    return value / 1e6 if isinstance(value, int) and value > 0 else None


class Engine:
    def __init__(self, config: Config, systemd: UnitManager, store: RunStore, runtimes: Runtimes,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.systemd = systemd
        self.store = store
        self.runtimes = runtimes
        self.metrics = metrics or Metrics()
        self._active: dict[str, ActiveRun] = {}
        self._queue: deque[str] = deque()
        self._executing = 0
        self._accepting = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.metrics.gauge("unitbox_runs_in_flight", "Runs starting or running.", lambda: self._executing)
        self.metrics.gauge("unitbox_queue_depth", "Runs waiting for a free slot.", lambda: len(self._queue))

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        self.config.runs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config.state_dir.chmod(0o700)
        await self.store.open()
        self.systemd.open()
        if self.systemd.ensure_slice(self.config.slice, SLICE_PROPERTIES):
            log.info("created transient %s (install units/unitbox.slice for the shipped caps)", self.config.slice)
        self._accepting = True

    async def stop(self) -> None:
        """Stop accepting; the runs themselves are systemd units and go on."""
        self._accepting = False
        for task in list(self._tasks):
            task.cancel()
        for run in self._active.values():
            for capture in run.captures.values():
                capture.close()
        self.systemd.close()
        await self.store.close()

    def _spawn(self, coro: Any) -> None:
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
        except BaseException:
            await loop.run_in_executor(None, run_dir.remove)
            raise
        self._active[run_id] = ActiveRun(record, run_dir)
        self._queue.append(run_id)
        log.info("run %s queued", run_id, extra={"run_id": run_id, "state": "queued"})
        self._pump()
        return self._active[run_id].record

    def _pump(self) -> None:
        while self._queue and self._executing < self.config.max_concurrent:
            run = self._active.get(self._queue.popleft())
            if run is None or run.record.state is not RunState.QUEUED:
                continue
            self._executing += 1
            self._launch(run)

    def _launch(self, run: ActiveRun) -> None:
        record = run.record
        name = unit_name(record.id)
        run.record = record.evolve(state=RunState.STARTING)
        run.launched = True
        runtime = self.runtimes.get(record.runtime)
        profile = build_profile(record.id, record.limits, run_dir=PurePosixPath(run.dir.path),
                                state_dir=PurePosixPath(self.config.state_dir), slice_name=self.config.slice,
                                runtime=runtime)
        cap = record.limits.output_kb * 1024
        stdin_fd = os.open(run.dir.stdin, os.O_RDONLY | os.O_CLOEXEC)
        pipes = {stream: make_pipe() for stream in ("stdout", "stderr")}
        try:
            for stream, (read_fd, _) in pipes.items():
                run.captures[stream] = StreamCapture(read_fd, run.dir.output(stream), cap)
            self.systemd.watch(name, lambda snapshot: self._on_unit_change(run, snapshot))
            self.systemd.start_transient_service(
                name, profile, {"input": stdin_fd, "output": pipes["stdout"][1], "error": pipes["stderr"][1]})
        except SystemdError as exc:
            log.error("run %s: systemd refused %s: %s", record.id, name, exc.message,
                      extra={"run_id": record.id, "unit": name})
            self.systemd.unwatch(name)
            for capture in run.captures.values():
                capture.close()
            self._spawn(self._finish(run, None, error=exc.message))
        finally:
            os.close(stdin_fd)
            for _, write_fd in pipes.values():
                os.close(write_fd)
        log.info("run %s starting as %s", record.id, name, extra={"run_id": record.id, "unit": name})

    def _on_unit_change(self, run: ActiveRun, snapshot: UnitSnapshot) -> None:
        run.service = snapshot.service
        if snapshot.active_state == "active" and not run.ran:
            run.ran = True
            if run.record.state is RunState.STARTING:
                started = _usec(snapshot.service.get("ExecMainStartTimestamp")) or time.time()
                run.record = run.record.evolve(state=RunState.RUNNING, started_at=started)
                self._spawn(self._persist(run.record))
        if snapshot.finished and not run.finishing:
            run.finishing = True
            self.systemd.unwatch(unit_name(run.record.id))
            self._spawn(self._finish(run, snapshot))

    async def _persist(self, record: RunRecord) -> None:
        try:
            await self.store.update(record)
        except Exception:
            log.exception("run %s: cannot record state %s", record.id, record.state)

    async def _finish(self, run: ActiveRun, snapshot: UnitSnapshot | None, error: str | None = None) -> None:
        run.finishing = True
        captures = [c.done for c in run.captures.values()]
        if captures:
            await asyncio.wait(captures, timeout=PIPE_DRAIN_GRACE_S)
            for capture in run.captures.values():
                if not capture.done.done():
                    log.warning("run %s: output still open %.0f s after the unit ended; closing it",
                                run.record.id, PIPE_DRAIN_GRACE_S)
                    capture.close()
        outcome = None if error else await asyncio.get_running_loop().run_in_executor(None, run.dir.read_outcome)
        run.record = self._final_record(run, outcome, error)
        await self._persist(run.record)
        self._retire(run)

    def _final_record(self, run: ActiveRun, outcome: Outcome | None, error: str | None) -> RunRecord:
        record = run.record
        now = time.time()
        started = record.started_at or (_usec(run.service.get("ExecMainStartTimestamp")) if run.ran else None)
        ended = _usec(run.service.get("ExecMainExitTimestamp")) or now
        if outcome is None and record.cancel_requested:
            state, exit_code, sig = RunState.CANCELLED, None, None
        elif outcome is None:
            state, exit_code, sig = RunState.ERROR, None, None
            error = error or "the run ended without recording an outcome"
        else:
            verdict = classify(outcome, cancelled=record.cancel_requested, ran=run.ran)
            state, exit_code, sig, error = verdict.state, verdict.exit_code, verdict.signal, verdict.error
        out, err = run.captures.get("stdout"), run.captures.get("stderr")
        return record.evolve(
            state=state, exit_code=exit_code, signal=sig, error=error, started_at=started, finished_at=now,
            duration_ms=round((ended - started) * 1000, 3) if started else None,
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

    # -- queries and control -------------------------------------------------------
    async def get(self, run_id: str) -> RunRecord:
        active = self._active.get(run_id)
        if active is not None:
            return active.record
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
