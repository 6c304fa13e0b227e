"""What followers of a run's events (GET /runs/<id>/events) cost the daemon.

Boots the project's systemd test host, starts the daemon in it, and runs a
chatty program (1 MB of 50-byte lines over about 4 s) with no follower,
with N followers, and with N clients that ask for the events and never
read them, connected before it prints; interleaved, R rounds each. For each
round: the daemon's CPU (utime + stime of all its threads, /proc/<pid>/stat)
from the submission to the last follower's `end`, and its RSS (VmRSS
sampled every 50 ms; VmHWM reset through clear_refs) before and at its
peak. Every follower must receive the whole megabyte, in order.

    sudo .venv/bin/python bench/followers.py [--followers 100] [--rounds 3]

Runnable by hand on a quiet machine; not part of `make test` or `make bench`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.daemon import TERMINAL, Daemon  # noqa: E402
from tests.support.testhost import booted  # noqa: E402

LINE = 50
LINES = 20_000  # 1,000,000 bytes
CHATTY = (f"import sys, time\ntime.sleep(1)\nfor i in range({LINES}):\n    print('x' * {LINE - 1})\n"
          "    if i % 500 == 499:\n        sys.stdout.flush()\n        time.sleep(0.1)\n")
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
DAEMON_CONFIG = 'log_target = "journal"\n'


def cases(followers: int) -> list[tuple[int, int]]:
    """(followers reading, followers that never read): none; N reading; N that never read."""
    return [(0, 0), (followers, 0), (0, followers)]


def cpu_s(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key}")


class RssPeak:
    """The highest VmRSS (and VmHWM, after resetting it) while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RssPeak:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kib(self.pid, "VmHWM"))

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_kib(self.pid))


async def follow(session: aiohttp.ClientSession, base: str, run_id: str) -> int:
    """One follower: the run's stdout bytes it received, checked in order."""
    received = 0
    async with session.get(f"{base}/runs/{run_id}/events") as reply:
        assert reply.status == 200, reply.status
        name = ""
        async for raw in reply.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name == "stdout":
                text = json.loads(line[6:])["text"]
                assert text.replace("\n", "") == "x" * len(text.replace("\n", "")), "not the program's output"
                received += len(text.encode())
            elif line.startswith("data: ") and name == "end":
                return received
    raise AssertionError("the stream closed without `end`")


async def stall(base: str, run_id: str) -> asyncio.StreamWriter:
    """A follower that asks for the events and never reads a byte of them."""
    host, port = base.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /runs/{run_id}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    return writer


async def one_round(daemon: Daemon, followers: int, stalled: int = 0) -> dict[str, Any]:
    base = daemon.client.base_url
    pid = daemon.pid
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        rss_before = rss_kib(pid)
        with RssPeak(pid) as peak:
            cpu0 = cpu_s(pid)
            async with session.post(f"{base}/run-json", json={"code": CHATTY, "limits": {
                    "timeout_s": 60, "output_kb": 2048}}) as reply:
                assert reply.status == 202, await reply.text()
                run_id = (await reply.json())["id"]
            tasks = [asyncio.ensure_future(follow(session, base, run_id)) for _ in range(followers)]
            stuck = [await stall(base, run_id) for _ in range(stalled)]
            while True:  # a few status requests, the same with and without followers
                async with session.get(f"{base}/status/{run_id}") as reply:
                    run = await reply.json()
                if run["state"] in TERMINAL:
                    break
                await asyncio.sleep(0.5)
            received = await asyncio.gather(*tasks)
            cpu = cpu_s(pid) - cpu0
        for writer in stuck:
            writer.close()
    assert run["state"] == "succeeded" and run["stdout_bytes"] == LINE * LINES, run
    assert all(r == LINE * LINES for r in received), sorted(set(received))
    return {"followers": followers, "stalled": stalled, "cpu_ms": cpu * 1000, "rss_before_mib": rss_before / 1024,
            "rss_peak_mib": peak.peak / 1024, "rss_growth_mib": (peak.peak - rss_before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--followers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("this boots a systemd test host: run it as root")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as workdir, booted("followers") as host:
        daemon = Daemon(host, Path(workdir), config=DAEMON_CONFIG, name="followers")
        daemon.start()
        try:
            asyncio.run(one_round(daemon, 0))  # warm-up: imports, the runtime's pages, the store
            for _ in range(args.rounds):
                for followers, stalled in cases(args.followers):
                    result = asyncio.run(one_round(daemon, followers, stalled))
                    results.append(result)
                    print(json.dumps({k: round(v, 1) for k, v in result.items()}), flush=True)
        finally:
            daemon.stop()
    print(f"\nmedian of {args.rounds} rounds, a run printing {LINE * LINES:,} bytes in 50-byte lines over ~4 s:")
    print("| followers | not reading | daemon CPU (ms) | daemon RSS before (MiB) | RSS peak (MiB) | growth (MiB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for followers, stalled in cases(args.followers):
        mine = [r for r in results if (r["followers"], r["stalled"]) == (followers, stalled)]
        cells = [statistics.median(r[key] for r in mine)
                 for key in ("cpu_ms", "rss_before_mib", "rss_peak_mib", "rss_growth_mib")]
        print(f"| {followers} | {stalled} | {cells[0]:.0f} | {cells[1]:.1f} | {cells[2]:.1f} | {cells[3]:+.1f} |")


if __name__ == "__main__":
    main()
