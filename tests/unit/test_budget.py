"""The disk budget: its running total, its checks, the captures it stops and
the retention sweeps it triggers (real files, a real store, no systemd)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from unitbox.budget import DiskBudget, MiB, submission_bytes
from unitbox.capture import StreamCapture, make_pipe
from unitbox.config import RetentionSection
from unitbox.errors import Unavailable
from unitbox.limits import Limits
from unitbox.outcome import RunState
from unitbox.retention import RunFiles, retention_loop, sweep_expired
from unitbox.rundir import RunDir
from unitbox.store import RunRecord, RunStore

# 10 MB budget; high water 9 MB, low water 7.5 MB; no free-space floor.
POLICY = RetentionSection(max_total_mb=10, min_free_mb=0)


class FakeStatvfs:
    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0

    def __call__(self, path: Any) -> os.statvfs_result:
        self.calls += 1
        return os.statvfs_result((4096, 4096, 10**6, 0, self.free // 4096, 0, 0, 0, 0, 255))


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


def run_dir(runs_dir: Path, name: str) -> RunDir:
    return RunDir(runs_dir / name, runs_dir.parent / "ends" / name)


def test_load_counts_every_file_a_run_stores_in_both_its_directories(runs_dir: Path) -> None:
    run_dir(runs_dir, "a" * 16).create(b"x" * 1000, b"y" * 500, ["one", "two"])
    (runs_dir / ("a" * 16) / "stdout").write_bytes(b"z" * 300)
    (runs_dir.parent / "ends" / ("a" * 16) / "files").mkdir(parents=True)  # what root wrote for it
    (runs_dir.parent / "ends" / ("a" * 16) / "files" / "0").write_bytes(b"f" * 200)
    run_dir(runs_dir, "b" * 16).create(b"print(1)", b"", [])
    budget = DiskBudget(runs_dir, POLICY, ends_dir=runs_dir.parent / "ends")
    asyncio.run(budget.load())
    assert budget.size_of("a" * 16) == 1000 + 500 + len("one\0two") + 300 + 200
    assert budget.size_of("b" * 16) == len("print(1)")
    assert budget.total == budget.size_of("a" * 16) + budget.size_of("b" * 16)
    assert submission_bytes(b"x" * 1000, b"y" * 500, ["one", "two"]) == 1000 + 500 + 7


def test_charges_and_deletions_keep_the_total_and_wake_retention_at_high_water(runs_dir: Path) -> None:
    budget = DiskBudget(runs_dir, POLICY)
    budget.charge("r1", 8 * MiB)
    assert budget.total == 8 * MiB and not budget.wake.is_set() and not budget.above_high_water
    budget.charge("r1", 2 * MiB)  # passes 9 MB
    assert budget.wake.is_set() and budget.above_high_water
    budget.forget(["r1", "never-charged"])
    assert budget.total == 0 and budget.size_of("r1") == 0


def test_a_submission_past_the_budget_is_a_503_that_names_the_key(runs_dir: Path) -> None:
    budget = DiskBudget(runs_dir, POLICY)
    budget.charge("r1", 9 * MiB)
    budget.wake.clear()
    budget.check_submission(MiB)  # exactly at the budget: still fits
    with pytest.raises(Unavailable) as refused:
        budget.check_submission(MiB + 1)
    assert "retention.max_total_mb = 10" in refused.value.message
    assert refused.value.headers["Retry-After"] == "5"
    assert budget.wake.is_set()  # retention may make room now


def test_free_space_floor_is_looked_up_at_most_once_a_second_and_estimated_between(
        runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    statvfs = FakeStatvfs(free=600 * MiB)
    monkeypatch.setattr(os, "statvfs", statvfs)
    budget = DiskBudget(runs_dir, RetentionSection(max_total_mb=10_000, min_free_mb=512), clock=lambda: now[0])
    budget.check_submission(MiB)
    assert budget.room() == 88 * MiB
    budget.charge("r1", 80 * MiB)  # written since the look: subtracted from what it saw
    assert budget.room() == 8 * MiB
    with pytest.raises(Unavailable) as refused:
        budget.check_submission(9 * MiB)
    assert "below the floor retention.min_free_mb = 512" in refused.value.message
    assert refused.value.headers["Retry-After"] == "30"
    assert statvfs.calls == 1
    statvfs.free = 700 * MiB  # space freed elsewhere: seen at the next look, a second later
    now[0] += 1.0
    budget.check_submission(9 * MiB)
    assert statvfs.calls == 2


async def test_capture_stops_at_the_budget_without_a_hole_and_flags_truncation(runs_dir: Path) -> None:
    budget = DiskBudget(runs_dir, POLICY)
    budget.charge("other", 10 * MiB - 100_000)  # 100 kB left
    read_fd, write_fd = make_pipe()
    path = runs_dir / "stdout"
    capture = StreamCapture(read_fd, path, cap=MiB, allowance=budget.account("r1"))
    try:
        for chunk in (b"a" * 60_000, b"b" * 60_000, b"c" * 10):  # the last one after the budget ran out
            os.write(write_fd, chunk)
            capture._read(None)
    finally:
        os.close(write_fd)
        capture.close()
    assert path.read_bytes() == b"a" * 60_000 + b"b" * 40_000  # the budget's worth, then nothing
    assert capture.truncated and (runs_dir / ".stdout.truncated").exists()
    assert budget.total == 10 * MiB and budget.size_of("r1") == 100_000




async def forget(run_ids: Sequence[str]) -> None:
    """The broker's part: nothing stored there in these tests."""


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def finished_run(store: RunStore, runs_dir: Path, name: str, size: int) -> None:
    await store.insert(RunRecord(id=name, state=RunState.SUCCEEDED, created_at=time.time(),
                                 finished_at=time.time(), limits=Limits()))
    run_dir(runs_dir, name).create(b"", b"s" * size, [])


