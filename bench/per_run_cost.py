"""The daemon's per-run CPU that is not the systemd calls, piece by piece,
through its own code: output capture, store writes, executor hops, logging.
CPU is time.process_time (user + system, all threads of this process) over
N runs; printed as µs per run.

    python bench/per_run_cost.py [-n 2000] [--dir /var/tmp/...] [--only capture,store,hops,logging,api]

Run it on a quiet machine, on the filesystem that holds the state dir."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from unitbox import logs
from unitbox.budget import DiskBudget
from unitbox.capture import MAX_READS_PER_WAKEUP, StreamCapture, make_pipe
from unitbox.config import RetentionSection
from unitbox.launcher import Launcher
from unitbox.lifecycle import RunLife
from unitbox.limits import Limits
from unitbox.outcome import RunState
from unitbox.rundir import RunDir
from unitbox.store import RunRecord, RunStore
from unitbox.store.sqlite import SqliteStore

REPO = Path(__file__).resolve().parent.parent
MB = 1_000_000
BLOCK = 8192  # what a Python program's buffered stdout writes into a pipe at a time
RESULT = "SERVICE_RESULT=success\nEXIT_CODE=exited\nEXIT_STATUS=0\nCPU_NS=12000000\nMEMORY_PEAK=4096000\n"


def report(name: str, cpu_s: float, n: int, wall_s: float | None = None) -> None:
    wall = f"   wall {wall_s / n * 1e6:9.1f} µs" if wall_s is not None else ""
    print(f"{name:52} cpu {cpu_s / n * 1e6:9.1f} µs/run{wall}   (n={n})", flush=True)


# -- output capture ---------------------------------------------------------------------------
async def capture_case(base: Path, n: int, *, cap: int, size: int, block: int) -> float:
    """CPU of the daemon's side only: `size` bytes arrive `block` at a time,
    each block taken by one wakeup's worth of reads, then finish()."""
    budget = DiskBudget(base, RetentionSection(max_total_mb=1 << 30, min_free_mb=0))
    payload = b"x" * block
    cpu = 0.0
    for index in range(n):
        path = base / f"out{index % 8}"
        path.unlink(missing_ok=True)
        read_fd, write_fd = make_pipe()
        start = time.process_time()
        capture = StreamCapture(read_fd, path, cap, budget.account("r"))
        cpu += time.process_time() - start
        for _ in range(size // block):
            os.write(write_fd, payload)
            start = time.process_time()
            capture._read(MAX_READS_PER_WAKEUP)  # what the loop's reader callback does
            cpu += time.process_time() - start
        start = time.process_time()
        capture.finish()
        cpu += time.process_time() - start
        os.close(write_fd)
        assert path.stat().st_size == min(cap, size // block * block)
    return cpu


async def bench_capture(base: Path, n: int) -> None:
    for label, cap, size, block in (
        ("capture 1 MB, 8 KiB per wakeup (print loop)", 2 * MB, MB, BLOCK),
        ("capture 1 MB in one burst (pipe full)", 2 * MB, 1 << 20, 1 << 20),
        ("capture 1 MB, cap 64 KiB (rest discarded)", 64 * 1024, MB, BLOCK),
        ("capture 100 bytes", 2 * MB, 100, 100),
    ):
        rounds = sorted([await capture_case(base, n // 5, cap=cap, size=size, block=block) for _ in range(5)])
        report(label + " (median of 5)", rounds[2] * 5, n // 5 * 5)


# -- store ----------------------------------------------------------------------------------
async def one_run(store: RunStore) -> None:
    record = await store.insert(RunRecord(id=secrets.token_hex(8), state=RunState.QUEUED,
                                          created_at=time.time(), limits=Limits()))
    record = record.evolve(state=RunState.RUNNING, started_at=time.time())
    await store.update(record)
    await store.update(record.evolve(state=RunState.SUCCEEDED, finished_at=time.time(), exit_code=0,
                                     duration_ms=12.5, cpu_ms=10.0, memory_peak_bytes=4096000))


async def bench_store(base: Path, n: int) -> None:
    for ways in (1, 16):
        store = SqliteStore(base / f"store{ways}.db")
        await store.open()
        for _ in range(20):
            await one_run(store)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(n // ways):
            await asyncio.gather(*(one_run(store) for _ in range(ways)))
        report(f"store: insert + running + final, {ways}-way", time.process_time() - cpu0, n // ways * ways,
               time.perf_counter() - wall0)
        await store.close()


# -- executor hops ----------------------------------------------------------------------------
def finished_run(runs_dir: Path) -> RunLife:
    path = runs_dir / secrets.token_hex(8)
    run_dir = RunDir(path, path)  # what root writes beside the inputs: one directory is enough here
    run_dir.create(b"pass\n", b"", [])
    run_dir.result.write_text(RESULT)
    (run_dir.path / "stdout").write_bytes(b"hello\n")
    (run_dir.path / "stderr").touch()
    return RunLife(RunRecord(id=run_dir.path.name, state=RunState.RUNNING, created_at=time.time(),
                             limits=Limits()), run_dir)


async def timed(n: int, action: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        await action()
    return time.process_time() - cpu0, time.perf_counter() - wall0


async def bench_hops(base: Path, n: int) -> None:
    runs_dir = base / "runs"
    runs_dir.mkdir()

    async def inline(fn: Callable[[], Any]) -> Any:
        return fn()
    run = finished_run(runs_dir)
    code = b"print('hello')\n" * 20
    cases: dict[str, Callable[[], Awaitable[Any]]] = {
        "hop: asyncio.to_thread(no-op)": lambda: asyncio.to_thread(lambda: None),
        "Launcher.collect inline": lambda: inline(lambda: Launcher.collect(run)),
        "Launcher.collect via to_thread": lambda: asyncio.to_thread(Launcher.collect, run),
        "RunDir.create inline (6 fsyncs)": lambda: inline(
            lambda: RunDir(runs_dir / (name := secrets.token_hex(8)), runs_dir / name).create(code, b"", ["a"])),
    }
    for name, action in cases.items():
        cpu, wall = await timed(n, action)
        report(name, cpu, n, wall)


# -- logging ----------------------------------------------------------------------------------
def bench_logging(n: int) -> None:
    """One INFO record as the daemon emits it (stderr handler, its formatter)."""
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logs._FieldsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("unitbox.runner")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        start = time.process_time()
        for index in range(n):
            log.info("run %s %s (exit %s, signal %s)", "0123456789abcdef", "succeeded", 0, None,
                     extra={"run_id": "0123456789abcdef", "unit": "unitbox-run-0123456789abcdef.service",
                            "state": "succeeded"})
            if index % 256 == 0:
                handler.stream = io.StringIO()
        report("logging: one INFO record (stderr format)", time.process_time() - start, n)
        if os.path.exists(logs.JOURNAL_SOCKET):  # a real journald (in the test host, on a systemd machine)
            journal = logs.JournalHandler()
            journal.setFormatter(logging.Formatter("%(message)s"))
            root.handlers[:] = [journal]
            start = time.process_time()
            for _ in range(n):
                log.info("run %s %s (exit %s, signal %s)", "0123456789abcdef", "succeeded", 0, None,
                         extra={"run_id": "0123456789abcdef", "unit": "unitbox-run-0123456789abcdef.service",
                                "state": "succeeded"})
            report("logging: one INFO record (journald native)", time.process_time() - start, n)
        start = time.process_time()
        for _ in range(n):
            log.debug("run %s queued", "0123456789abcdef", extra={"run_id": "0123456789abcdef"})
        report("logging: one DEBUG call, level INFO (dropped)", time.process_time() - start, n)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


# -- everything but systemd: the API tier ----------------------------------------------------
async def bench_api(base: Path, n: int) -> None:
    """POST /run-json wait=true through the real app and engine over the fake
    systemd of the API tests (its unit prints 12 bytes). The HTTP client runs
    in this process too: its CPU is in the figure."""
    sys.path.insert(0, str(REPO))  # for tests.support
    from aiohttp.test_utils import TestClient, TestServer

    from tests.support.fake_systemd import FakeSystemd, fake_broker
    from unitbox.api.app import create_app
    from unitbox.config import load_config
    from unitbox.engine import Engine
    from unitbox.runtimes import Runtimes
    from unitbox.store import open_store

    for ways in (1, 16):
        cfg = load_config(Path("/dev/null"), environ={},
                          cli={"state_dir": str(base / f"api{ways}"), "max_concurrent": 16, "queue_size": 64})
        engine = Engine(cfg, fake_broker(cfg, FakeSystemd()), open_store(cfg), Runtimes(cfg))
        async with TestClient(TestServer(create_app(engine))) as client:
            async def one() -> None:
                reply = await client.post("/run-json", json={"code": "pass", "wait": True})
                assert (await reply.json())["state"] == "succeeded"
            for _ in range(20):
                await one()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in range(n // ways):
                await asyncio.gather(*(one() for _ in range(ways)))
            report(f"API tier, fake systemd: one run, {ways}-way", time.process_time() - cpu0, n // ways * ways,
                   time.perf_counter() - wall0)


async def main_async(base: Path, n: int, only: set[str]) -> None:
    if "capture" in only:
        await bench_capture(base, n)
    if "store" in only:
        await bench_store(base, n)
    if "hops" in only:
        await bench_hops(base, n)
    if "logging" in only:
        bench_logging(n)
    if "api" in only:
        await bench_api(base, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp") / f"unitbox-cost-{os.getpid()}")
    parser.add_argument("--only", default="capture,store,hops,logging,api")
    args = parser.parse_args()
    args.dir.mkdir(parents=True)
    try:
        asyncio.run(main_async(args.dir, args.n, set(args.only.split(","))))
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
