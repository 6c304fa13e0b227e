from __future__ import annotations

from unitbox.limits import Limits
from unitbox.outcome import RunState
from unitbox.recovery import Action, plan_recovery
from unitbox.retention import select_expired
from unitbox.store import RunRecord
from unitbox.systemd import UnitInfo


def record(run_id: str, state: RunState) -> RunRecord:
    return RunRecord(id=run_id, state=state, created_at=0.0, limits=Limits())


def unit(run_id: str, active: str = "active") -> UnitInfo:
    return UnitInfo(f"unitbox-run-{run_id}.service", active, "running")


def test_recovery_plan() -> None:
    records = [record("live", RunState.RUNNING), record("ended", RunState.RUNNING),
               record("queued", RunState.QUEUED), record("started", RunState.QUEUED),
               record("lost", RunState.RUNNING), record("gone", RunState.RUNNING)]
    units = [unit("live"), unit("started", "activating"), unit("gone", "failed"), unit("orphan"), unit("foreign")]
    plan = plan_recovery(records, units, with_outcome={"ended"}, own_dirs={"live", "ended", "orphan"})
    assert [(r.id, a) for r, a in plan.runs] == [
        ("live", Action.ATTACH), ("ended", Action.FINISH), ("queued", Action.REQUEUE),
        ("started", Action.ATTACH), ("lost", Action.LOST), ("gone", Action.LOST)]
    # Only units whose run directory is ours are stopped: never another daemon's.
    assert plan.orphans == ["unitbox-run-orphan.service"]


def test_retention_by_age_count_and_size() -> None:
    finished = [("a", 10), ("b", 10), ("c", 10), ("d", 10), ("e", 10)]  # oldest first
    assert select_expired(finished, too_old={"a"}, max_runs=10, max_bytes=1000) == ["a"]
    assert select_expired(finished, too_old=set(), max_runs=3, max_bytes=1000) == ["a", "b"]
    assert select_expired(finished, too_old=set(), max_runs=10, max_bytes=25) == ["a", "b", "c"]
    assert select_expired(finished, too_old={"c"}, max_runs=3, max_bytes=1000) == ["c", "a"]
    assert select_expired([], too_old=set(), max_runs=1, max_bytes=1) == []
