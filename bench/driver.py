"""The load driver, run inside the test host by run_bench.py. It reads one JSON
command per line on stdin and answers on stdout with JSON lines: progress
(`{"progress": runs done}`) while a batch goes, then `{"result": …}`.

Every mode runs the same program with the same interpreter flags, and each
run is checked (exit status, and the size of its stdout for the print-heavy
program); a failed run counts as an error, never as a latency.

modes:
  floor       python3 -I [-S] -u -c CODE (the profile's flags), no sandbox: bare interpreter start-up
  systemd-run systemd-run --wait --pipe with unitbox's whole profile as -p flags
  dbus        the ceiling: the same units over D-Bus from this process (ceiling.py)
  http-wait   POST /run-json?wait=true, then GET /output/<id>?stream=stdout
  http-poll   POST /run-json (202), GET /status/<id> every POLL_S until done, then the output
  http-warm   as http-wait, to a second daemon with a pool of warm units (docs/operations.md "Warm units")"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from ceiling import BENCH_STATE, Ceiling, interpreter_command, new_run, profile_for
from sdrun_flags import flags

INTERPRETER = interpreter_command()  # e.g. /usr/bin/python3 -I -S -u: the runs' own flags
POLL_S = 0.02
TERMINAL = {"succeeded", "failed", "timed_out", "oom_killed", "cancelled", "error"}
PROGRAMS: dict[str, tuple[str, int]] = {  # name -> (code, expected stdout bytes)
    "pass": ("pass\n", 0),
    "print_1mb": ("line = 'x' * 63\nfor _ in range(15625):\n    print(line)\n", 1_000_000),
    "cpu_100ms": ("import time\nend = time.process_time() + 0.1\nwhile time.process_time() < end:\n    pass\n", 0),
}


class Driver:
    def __init__(self, base_url: str, warm_url: str) -> None:
        self.base_url = base_url
        self.warm_url = warm_url
        self.ceiling = Ceiling()
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        (BENCH_STATE / "runs").mkdir(parents=True, exist_ok=True)
        self.ceiling.open()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=120))

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        self.ceiling.close()

    # -- one run per mode ------------------------------------------------------
    async def floor(self, code: str, expect: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            *INTERPRETER, "-c", code, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        _check(proc.returncode == 0 and len(out) == expect,
               f"floor: rc {proc.returncode}, {len(out)} B, {err[-300:]!r}")

    async def systemd_run(self, code: str, expect: int) -> None:
        run_id, run_dir = new_run("s", code.encode())
        options, command = flags(profile_for(run_id, run_dir))
        with open(run_dir.stdin, "rb") as stdin:  # noqa: ASYNC230 (a local file, like the daemon's)
            proc = await asyncio.create_subprocess_exec(
                "systemd-run", "--quiet", "--wait", "--pipe", f"--unit=ubench-sdrun-{run_id}.service",
                *options, *command, stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
        _check(proc.returncode == 0 and len(out) == expect,
               f"systemd-run: rc {proc.returncode}, {len(out)} B, {err[-300:]!r}")

    async def dbus(self, code: str, expect: int) -> None:
        await self.ceiling.run(code.encode())

    async def _submit(self, code: str, wait: bool, base: str | None = None) -> dict[str, Any]:
        assert self.session is not None
        url = (base or self.base_url) + ("/run-json?wait=true" if wait else "/run-json")
        async with self.session.post(url, json={"code": code}) as reply:
            body: dict[str, Any] = await reply.json()
            _check(reply.status == (200 if wait else 202), f"POST: HTTP {reply.status} {body}")
        return body

    async def _output(self, run: dict[str, Any], expect: int, base: str | None = None) -> None:
        assert self.session is not None
        _check(run["state"] == "succeeded", f"run {run['id']}: {run['state']} {run.get('error')}")
        async with self.session.get(f"{base or self.base_url}/output/{run['id']}?stream=stdout") as reply:
            out = await reply.read()
        _check(reply.status == 200 and len(out) == expect, f"output: HTTP {reply.status}, {len(out)} B")

    async def http_wait(self, code: str, expect: int) -> None:
        await self._output(await self._submit(code, wait=True), expect)

    async def http_warm(self, code: str, expect: int) -> None:
        await self._output(await self._submit(code, wait=True, base=self.warm_url), expect, self.warm_url)

    async def http_poll(self, code: str, expect: int) -> None:
        assert self.session is not None
        run_id = (await self._submit(code, wait=False))["id"]
        while True:
            await asyncio.sleep(POLL_S)
            async with self.session.get(f"{self.base_url}/status/{run_id}") as reply:
                run: dict[str, Any] = await reply.json()
            if run["state"] in TERMINAL:
                break
        await self._output(run, expect)

    # -- a batch ---------------------------------------------------------------
    async def batch(self, mode: str, program: str, concurrency: int, runs: int) -> dict[str, Any]:
        one: Callable[[str, int], Awaitable[None]] = {
            "floor": self.floor, "systemd-run": self.systemd_run, "dbus": self.dbus,
            "http-wait": self.http_wait, "http-poll": self.http_poll, "http-warm": self.http_warm}[mode]
        code, expect = PROGRAMS[program]
        latencies: list[float] = []
        errors: list[str] = []
        todo = iter(range(runs))
        last_report = 0.0

        async def worker() -> None:
            nonlocal last_report
            for _ in todo:
                began = time.perf_counter()
                try:
                    await one(code, expect)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}"[:400])
                else:
                    latencies.append(time.perf_counter() - began)
                now = time.perf_counter()
                if now - last_report > 0.25:
                    last_report = now
                    emit({"progress": len(latencies) + len(errors)})

        cpu = os.times()
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - began
        after = os.times()
        driver_cpu = (after.user - cpu.user) + (after.system - cpu.system)
        children_cpu = (after.children_user - cpu.children_user) + (after.children_system - cpu.children_system)
        return {"latencies": latencies, "wall_s": wall, "errors": len(errors), "error_samples": errors[:3],
                "driver_cpu_s": driver_cpu, "children_cpu_s": children_cpu}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(message)


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def main() -> None:
    driver = Driver(sys.argv[1], sys.argv[2])
    await driver.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    emit({"ready": True})
    try:
        while line := await reader.readline():
            command = json.loads(line)
            if command["cmd"] == "quit":
                break
            if command["cmd"] == "batch":
                emit({"result": await driver.batch(command["mode"], command["program"],
                                                   command["concurrency"], command["runs"])})
    finally:
        await driver.stop()


if __name__ == "__main__":
    asyncio.run(main())
