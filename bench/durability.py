"""The cost of making an accepted run survive a power loss, through the
daemon's own code: SqliteStore.insert committed with synchronous=FULL against
NORMAL, and RunDir.create with its fsyncs against without. Interleaved, so
the disk's drift hits all four alike; prints the medians (ms).

    python bench/durability.py [--runs 300] [--dir /var/lib/unitbox-durability]

Run it on the filesystem that will hold the state dir: the numbers are the
disk's cache-flush latency, not Python's."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

from unitbox.limits import Limits
from unitbox.outcome import RunState
from unitbox.rundir import RunDir
from unitbox.store import RunRecord
from unitbox.store.sqlite import SqliteStore

T = TypeVar("T")
WARM_UP = 20
CODE = b"print('hello')\n" * 20


class NormalStore(SqliteStore):
    """The store as it was: every commit with synchronous=NORMAL."""

    async def _run(self, fn: Callable[[Any], T], *, durable: bool = False) -> T:
        return await super()._run(fn)


def create(run_dir: RunDir, fsync: bool) -> float:
    """ms for RunDir.create, timed in its worker thread (as the daemon runs it)."""
    with contextlib.ExitStack() as patches:
        if not fsync:
            patches.enter_context(mock.patch.object(os, "fsync", lambda _fd: None))
        start = time.perf_counter()
        run_dir.create(CODE, b"", ["a", "b"])
        return (time.perf_counter() - start) * 1000


async def timed(action: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await action()
    return (time.perf_counter() - start) * 1000


async def measure(base: Path, runs: int) -> dict[str, list[float]]:
    runs_dir = base / "runs"
    runs_dir.mkdir(parents=True)
    full, normal = SqliteStore(base / "full.db"), NormalStore(base / "normal.db")
    await full.open()
    await normal.open()
    loop = asyncio.get_running_loop()

    def record() -> RunRecord:
        return RunRecord(id=secrets.token_hex(8), state=RunState.QUEUED, created_at=time.time(), limits=Limits())

    def run_dir() -> RunDir:
        path = runs_dir / secrets.token_hex(8)
        return RunDir(path, path)

    cases: dict[str, Callable[[], Awaitable[float]]] = {  # each returns the ms it took
        "insert, synchronous=NORMAL": lambda: timed(lambda: normal.insert(record())),
        "insert, synchronous=FULL": lambda: timed(lambda: full.insert(record())),
        "RunDir.create, no fsync": lambda: loop.run_in_executor(None, create, run_dir(), False),
        "RunDir.create, fsync": lambda: loop.run_in_executor(None, create, run_dir(), True),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for index in range(WARM_UP + runs):
        for name, action in cases.items():
            elapsed = await action()
            if index >= WARM_UP:
                times[name].append(elapsed)
    await full.close()
    await normal.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp") / f"unitbox-durability-{os.getpid()}")
    args = parser.parse_args()
    try:
        times = asyncio.run(measure(args.dir, args.runs))
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    for name, values in times.items():
        values.sort()
        print(f"{name:28} median {statistics.median(values):6.3f} ms   "
              f"p90 {values[len(values) * 9 // 10]:6.3f} ms   (n={len(values)})")


if __name__ == "__main__":
    main()
