"""Retention's sweeps against a real store and run directories: files go
before records, orphaned run directories go, and the loop outlives any failure."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from unitbox.budget import DiskBudget
from unitbox.config import RetentionSection
from unitbox.errors import SystemdError, Unavailable
from unitbox.limits import Limits
from unitbox.outcome import RunState
from unitbox.retention import RunFiles, retention_loop, sweep
from unitbox.rundir import RunDir
from unitbox.store import RunRecord, RunStore

POLICY = RetentionSection(max_age_days=1, interval_s=0.01)
TWO_HOURS_AGO = time.time() - 7200


def never_live(_: str) -> bool:
    return False




@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


@pytest.fixture
def budget(runs_dir: Path) -> DiskBudget:
    return DiskBudget(runs_dir, POLICY, ends_dir=runs_dir.parent / "ends")


class Broker:
    """`forget` as the broker does it (its ends directories), or failing like a broker that is down."""

    def __init__(self, ends_dir: Path) -> None:
        self.ends_dir, self.forgotten, self.down = ends_dir, list[str](), False

    async def forget(self, run_ids: Sequence[str]) -> None:
        if self.down:
            raise SystemdError("the broker is not running (fake)")
        self.forgotten += run_ids
        for run_id in run_ids:
            shutil.rmtree(self.ends_dir / run_id, ignore_errors=True)


@pytest.fixture
def broker(runs_dir: Path) -> Broker:
    (runs_dir.parent / "ends").mkdir()
    return Broker(runs_dir.parent / "ends")


@pytest.fixture
def files(runs_dir: Path, broker: Broker) -> RunFiles:
    return RunFiles(runs_dir, broker.ends_dir, broker.forget)


def make_dir(runs_dir: Path, name: str, mtime: float) -> Path:
    ends = runs_dir.parent / "ends" / name
    RunDir(runs_dir / name, ends).create(b"print(1)", b"", [])
    ends.mkdir(exist_ok=True)
    (ends / "result").write_text("end=1\n")
    for path in (runs_dir / name, ends):
        os.utime(path, (mtime, mtime))
    return runs_dir / name


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_files_go_before_records(store: RunStore, runs_dir: Path, budget: DiskBudget, files: RunFiles,
                                       broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    doomed = "a" * 16
    await store.insert(RunRecord(id=doomed, state=RunState.SUCCEEDED, created_at=1.0, finished_at=2.0,
                                 limits=Limits()))
    make_dir(runs_dir, doomed, time.time())

    async def failing_delete(_: object) -> None:
        raise RuntimeError("the store failed mid-sweep")
    monkeypatch.setattr(store, "delete", failing_delete)
    with pytest.raises(RuntimeError):
        await sweep(store, files, POLICY, budget, is_live=never_live)
    # No directory is stranded, the broker's part neither; the record stays for the next sweep to finish.
    assert not (runs_dir / doomed).exists() and broker.forgotten == [doomed]
    assert not (broker.ends_dir / doomed).exists()
    assert await store.get(doomed) is not None

    monkeypatch.undo()
    assert await sweep(store, files, POLICY, budget, is_live=never_live) == 1
    assert await store.get(doomed) is None


async def test_nothing_goes_while_the_broker_cannot_remove_its_part(
        store: RunStore, runs_dir: Path, budget: DiskBudget, files: RunFiles, broker: Broker) -> None:
    doomed = "a" * 16
    await store.insert(RunRecord(id=doomed, state=RunState.SUCCEEDED, created_at=1.0, finished_at=2.0,
                                 limits=Limits()))
    make_dir(runs_dir, doomed, time.time())
    broker.down = True
    with pytest.raises(Unavailable, match="broker cannot remove"):
        await sweep(store, files, POLICY, budget, is_live=never_live)
    assert (runs_dir / doomed).exists() and (broker.ends_dir / doomed / "result").exists()
    assert await store.get(doomed) is not None


async def test_orphaned_run_directories_go_and_nothing_else(store: RunStore, runs_dir: Path, budget: DiskBudget,
                                                            files: RunFiles, broker: Broker) -> None:
    orphan, fresh, live, recorded = "0123456789abcdef", "1" * 16, "2" * 16, "3" * 16
    await store.insert(RunRecord(id=recorded, state=RunState.QUEUED, created_at=1.0, limits=Limits()))
    for name in (orphan, live, recorded, "not-a-run", "0123456789ABCDEF", "0123456789abcdef0"):
        make_dir(runs_dir, name, TWO_HOURS_AGO)
    make_dir(runs_dir, fresh, time.time())  # being submitted: written just before its record
    (runs_dir / ("4" * 16)).write_bytes(b"not a directory")
    os.utime(runs_dir / ("4" * 16), (TWO_HOURS_AGO, TWO_HOURS_AGO))

    ends_only = "5" * 16  # the broker's part of a run whose own directory went (a sweep cut short)
    (broker.ends_dir / ends_only).mkdir()
    os.utime(broker.ends_dir / ends_only, (TWO_HOURS_AGO, TWO_HOURS_AGO))

    assert await sweep(store, files, POLICY, budget, is_live=lambda run_id: run_id == live) == 2
    assert names(runs_dir) == sorted(
        [fresh, live, recorded, "4" * 16, "not-a-run", "0123456789ABCDEF", "0123456789abcdef0"])
    assert sorted(broker.forgotten) == [orphan, ends_only]
    assert not (broker.ends_dir / orphan).exists() and (broker.ends_dir / live).exists()


async def test_the_loop_outlives_any_failure(store: RunStore, files: RunFiles, budget: DiskBudget,
                                             monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    sweeps = 0
    real_finished_before = store.finished_before

    async def finished_before(cutoff: float) -> list[str]:
        nonlocal sweeps
        sweeps += 1
        if sweeps == 1:
            raise RuntimeError("a bug in a sweep")
        return await real_finished_before(cutoff)
    monkeypatch.setattr(store, "finished_before", finished_before)

    loop = asyncio.create_task(retention_loop(store, files, POLICY, budget, is_live=never_live))
    try:
        for _ in range(500):
            if sweeps >= 3 or loop.done():
                break
            await asyncio.sleep(0.01)
        assert not loop.done()
        assert sweeps >= 3
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    failures = [r for r in caplog.records if r.name == "unitbox.retention" and r.levelno == logging.ERROR]
    assert len(failures) == 1
    assert failures[0].exc_info is not None and "a bug in a sweep" in str(failures[0].exc_info[1])
