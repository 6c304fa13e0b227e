"""Restart reconciliation, decided purely: given the runs the store says are
unfinished, the `unitbox-run-*` units systemd has, and which runs have an
outcome file, what to do with each. The engine carries the plan out."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from unitbox.outcome import RunState
from unitbox.profile import run_id_of
from unitbox.store import RunRecord
from unitbox.systemd import UnitInfo


class Action(Enum):
    ATTACH = "attach"  # the unit is still there: watch it again
    FINISH = "finish"  # it ended while we were down: take its outcome from disk
    REQUEUE = "requeue"  # accepted but never started: start it now
    LOST = "lost"  # started, but neither unit nor outcome remain


@dataclass(frozen=True, slots=True)
class Plan:
    runs: list[tuple[RunRecord, Action]]
    orphans: list[str]  # our units (their run directory is ours) with no unfinished record: stopped


GONE = ("inactive", "failed")


def plan_recovery(unfinished: Iterable[RunRecord], units: Iterable[UnitInfo],
                  with_outcome: Collection[str], own_dirs: Collection[str]) -> Plan:
    """`with_outcome`: run ids whose ExecStopPost result file exists;
    `own_dirs`: run ids with a directory in our state dir. A live unit counts
    as ours only through its directory, so two daemons sharing one systemd
    (different state dirs) never stop each other's runs."""
    live: Mapping[str, UnitInfo] = {
        run_id: unit for unit in units
        if (run_id := run_id_of(unit.name)) is not None and unit.active_state not in GONE
    }
    planned: list[tuple[RunRecord, Action]] = []
    for record in unfinished:
        if record.id in live:
            action = Action.ATTACH
        elif record.id in with_outcome:
            action = Action.FINISH
        elif record.state is RunState.QUEUED:
            action = Action.REQUEUE
        else:
            action = Action.LOST
        planned.append((record, action))
    known = {record.id for record, _ in planned}
    orphans = sorted(unit.name for run_id, unit in live.items() if run_id not in known and run_id in own_dirs)
    return Plan(planned, orphans)
