"""Restart reconciliation. `plan_recovery` decides purely: given the runs the
store says are unfinished, the `unitbox-run-*` units systemd has, and which
runs have an outcome file, what to do with each. `recover` gathers those
facts, stops orphaned units and hands the engine the runs to take over."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from unitbox.broker.client import Broker
from unitbox.config import Config
from unitbox.errors import SystemdError
from unitbox.outcome import RunState
from unitbox.profile import run_id_of
from unitbox.rundir import RunDir
from unitbox.store import RunRecord, RunStore
from unitbox.systemd import UnitInfo

log = logging.getLogger(__name__)


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


async def recover(store: RunStore, broker: Broker, config: Config) -> Plan:
    """Gather the facts, plan, stop our orphaned units; the engine takes over
    `plan.runs` (attaching, finishing or requeueing each)."""
    unfinished = await store.unfinished()
    units = await broker.list_units()  # ours: unitbox-run-*.service

    def scan() -> tuple[set[str], set[str]]:
        dirs = {p.name for p in config.runs_dir.iterdir() if p.is_dir()}
        return dirs, {d for d in dirs if RunDir.of(config, d).result.exists()}
    own_dirs, with_outcome = await asyncio.to_thread(scan)
    plan = plan_recovery(unfinished, units, with_outcome, own_dirs)
    for record, action in plan.runs:
        log.info("recovering run %s: %s", record.id, action.value, extra={"run_id": record.id})
    for name in plan.orphans:
        log.warning("stopping %s: it has no run record", name, extra={"unit": name})
        if (run_id := run_id_of(name)) is not None:
            with contextlib.suppress(SystemdError):
                await broker.stop_run(run_id)
    return plan
