"""The disk budget: a running total of everything stored for runs (code,
argv, stdin, captured output) against `retention.max_total_mb`, and a floor
of free space on the state filesystem (`retention.min_free_mb`).

The total is measured once at start (every file under the run directories)
and then kept by the writers themselves, so every check is a comparison, not
a walk of the disk: a submission charges its inputs before its first await
(concurrent submissions cannot overshoot), a capture charges each write, and
retention credits what it deletes. The outcome file ExecStopPost writes
(about 120 bytes, by systemd, not the daemon) is counted from the next start.

When the total reaches the budget, or the free space the floor, captures
drop the rest of their output (the stream is marked truncated, as at
`output_kb`) and submissions are refused with 503 + Retry-After. Passing the
high-water mark, or refusing a submission for the budget, wakes retention at
once instead of at its next interval.

Free space comes from statvfs at most every FREE_CHECK_S; between two looks
it is estimated by subtracting what was charged since, so a fast writer
cannot run past the floor for a whole interval."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from unitbox.config import RetentionSection
from unitbox.errors import Unavailable

log = logging.getLogger(__name__)

MiB = 1 << 20
FREE_CHECK_S = 1.0
BUDGET_RETRY_AFTER_S = 5  # retention is already deleting: space comes back within seconds
FLOOR_RETRY_AFTER_S = 30  # someone has to free space on the host


def submission_bytes(code: bytes, stdin: bytes, args: list[str]) -> int:
    """What RunDir.create writes for a submission (main.py, argv, stdin)."""
    return len(code) + len(stdin) + len("\0".join(args).encode("utf-8", "surrogatepass"))


def _tree_bytes(path: Path) -> int:
    total = 0
    for parent, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except FileNotFoundError:  # deleted meanwhile
                continue
    return total


def measure(*dirs: Path) -> dict[str, int]:
    """Bytes stored under each entry name of `dirs` (a run's directories in
    each, rundir.py), summed per name (blocking: call in a thread)."""
    sizes: dict[str, int] = {}
    for runs_dir in dirs:
        try:
            entries = list(os.scandir(runs_dir))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                size = (_tree_bytes(Path(entry.path)) if entry.is_dir(follow_symlinks=False)
                        else entry.stat(follow_symlinks=False).st_size)
            except (FileNotFoundError, PermissionError):
                continue
            sizes[entry.name] = sizes.get(entry.name, 0) + size
    return sizes


class DiskBudget:
    def __init__(self, runs_dir: Path, policy: RetentionSection, *, ends_dir: Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runs_dir = runs_dir
        self._measured = (runs_dir,) if ends_dir is None else (runs_dir, ends_dir)  # a run's two places
        self.max_bytes = policy.max_total_mb * MiB
        self.high_water = self.max_bytes * policy.high_water_percent // 100
        self.low_water = self.max_bytes * policy.low_water_percent // 100
        self.min_free = policy.min_free_mb * MiB
        self.total = 0
        self.wake = asyncio.Event()  # set when usage passes the high-water mark: retention sweeps now
        self._sizes: dict[str, int] = {}
        self._clock = clock
        self._free_seen: int | None = None  # bytes free at the last statvfs (None: unknown)
        self._free_checked_at = -math.inf
        self._total_at_check = 0

    async def load(self) -> None:
        """Measure what is on disk now (at start, before any run is adopted)."""
        self._sizes = await asyncio.to_thread(measure, *self._measured)
        self.total = sum(self._sizes.values())
        log.info("disk budget: %.1f of %d MB in use by %d run directories", self.total / MiB,
                 self.max_bytes // MiB, len(self._sizes))
        if self.above_high_water:
            self.wake.set()

    # -- the running total ---------------------------------------------------------
    def size_of(self, run_id: str) -> int:
        return self._sizes.get(run_id, 0)

    def charge(self, run_id: str, size: int) -> None:
        before = self.total
        self._sizes[run_id] = self._sizes.get(run_id, 0) + size
        self.total += size
        if before <= self.high_water < self.total:
            self.wake.set()

    def forget(self, run_ids: Iterable[str]) -> None:
        """These run directories are gone."""
        for run_id in run_ids:
            self.total -= self._sizes.pop(run_id, 0)

    @property
    def above_high_water(self) -> bool:
        return self.total > self.high_water

    # -- free space ----------------------------------------------------------------
    def free_bytes(self) -> int | None:
        """Free space on the state filesystem (for unprivileged users: the
        daemon is root, and must not eat ext4's root reserve), looked up at
        most every FREE_CHECK_S and estimated in between. None if unknown."""
        now = self._clock()
        if now - self._free_checked_at >= FREE_CHECK_S:
            self._free_checked_at = now
            self._total_at_check = self.total
            try:
                stat = os.statvfs(self.runs_dir)
            except OSError as exc:
                log.warning("disk budget: statvfs %s: %s", self.runs_dir, exc.strerror)
                self._free_seen = None
            else:
                self._free_seen = stat.f_bavail * stat.f_frsize
        if self._free_seen is None:
            return None
        return self._free_seen - max(0, self.total - self._total_at_check)

    # -- the checks ------------------------------------------------------------------
    def room(self) -> int:
        """Bytes that may still be written before the budget or the floor is reached."""
        room = self.max_bytes - self.total
        free = self.free_bytes()
        if free is not None:
            room = min(room, free - self.min_free)
        return max(0, room)

    def check_submission(self, size: int) -> None:
        """Raise Unavailable (503 + Retry-After) if a submission storing `size`
        bytes would pass the budget or the free-space floor."""
        if self.total + size > self.max_bytes:
            self.wake.set()  # retention may be able to make room now (below high water it would wait)
            raise Unavailable(
                f"the disk budget for stored runs is used up ({self.total / MiB:.1f} MB stored, "
                f"retention.max_total_mb = {self.max_bytes // MiB}); finished runs are being deleted, "
                "try again shortly", retry_after_s=BUDGET_RETRY_AFTER_S)
        free = self.free_bytes()
        if free is not None and free - size < self.min_free:
            raise Unavailable(
                f"the state filesystem is nearly full ({max(free, 0) / MiB:.1f} MB free, below the floor "
                f"retention.min_free_mb = {self.min_free // MiB}); no new runs until space is freed",
                retry_after_s=FLOOR_RETRY_AFTER_S)

    def account(self, run_id: str) -> RunAccount:
        return RunAccount(self, run_id)


@dataclass(frozen=True, slots=True)
class RunAccount:
    """One run's view of the budget, for its output captures."""

    budget: DiskBudget
    run_id: str

    def room(self) -> int:
        return self.budget.room()

    def charge(self, size: int) -> None:
        self.budget.charge(self.run_id, size)
