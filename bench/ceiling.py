"""The ceiling: unitbox's units started straight over D-Bus from one asyncio
process, through the daemon's own adapter (unitbox.systemd.Systemd) and with
the daemon's own profile, but with no HTTP, no store and no output capture
(stdio is /dev/null). What is left is PID 1's own cost per unit.

    python bench/ceiling.py [--runs 100] [--concurrency 4] [--code 'pass']

Must run where systemd is PID 1 (make bench runs it inside the test host)."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time
from pathlib import Path, PurePosixPath

from unitbox.broker.server import collector_of
from unitbox.broker.staging import InputBudget, make_ends, stage_inputs
from unitbox.config import Config
from unitbox.limits import Limits
from unitbox.profile import STAGE_ROOT, build_profile
from unitbox.rundir import RunDir
from unitbox.runtimes import Runtimes
from unitbox.systemd import Systemd, UnitEnd, UnitEvent

BENCH_STATE = Path("/var/lib/unitbox-baseline")
SLICE = "unitbox.slice"
CONFIG = Config()
RUNTIME = Runtimes(CONFIG).get("default")  # the daemon's own default runtime, flags and all


def new_run(prefix: str, code: bytes) -> tuple[str, RunDir]:
    """A fresh run id, its directory (inputs written, as the daemon makes
    them) and what the broker makes before a start: the staged inputs and
    the ends directory (broker/staging.py, the broker's own code)."""
    run_id = f"{prefix}{secrets.token_hex(6)}"
    run_dir = RunDir(BENCH_STATE / "daemon" / "runs" / run_id, BENCH_STATE / "ends" / run_id)
    run_dir.create(code, b"", [])
    inputs = os.open(run_dir.inputs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stage_inputs(Path(STAGE_ROOT), run_id, inputs, os.getuid(), InputBudget.of(CONFIG))
    finally:
        os.close(inputs)
    make_ends(BENCH_STATE / "ends", run_id)
    return run_id, run_dir


def interpreter_command() -> list[str]:
    """The interpreter and its flags as the profile runs them (for the floor)."""
    exec_start = profile_for("x", RunDir(Path("/nonexistent"), Path("/nonexistent")))["ExecStart"]
    assert isinstance(exec_start, list)
    return [str(exec_start[0]).lstrip("+:-"), *exec_start[1:exec_start.index("-c")]]


def profile_for(run_id: str, run_dir: RunDir) -> dict[str, object]:
    return build_profile(run_id, Limits(), ends_dir=PurePosixPath(run_dir.ends_path),
                         state_dir=PurePosixPath(BENCH_STATE), slice_name=SLICE, runtime=RUNTIME,
                         collector=collector_of(CONFIG))


PREFIX = "ubench-dbus-"


class Ceiling:
    def __init__(self) -> None:
        self.systemd = Systemd()
        self._devnull = -1
        self._ends: dict[str, asyncio.Future[UnitEnd]] = {}

    def open(self) -> None:
        self.systemd.open(self._on_event, self._on_lost, PREFIX)  # the broker's signals: JobRemoved, UnitRemoved
        self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    def _on_event(self, name: str, event: UnitEvent) -> None:
        done = self._ends.get(name)
        if isinstance(event, UnitEnd) and done is not None and not done.done():
            done.set_result(event)

    @staticmethod
    def _on_lost(reason: str) -> None:
        raise RuntimeError(f"lost the system bus: {reason}")

    def close(self) -> None:
        self.systemd.close()
        os.close(self._devnull)

    async def run(self, code: bytes) -> None:
        """One unit, start to finish. Raises if it did not succeed."""
        run_id, run_dir = new_run("c", code)
        name = f"{PREFIX}{run_id}.service"
        done = self._ends[name] = asyncio.get_running_loop().create_future()
        try:
            fd = self._devnull
            self.systemd.start_transient_service(name, profile_for(run_id, run_dir),
                                                 {"input": fd, "output": fd, "error": fd})
            await asyncio.wait_for(done, 60)
        finally:
            del self._ends[name]
        found = run_dir.read_outcome()  # written by the profile's ExecStopPost, as for a daemon's run
        if found is None or found[0].service_result != "success":
            raise RuntimeError(f"{name}: {found[0] if found else 'no outcome recorded'}")


async def _main(args: argparse.Namespace) -> None:
    ceiling = Ceiling()
    ceiling.open()
    latencies: list[float] = []
    todo = iter(range(args.runs))

    async def worker() -> None:
        for _ in todo:
            began = time.perf_counter()
            await ceiling.run(args.code.encode())
            latencies.append(time.perf_counter() - began)
    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.perf_counter() - began
    ceiling.close()
    print(f"{args.runs} runs, {args.concurrency} at a time: {args.runs / wall:.1f} runs/s, "
          f"p50 {statistics.median(latencies) * 1000:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--code", default="pass")
    asyncio.run(_main(parser.parse_args()))
