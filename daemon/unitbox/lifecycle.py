"""A run's lifecycle, drawn once (pure: no I/O, no clock).

    QUEUED ──► LAUNCHING ──► STARTED ──► RUNNING ──► ENDING ──► DONE
       │           │            └───────────────────►─┘
       └───────────┴─(cancelled while queued / launch failed)───► DONE / ENDING

One phase per run and every change through `RunLife.advance`, which refuses
any transition not in the table. A run holds one of the `max_concurrent`
slots exactly while it is LAUNCHING, STARTED, RUNNING or ENDING, so a slot is
taken when it leaves QUEUED and given back when it reaches DONE — nowhere
else. Each phase that waits on systemd has a deadline: signals are the normal
way forward, the deadline is the guarantee (the engine then looks once and
settles the run)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import Enum

from unitbox.capture import StreamCapture
from unitbox.leftovers import Summary
from unitbox.limits import Limits
from unitbox.outcome import Outcome, RunState, classify
from unitbox.profile import START_BOUND_S, STOP_BOUND_S, LintMode
from unitbox.rundir import RunDir
from unitbox.store import RunRecord
from unitbox.systemd import UnitEnd

STREAMS = ("stdout", "stderr")

# The engine's deadlines add up the unit's own bounds (profile.py: set-up to
# exec; SIGKILL of leftovers plus the outcome recorder) and some slack.
LAUNCH_BOUND_S = 30.0  # StartTransientUnit's reply
SLACK_S = 15.0
STOP_GRACE_S = 10.0  # a unit still there at its deadline is stopped, then given this long


class Phase(Enum):
    QUEUED = "queued"  # accepted, waiting for a slot
    LAUNCHING = "launching"  # holds a slot; its pipes are made and its unit asked for
    STARTED = "started"  # systemd took the unit; its program not yet seen running
    RUNNING = "running"  # the unit is active: the program runs
    ENDING = "ending"  # the unit is over: output and outcome are being collected
    DONE = "done"  # final record made; slot given back


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.QUEUED: frozenset({Phase.LAUNCHING, Phase.DONE}),
    Phase.LAUNCHING: frozenset({Phase.STARTED, Phase.ENDING}),
    Phase.STARTED: frozenset({Phase.RUNNING, Phase.ENDING}),
    Phase.RUNNING: frozenset({Phase.ENDING}),
    Phase.ENDING: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
}
SLOT_PHASES = frozenset({Phase.LAUNCHING, Phase.STARTED, Phase.RUNNING, Phase.ENDING})
_PUBLIC = {Phase.QUEUED: RunState.QUEUED, Phase.LAUNCHING: RunState.STARTING,
           Phase.STARTED: RunState.STARTING, Phase.RUNNING: RunState.RUNNING}


class TransitionError(RuntimeError):
    """A bug: the engine asked for a move the lifecycle does not have."""


def deadline_s(phase: Phase, limits: Limits) -> float | None:
    """How long a run may stay in `phase` before the engine looks for itself."""
    match phase:
        case Phase.LAUNCHING:
            return LAUNCH_BOUND_S
        case Phase.STARTED:
            return START_BOUND_S + limits.timeout_s + STOP_BOUND_S + SLACK_S
        case Phase.RUNNING:
            return limits.timeout_s + STOP_BOUND_S + SLACK_S
        case _:
            return None  # QUEUED waits for a slot; ENDING and DONE wait on nothing outside


@dataclass(slots=True, eq=False)
class RunLife:
    """A run the engine is responsible for, from admission to its final record."""

    record: RunRecord
    dir: RunDir
    phase: Phase = Phase.QUEUED
    done: asyncio.Event = field(default_factory=asyncio.Event)
    captures: dict[str, StreamCapture] = field(default_factory=dict)
    end: UnitEnd | None = None  # what systemd said when the unit was over
    error: str | None = None  # why the service could not run it (state error)
    cancel_at: float | None = None  # wall clock of the cancel request
    notes: list[str] = field(default_factory=list)  # facts for the record's `error` field
    timer: asyncio.TimerHandle | None = None
    stdio: list[int] = field(default_factory=list)  # our copies of the fds for its unit, until systemd has them
    start_unanswered: bool = False  # the start request went unanswered: whether the unit exists is unknown
    launches: int = 0  # start requests made (one, unless an unanswered one had to be repeated)
    exited: tuple[int, float] | None = None  # (exit code, wall clock): a warm unit's program ended by itself
    answerable: asyncio.Event = field(default_factory=asyncio.Event)  # … and a waiting client can have it

    @classmethod
    def adopted(cls, record: RunRecord, run_dir: RunDir) -> RunLife:
        """A run found started at a restart: it enters the lifecycle where it was."""
        run = cls(record, run_dir, Phase.RUNNING if record.state is RunState.RUNNING else Phase.STARTED)
        if record.cancel_requested:  # asked before the restart (when exactly is not stored)
            run.cancel_at = record.created_at
        return run

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def holds_slot(self) -> bool:
        return self.phase in SLOT_PHASES

    def advance(self, to: Phase) -> None:
        if to not in TRANSITIONS[self.phase]:
            raise TransitionError(f"run {self.id}: {self.phase.value} → {to.value} is not a transition")
        self.phase = to
        if (public := _PUBLIC.get(to)) is not None and public is not self.record.state:
            self.record = self.record.evolve(state=public)

    def live_view(self, *, early: bool = True) -> RunRecord:
        """The record as a client should see it now: output sizes from the
        captures; once its program has exited (`exited`), as it ended, unless
        not `early` (a follower's `end` carries the complete record)."""
        record = self.record
        if early and self.exited is not None and not record.state.terminal:  # else it is the final record
            record = exited_early(record, *self.exited)
        out, err = self.captures.get("stdout"), self.captures.get("stderr")
        if out is None and err is None:
            return record
        return record.evolve(
            stdout_bytes=out.kept if out else record.stdout_bytes,
            stderr_bytes=err.kept if err else record.stderr_bytes,
            stdout_truncated=bool(out and out.truncated) or record.stdout_truncated,
            stderr_truncated=bool(err and err.truncated) or record.stderr_truncated)


def exited_early(record: RunRecord, code: int, at: float) -> RunRecord:
    """A run whose program exited by itself with `code` (reported before its
    unit's end: broker/warm.py), as its final record will be but for the
    figures only the unit's end gives: CPU and memory are null, the duration
    is the daemon's. The verdict is `classify`'s, as `conclude` will make it."""
    outcome = Outcome(service_result="success" if code == 0 else "exit-code", exit_code="exited",
                      exit_status=str(code))
    verdict = classify(outcome, cancelled=False, ran=True, exited_in_time=True)
    started = record.started_at
    return record.evolve(state=verdict.state, exit_code=verdict.exit_code, signal=verdict.signal,
                         error=verdict.error, finished_at=at,
                         duration_ms=round(max(0.0, at - started) * 1000, 3) if started else None)


@dataclass(frozen=True, slots=True)
class StoredStreams:
    """Output as it lies in the run directory (files and truncation markers)."""

    stdout_bytes: int = 0
    stderr_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False


def conclude(run: RunLife, found: tuple[Outcome, float] | None, streams: StoredStreams,
             now: float | None = None) -> RunRecord:
    """The final record of a run whose unit is over (or never started).
    `found`: the outcome ExecStopPost recorded and when; without it, what
    systemd's signals said (`run.end`) is the next best source."""
    record, end = run.record, run.end
    now = time.time() if now is None else now
    outcome, written = found if found else (None, now)
    if outcome is None and end is not None and end.exit_code:
        outcome = Outcome(service_result=end.result, exit_code=end.exit_code, exit_status=end.exit_status,
                          started_at=end.started_at, exited_at=end.exited_at)
    # The recorder's own clock first (true even if no signal was heard), then systemd's, then ours.
    started = (outcome.started_at if outcome else None) or (end.started_at if end else None) or record.started_at
    exited = (outcome.exited_at if outcome else None) or (end.exited_at if end else None)
    ended = exited or written
    # A cancel counts only if the program had not already ended by itself.
    cancelled = run.cancel_at is not None and not (exited and exited < run.cancel_at)
    error = run.error
    if error is not None:
        state, exit_code, sig = RunState.ERROR, None, None
    elif outcome is None:
        state = RunState.CANCELLED if cancelled else RunState.ERROR
        exit_code, sig = None, None
        if state is RunState.ERROR:
            error = "the run ended without recording an outcome"
    else:
        # Result=timeout with a main process that exited by itself before the
        # deadline means only the stop of leftover processes timed out.
        in_time = started is not None and ended - started < record.limits.timeout_s
        # The record's last public state says whether the program was seen running.
        verdict = classify(outcome, cancelled=cancelled, ran=record.state is RunState.RUNNING,
                           exited_in_time=in_time)
        state, exit_code, sig, error = verdict.state, verdict.exit_code, verdict.signal, verdict.error
    if run.notes:
        error = "; ".join([*([error] if error else []), *run.notes])
    return record.evolve(
        state=state, exit_code=exit_code, signal=sig, error=error, started_at=started,
        finished_at=max(written, started or 0),
        duration_ms=round(max(0.0, ended - started) * 1000, 3) if started else None,
        cpu_ms=round(outcome.cpu_ns / 1e6, 3) if outcome and outcome.cpu_ns is not None else None,
        memory_peak_bytes=outcome.memory_peak if outcome else None,
        stdout_bytes=streams.stdout_bytes, stderr_bytes=streams.stderr_bytes,
        stdout_truncated=streams.stdout_truncated, stderr_truncated=streams.stderr_truncated,
        cancel_requested=record.cancel_requested or run.cancel_at is not None,
    )



def with_leftovers(record: RunRecord, summary: Summary) -> RunRecord:
    """The final record, with what the run left (leftovers.py). A run called
    through an entrypoint that ended without a usable value has failed; a
    lint-only run fails without a usable report."""
    state, error = record.state, record.error
    if state is RunState.SUCCEEDED and summary.errors:
        unusable_value = record.entrypoint is not None and summary.result_bytes is None
        unusable_report = record.lint == LintMode.ONLY and summary.lint_findings is None
        if unusable_value or unusable_report:
            state = RunState.FAILED
    if summary.errors:
        error = "; ".join([*([error] if error else []), *summary.errors])
    return record.evolve(state=state, error=error, result_bytes=summary.result_bytes,
                         output_files=summary.output_files, lint_findings=summary.lint_findings)
