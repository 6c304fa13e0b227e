"""Retention: finished runs (record and files) go once older than
max_age_days, and beyond max_runs or max_total_mb of stored output, oldest
first. Runs in flight are never touched. Runs in the background."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from unitbox.config import RetentionSection
from unitbox.errors import Unavailable
from unitbox.rundir import RunDir
from unitbox.store import RunStore

log = logging.getLogger(__name__)

RunDirFactory = Callable[[str], RunDir]


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


async def sweep(store: RunStore, runs_dir_of: RunDirFactory, policy: RetentionSection) -> int:
    cutoff = time.time() - policy.max_age_days * 86400
    too_old = set(await store.finished_before(cutoff))
    finished = await store.finished_oldest_first()
    doomed = select_expired(finished, too_old, policy.max_runs, policy.max_total_mb * 1024 * 1024)
    if not doomed:
        return 0
    await store.delete(doomed)
    loop = asyncio.get_running_loop()
    for run_id in doomed:
        await loop.run_in_executor(None, runs_dir_of(run_id).remove)
    log.info("retention: deleted %d finished runs", len(doomed))
    return len(doomed)


async def retention_loop(store: RunStore, runs_dir_of: RunDirFactory, policy: RetentionSection) -> None:
    while True:
        try:
            await sweep(store, runs_dir_of, policy)
        except Unavailable as exc:
            log.warning("retention: %s", exc.message)
        await asyncio.sleep(policy.interval_s)
