"""Retention: finished runs (record and files) go once older than
max_age_days, and beyond max_runs, oldest first; and while everything stored
(the disk budget, budget.py: inputs and output of every run, in flight or
not) is over low_water_percent of max_total_mb, oldest first too. Run
directories left without a record (a crash between writing a submission's
files and recording it) go as well. Runs in flight are never touched.
A run's files are in two places (rundir.py): the daemon removes its own,
and asks the broker to remove what root wrote (`forget`), that first.

Runs in the background, and nothing stops it but cancellation: a full sweep
every interval_s, and a sweep of expired runs at once whenever the budget
passes its high-water mark (then again every BUDGET_RECHECK_S while it stays
above, as runs in flight finish and become deletable)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from unitbox.budget import DiskBudget
from unitbox.config import RetentionSection
from unitbox.errors import SystemdError, Unavailable
from unitbox.store import RunStore

log = logging.getLogger(__name__)

IsLive = Callable[[str], bool]
Forget = Callable[[Sequence[str]], Awaitable[None]]

RUN_ID = re.compile(r"[0-9a-f]{16}")  # engine.new_run_id: secrets.token_hex(8)
# A submission writes its directory just before it records the run: a
# directory this young may be one of those, not an orphan.
ORPHAN_MIN_AGE_S = 3600.0
BUDGET_RECHECK_S = 1.0
SWEEP_MIN_GAP_S = 0.25


def select_expired(finished: Sequence[tuple[str, int]], too_old: set[str], max_runs: int,
                   max_bytes: int) -> list[str]:
    """Pure: from (id, output bytes) oldest first, the ids to delete."""
    doomed = [run_id for run_id, _ in finished if run_id in too_old]
    kept = [(run_id, size) for run_id, size in finished if run_id not in too_old]
    total = sum(size for _, size in kept)
    excess_count = max(0, len(kept) - max_runs)
    for index, (run_id, size) in enumerate(kept):
        if index < excess_count or total > max_bytes:
            doomed.append(run_id)
            total -= size
        else:
            break
    return doomed


@dataclass(frozen=True, slots=True)
class RunFiles:
    """Where runs' files are and how they go: `runs_dir` is the daemon's,
    `ends_dir` the broker's, emptied by `forget` (the broker's request)."""

    runs_dir: Path
    ends_dir: Path
    forget: Forget

    async def remove(self, run_ids: Sequence[str]) -> None:
        # The broker's part first: if it cannot remove it now, nothing goes and the next sweep tries again.
        try:
            await self.forget(run_ids)
        except SystemdError as exc:
            raise Unavailable(f"the broker cannot remove runs' files now ({exc.message})") from exc
        await asyncio.to_thread(_remove_dirs, self.runs_dir, run_ids)

    async def old(self, older_than: float) -> list[str]:
        """Run ids with a directory in either place last changed before `older_than`."""
        found = await asyncio.to_thread(lambda: {name for directory in (self.runs_dir, self.ends_dir)
                                                 for name in _old_run_dirs(directory, older_than)})
        return sorted(found)


def _remove_dirs(runs_dir: Path, run_ids: Sequence[str]) -> None:
    for run_id in run_ids:
        shutil.rmtree(runs_dir / run_id, ignore_errors=True)


async def sweep_expired(store: RunStore, files: RunFiles, policy: RetentionSection, budget: DiskBudget) -> int:
    cutoff = time.time() - policy.max_age_days * 86400
    too_old = set(await store.finished_before(cutoff))
    finished = [(run_id, budget.size_of(run_id)) for run_id, _ in await store.finished_oldest_first()]
    # Runs in flight count but cannot go: the finished ones make room for them.
    in_flight = budget.total - sum(size for _, size in finished)
    doomed = select_expired(finished, too_old, policy.max_runs, budget.low_water - in_flight)
    if not doomed:
        return 0
    # Files first: if the rows cannot go now, the next sweep finds them again;
    # rows first would strand files that no record points to.
    await files.remove(doomed)
    budget.forget(doomed)
    await store.delete(doomed)
    log.info("retention: deleted %d finished runs", len(doomed))
    return len(doomed)


def _old_run_dirs(runs_dir: Path, older_than: float) -> list[str]:
    """Names of the run-id-named directories under `runs_dir` last changed before `older_than`."""
    names: list[str] = []
    if not runs_dir.is_dir():
        return names
    with os.scandir(runs_dir) as entries:
        for entry in entries:
            try:
                if (RUN_ID.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
                        and entry.stat(follow_symlinks=False).st_mtime < older_than):
                    names.append(entry.name)
            except FileNotFoundError:  # removed meanwhile
                continue
    return names


async def sweep_orphans(store: RunStore, files: RunFiles, budget: DiskBudget, *, is_live: IsLive) -> int:
    """Remove run directories that no record points to and no run uses."""
    candidates = await files.old(time.time() - ORPHAN_MIN_AGE_S)
    if not candidates:
        return 0
    known = await store.known_ids(candidates)
    orphans = [name for name in candidates if name not in known and not is_live(name)]
    if not orphans:
        return 0
    await files.remove(orphans)
    budget.forget(orphans)
    log.warning("retention: removed %d run directories that had no run record: %s",
                len(orphans), ", ".join(orphans))
    return len(orphans)


async def sweep(store: RunStore, files: RunFiles, policy: RetentionSection, budget: DiskBudget, *,
                is_live: IsLive) -> int:
    """One pass; the number of run directories removed."""
    return (await sweep_expired(store, files, policy, budget)
            + await sweep_orphans(store, files, budget, is_live=is_live))


async def retention_loop(store: RunStore, files: RunFiles, policy: RetentionSection, budget: DiskBudget, *,
                         is_live: IsLive) -> None:
    """A full sweep every `policy.interval_s`; expired runs only, at once,
    when the budget wakes it. A failed sweep is logged, and the next one runs
    all the same."""
    loop = asyncio.get_running_loop()
    next_full = loop.time()
    while True:
        began = loop.time()
        budget.wake.clear()
        full = began >= next_full
        if full:
            next_full = began + policy.interval_s
        swept = False
        try:
            if full:
                await sweep(store, files, policy, budget, is_live=is_live)
            else:
                await sweep_expired(store, files, policy, budget)
            swept = True
        except Unavailable as exc:  # expected now and then (disk full, store closing): no traceback
            log.warning("retention: %s", exc.message)
        except Exception:
            log.exception("retention: the sweep failed; trying again in %.0f s", policy.interval_s)
        delay = next_full - loop.time()
        if swept and budget.above_high_water:  # a failing sweep is not retried every second
            delay = min(delay, BUDGET_RECHECK_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(budget.wake.wait(), max(delay, 0.0))
        # Refused submissions wake it too: however fast they come, sweeps do not follow faster than this.
        await asyncio.sleep(max(0.0, began + SWEEP_MIN_GAP_S - loop.time()))