async def test_sweep_deletes_oldest_finished_down_to_low_water_counting_inputs_and_live_runs(
        store: RunStore, runs_dir: Path) -> None:
    for name in ("1" * 16, "2" * 16, "3" * 16):
        await finished_run(store, runs_dir, name, 3 * MiB)  # stdin only: no output at all
    run_dir(runs_dir, ("4" * 16)).create(b"", b"s" * (2 * MiB), [])  # in flight: cannot go
    budget = DiskBudget(runs_dir, POLICY)
    await budget.load()
    assert budget.total == 11 * MiB
    assert await sweep_expired(store, RunFiles(runs_dir, runs_dir.parent / "ends", forget), POLICY, budget) == 2  # 11 → 5 MB ≤ 7.5 MB
    assert listing(runs_dir) == ["3" * 16, "4" * 16]
    assert budget.total == 5 * MiB
    assert await store.get("1" * 16) is None and await store.get("3" * 16) is not None


async def test_passing_high_water_sweeps_at_once_not_at_the_interval(store: RunStore, runs_dir: Path) -> None:
    policy = RetentionSection(max_total_mb=10, min_free_mb=0, interval_s=3600)
    budget = DiskBudget(runs_dir, policy)
    loop = asyncio.create_task(retention_loop(store, RunFiles(runs_dir, runs_dir.parent / "ends", forget), policy, budget,
                                              is_live=lambda _: False))
    try:
        await asyncio.sleep(0.05)  # the first (full) sweep has run; the next is an hour away
        await finished_run(store, runs_dir, "5" * 16, 8 * MiB)
        budget.charge("5" * 16, 8 * MiB)
        await finished_run(store, runs_dir, "6" * 16, 2 * MiB)
        budget.charge("6" * 16, 2 * MiB)  # 10 MB: past high water
        for _ in range(200):
            if budget.total <= budget.low_water:
                break
            await asyncio.sleep(0.01)
        assert budget.total == 2 * MiB
        assert listing(runs_dir) == ["6" * 16]
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


def test_low_water_above_high_water_is_a_config_error_naming_both() -> None:
    with pytest.raises(ValueError, match="low_water_percent"):
        RetentionSection(high_water_percent=50, low_water_percent=60)
