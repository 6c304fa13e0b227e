"""The runner drives every run's lifecycle (lifecycle.py) from admission to
its final record: `pump` gives queued runs a slot and `_launch` starts their
unit (launcher.py, through the broker); the unit's typed events move each
run on; `_finish` collects output and outcome and makes the final record.
Every change of phase goes through `advance`, which also keeps each waiting
phase's deadline: if the events never come, the runner looks once and
settles the run. When the broker dies (or loses the bus) a new one is
started (broker/client.py) and every run in flight is looked at again; a
start that went unanswered is settled by a look, never blindly repeated.
The engine (engine.py) is the service in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from unitbox import notify
from unitbox.admission import Admission
from unitbox.broker.client import Broker, ProgramExited, RunEvent, UnitExists
from unitbox.errors import SystemdError, UnitboxError
from unitbox.launcher import Launcher
from unitbox.lifecycle import STOP_GRACE_S, Phase, RunLife, conclude, deadline_s
from unitbox.metrics import Metrics
from unitbox.oomwatch import OomWatch
from unitbox.outcome import RunState
from unitbox.profile import LintMode, unit_name
from unitbox.records import Records
from unitbox.recovery import Action, Plan
from unitbox.rundir import RunDir
from unitbox.store import RunRecord, RunStore
from unitbox.systemd import NoAnswer, UnitActive, UnitEnd, UnitInfo

log = logging.getLogger(__name__)

CANCEL_GRACE_S = 2.0  # SIGTERM first; SIGKILL (the unit's stop) if it is still going after this
MAX_LAUNCHES = 3  # start requests per run when they go unanswered and no unit appears


class Runner:
    def __init__(self, broker: Broker, store: RunStore, launcher: Launcher, admission: Admission, *,
                 metrics: Metrics, run_dir: Callable[[str], RunDir],
                 stored_fds: Mapping[str, list[int]] | None = None,
                 on_advance: Callable[[RunLife], None] | None = None) -> None:
        self._broker = broker
        self.records = Records(store)  # every state change goes through it
        self._launcher = launcher
        self._admission = admission
        self._metrics = metrics
        self._run_dir = run_dir
        self._stored_fds = dict(stored_fds or {})  # from systemd's fd store, by name
        self._on_advance = on_advance  # told of every change of phase (the followers of runs: follow.py)
        self.runs: dict[str, RunLife] = {}
        self.accepting = False  # launch queued runs (not while stopping)
        self.broker_ok = False  # the broker is up: runs can be launched and looked at
        self.closing = asyncio.Event()  # set at shutdown: held `wait` requests answer at once
        self._tasks: set[asyncio.Task[Any]] = set()
        self._oom = OomWatch(launcher.config.slice, self._stop_after_oom_kill)  # cgroup v1 ignores OOMPolicy=

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self, grace_s: float) -> None:
        """Give running runs `grace_s` to finish, then let go of everything
        (the fd store keeps the pipes of runs still going for the next start)."""
        going = [run.done for run in self.runs.values() if run.holds_slot]
        if grace_s > 0 and going:
            log.info("waiting up to %.1f s for %d running runs", grace_s, len(going))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(done.wait() for done in going)), grace_s)
        for task in list(self._tasks):
            task.cancel()
        self._oom.close()
        for run in self.runs.values():
            if run.timer is not None:
                run.timer.cancel()
            for capture in run.captures.values():
                capture.close()

    async def cancel(self, run: RunLife) -> tuple[RunRecord, bool]:
        """Cancel a run in flight: (the run, whether it was still going)."""
        if run.phase is Phase.ENDING or run.exited is not None:  # over already: its true end, not a cancel
            await run.done.wait()
            return run.record, False
        now = time.time()
        if run.phase is Phase.QUEUED:
            self._admission.withdraw(run.id)
            run.cancel_at = now
            run.record = run.record.evolve(state=RunState.CANCELLED, finished_at=now, cancel_requested=True)
            await self.records.persist(run.record)
            if run.phase is Phase.QUEUED:
                self.advance(run, Phase.DONE)
            return run.record, True
        if run.cancel_at is None:
            run.cancel_at = now
            run.record = run.record.evolve(cancel_requested=True)
            await self.records.persist(run.record)  # stored before the signal: a crash in between still ends cancelled
            self.request_stop(run)
        return run.live_view(), True

    # -- the lifecycle ----------------------------------------------------------------
    def advance(self, run: RunLife, to: Phase) -> None:
        held = run.holds_slot
        run.advance(to)
        if run.timer is not None:
            run.timer.cancel()
            run.timer = None
        self._arm(run)
        if self._on_advance is not None:
            self._on_advance(run)
        if to in (Phase.STARTED, Phase.RUNNING):
            self._oom.watch(run.id, run.record.unit)
        elif to is Phase.ENDING:
            self._oom.forget(run.id)
        if to is Phase.DONE:
            self.runs.pop(run.id, None)
            if held:
                self._admission.release_slot()
            self._count(run.record)
            run.done.set()
            self.pump()

    def pump(self) -> None:
        while self.accepting and self.broker_ok:
            run_id = self._admission.next_to_launch()  # takes a slot
            if run_id is None:
                return
            run = self.runs.get(run_id)
            if run is None or run.phase is not Phase.QUEUED:
                self._admission.release_slot()
                continue
            self.advance(run, Phase.LAUNCHING)
            self.spawn(self._launch(run))

    async def _launch(self, run: RunLife) -> None:
        name = unit_name(run.id)
        try:
            await self._launcher.launch(run, self._watcher(run))
        except UnitExists:
            self._launcher.release(run)  # an earlier, unanswered start went through after all
        except NoAnswer as exc:
            log.warning("run %s: its start went unanswered (%s); looking for its unit", run.id, exc.message,
                        extra={"run_id": run.id, "unit": name})
            run.start_unanswered = True
            if self.broker_ok:  # else the broker's return settles it
                self.spawn(self._settle_launch(run))
            return
        except Exception as exc:  # anything at all: the run ends as error, its slot is freed
            if run.phase is Phase.LAUNCHING:
                run.error = _launch_problem(exc)
                log.error("run %s could not be started: %s", run.id, run.error,
                          extra={"run_id": run.id, "unit": name})
                self._end(run)
            return
        if run.record.unit is not None and run.phase in (Phase.STARTED, Phase.RUNNING):
            # Its events came before the start's answer was taken: the warm unit is news to both.
            self._oom.watch(run.id, run.record.unit)
            if run.phase is Phase.RUNNING:
                self.spawn(self.records.persist(run.record))
        self._started(run)

    def _started(self, run: RunLife, info: UnitInfo | None = None) -> None:
        """systemd has the run's unit (it answered the start, sent an event, or was seen)."""
        if run.phase is not Phase.LAUNCHING:
            return  # an event or the deadline moved it on already
        log.debug("run %s starting as %s", run.id, run.record.unit or unit_name(run.id), extra={"run_id": run.id})
        self.advance(run, Phase.STARTED)
        if info is not None and info.active_state == "active":
            self._running(run, None)
        if run.cancel_at is not None:
            self.request_stop(run)

    async def _settle_launch(self, run: RunLife) -> None:
        """A start went unanswered: find out whether its unit exists, and
        launch again (same pipes) only if there is no unit and no outcome."""
        if run.phase is not Phase.LAUNCHING or not run.start_unanswered:
            return
        try:
            seen = await self._broker.probe(run.id)
        except SystemdError as exc:
            log.warning("run %s: looking for its unit: %s", run.id, exc.message, extra={"run_id": run.id})
            return  # the broker's return (or the deadline) tries again
        if run.phase is not Phase.LAUNCHING or not run.start_unanswered:
            return
        if isinstance(seen, UnitInfo):
            self._launcher.release(run)
            self._started(run, seen)
        elif run.dir.result.exists():  # it ran, and is over already (a stat: no thread hop)
            run.end = seen
            self._end(run)
        elif run.cancel_at is not None:  # never started, and no longer wanted: it ends cancelled
            self._end(run)
        elif run.launches >= MAX_LAUNCHES:
            run.error = f"systemd did not answer {run.launches} starts of the run's unit"
            self._end(run)
        else:
            run.start_unanswered = False
            self.spawn(self._launch(run))

    def _watcher(self, run: RunLife) -> Callable[[RunEvent], None]:
        return functools.partial(self._on_unit_event, run)

    def _on_unit_event(self, run: RunLife, event: RunEvent) -> None:
        if isinstance(event, ProgramExited):
            self._exited(run, event.code)
            return
        if run.phase is Phase.LAUNCHING:  # it came before the start's answer was taken: the unit exists
            self._launcher.release(run)
            self._started(run)
        if isinstance(event, UnitActive):
            self._running(run, event.started_at)
            return
        run.end = run.end or event
        if run.phase in (Phase.STARTED, Phase.RUNNING):
            self._end(run)

    def _running(self, run: RunLife, started_at: float | None) -> None:
        if run.phase is Phase.STARTED:
            self.advance(run, Phase.RUNNING)
            run.record = run.record.evolve(started_at=started_at or time.time())
            self.spawn(self.records.persist(run.record))

    def _exited(self, run: RunLife, code: int) -> None:
        """A warm unit's program ended by itself and no process of it is left
        (broker/warm.py). A waiting client may have the run now if its final
        record can only repeat that: no cancel asked, no entrypoint value or
        lint report to collect; its output is what its pipes hold now. The
        unit's end completes the record."""
        if (run.phase is not Phase.RUNNING or run.cancel_at is not None or run.record.entrypoint is not None
                or run.record.lint != LintMode.OFF or not run.captures):
            return
        if all([capture.drained() for capture in run.captures.values()]):
            run.exited = (code, time.time())
            run.answerable.set()

    def _end(self, run: RunLife) -> None:
        self._broker.unwatch(run.id)
        self.advance(run, Phase.ENDING)
        self.spawn(self._finish(run))

    async def _finish(self, run: RunLife) -> None:
        """The unit is over (or never started): output, outcome, final record."""
        try:
            self._launcher.drain(run)
            found, streams = self._launcher.collect(run)  # ≈46 µs of stat/read: less than a thread hop (≈80)
            run.record = await self._launcher.take_leftovers(run, conclude(run, found, streams))
        except Exception as exc:
            log.exception("run %s: collecting its outcome failed", run.id)
            run.record = run.record.evolve(state=RunState.ERROR, error=f"collecting the outcome failed: {exc}",
                                           finished_at=time.time())
        await self.records.persist(run.record)
        self.advance(run, Phase.DONE)

    def request_stop(self, run: RunLife) -> None:
        """Cancel: SIGTERM to the program, its unit stopped (SIGKILL) after a grace."""
        if run.phase is Phase.LAUNCHING:
            return  # `_started` stops it once systemd has taken it
        self.spawn(self._terminate(run) if run.phase is Phase.RUNNING else self._stop_unit_if_going(run))

    async def _terminate(self, run: RunLife) -> None:
        try:
            await self._broker.kill_run(run.id, signal.SIGTERM)
        except SystemdError as exc:
            log.warning("run %s: signalling its unit: %s", run.id, exc.message, extra={"run_id": run.id})
        await asyncio.sleep(CANCEL_GRACE_S)
        await self._stop_unit_if_going(run)

    def _stop_after_oom_kill(self, run_id: str) -> None:
        if (run := self.runs.get(run_id)) is not None:
            self.spawn(self._stop_unit_if_going(run))

    async def _stop_unit_if_going(self, run: RunLife) -> None:
        if run.phase in (Phase.STARTED, Phase.RUNNING):
            try:
                await self._broker.stop_run(run.id)
            except SystemdError as exc:
                log.warning("run %s: stopping its unit: %s", run.id, exc.message, extra={"run_id": run.id})

    # -- deadlines: the engine looks for itself -----------------------------------------
    def _deadline_passed(self, run: RunLife, phase: Phase) -> None:
        run.timer = None
        if run.phase is phase:
            self.spawn(self._overdue(run, phase))

    async def _overdue(self, run: RunLife, phase: Phase) -> None:
        log.warning("run %s: no end seen by its deadline (%s); looking at its unit", run.id, phase.value,
                    extra={"run_id": run.id})
        if phase is Phase.LAUNCHING:  # no answer to its start at all, not even "unanswered"
            run.error = "systemd did not answer the start of the run's unit in time"
            self._end(run)
            with contextlib.suppress(SystemdError):  # in case that start still goes through
                await self._broker.stop_run(run.id)
        elif not await self._look(run) and run.phase is phase:
            await self._stop_unit_if_going(run)
            run.timer = asyncio.get_running_loop().call_later(STOP_GRACE_S, self._give_up, run, phase)

    async def _look(self, run: RunLife) -> bool:
        """Look once at a run's unit; end the run if it is over: its outcome
        file is there (ExecStopPost runs after every process of the run is
        dead), or systemd says so. True if the run was ended."""
        if run.phase not in (Phase.STARTED, Phase.RUNNING):
            return False
        if run.dir.result.exists():
            self._end(run)
            return True
        if not self.broker_ok:
            return False
        try:
            seen = await self._broker.probe(run.id)
        except SystemdError as exc:
            log.warning("run %s: looking at its unit: %s", run.id, exc.message, extra={"run_id": run.id})
            return False
        if run.phase not in (Phase.STARTED, Phase.RUNNING):
            return True  # its end came while we looked
        if isinstance(seen, UnitEnd):
            run.end = run.end or seen
            self._end(run)
            return True
        if seen.active_state == "active":
            self._running(run, None)
        return False

    def _give_up(self, run: RunLife, phase: Phase) -> None:
        run.timer = None
        if run.phase is phase:
            self.spawn(self._last_look(run, phase))

    async def _last_look(self, run: RunLife, phase: Phase) -> None:
        if not await self._look(run) and run.phase is phase:
            log.error("run %s: its unit is still there after being stopped; recording the run as error",
                      run.id, extra={"run_id": run.id, "unit": run.record.unit or unit_name(run.id)})
            run.error = "the run's unit did not end by its deadline, even when stopped (systemd overloaded?)"
            self._end(run)

    # -- the broker ------------------------------------------------------------------------
    def on_broker_down(self, reason: str) -> None:
        self.broker_ok = False

    def on_broker_up(self) -> None:
        """A new broker: every run in flight is looked at (its end may have
        come meanwhile), every unanswered start settled, the queue pumped."""
        self.broker_ok = True
        log.info("the broker is back; looking at %d runs in flight", len(self.runs))
        for run in list(self.runs.values()):
            if run.phase is Phase.LAUNCHING and run.start_unanswered:
                self.spawn(self._settle_launch(run))
            elif run.phase in (Phase.STARTED, Phase.RUNNING):
                self.spawn(self._look(run))
        self.pump()

    def _count(self, record: RunRecord) -> None:
        self._metrics.finished.labels(state=record.state).inc()
        if record.duration_ms is not None:
            self._metrics.run_duration.observe(record.duration_ms / 1000)
        log.info("run %s %s (exit %s, signal %s)", record.id, record.state, record.exit_code, record.signal,
                 extra={"run_id": record.id, "unit": record.unit or unit_name(record.id), "state": str(record.state)})

    # -- restart reconciliation ------------------------------------------------------------------
    async def take_over(self, plan: Plan) -> None:
        for record, action in plan.runs:
            if action is Action.REQUEUE:
                self.runs[record.id] = RunLife(record, self._run_dir(record.id))
                self._admission.requeue(record.id)
                continue
            run = RunLife.adopted(record, self._run_dir(record.id))
            self.runs[record.id] = run
            self._admission.take_slot()
            lost = self._launcher.adopt(run, self._stored_fds)
            if lost and action is not Action.LOST:
                self._launcher.mark_lost(run, lost)
                run.notes.append("the daemon restarted without systemd's fd store: the program's output after "
                                 "that was lost (its writes failed with EPIPE)")
            if action is Action.ATTACH:
                self._broker.watch(run.id, self._watcher(run))
                self._oom.watch(run.id, record.unit)
                self._arm(run)
                self.spawn(self._look(run))  # it may have ended between list_units and watch
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
        self.pump()

    def _arm(self, run: RunLife) -> None:
        if (limit := deadline_s(run.phase, run.record.limits)) is not None:
            run.timer = asyncio.get_running_loop().call_later(limit, self._deadline_passed, run, run.phase)


def _launch_problem(exc: Exception) -> str:
    if isinstance(exc, UnitboxError):
        return exc.message
    if isinstance(exc, OSError):
        return f"the run could not be set up: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    return f"the run could not be started: {exc!r}"
