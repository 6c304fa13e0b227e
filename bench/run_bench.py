"""`make bench`: unitbox against raw systemd-run, in one interleaved run.

Boots the project's systemd test host, starts the daemon in it, and drives
(from bench/driver.py, inside the host) three programs — `pass`, 1 MB of
printing, a 100 ms CPU burn — at concurrency 1, 4 and 16 through five modes:

  floor        the bare interpreter with the runs' flags (python3 -I -S -u -c CODE), no sandbox
  systemd-run  `systemd-run --wait --pipe` with unitbox's whole profile (the baseline)
  dbus         the same units over D-Bus from one asyncio process (the ceiling)
  http-wait    unitbox: POST /run-json?wait=true, then GET the output
  http-poll    unitbox: POST /run-json, GET /status every 20 ms until done, then the output
  http-warm    unitbox warm: as http-wait, to a second daemon keeping a pool of WARM_POOL warm units
               (the other daemon has none); its hit rate is reported beside it

Batches are interleaved (round after round, the modes' order rotated) so that
the noise of a shared machine falls on all modes alike. Also measured: the
daemon's CPU per run (/proc/<pid>/stat, all its threads), PID 1's CPU per
run, the daemon's RSS before/after a soak of N runs, and the event loop's lag
(the daemon's unitbox_event_loop_lag_seconds histogram) under the 16-way load.

Writes bench/results/latest.{json,md,png}; prints the markdown table.
`--profile` also records the daemon with py-spy under a 16-way load."""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ceiling import BENCH_STATE, profile_for  # noqa: E402
from sdrun_flags import script_files  # noqa: E402
from unitbox.rundir import RunDir  # noqa: E402

from tests.support.daemon import Daemon  # noqa: E402
from tests.support.scrape import buckets  # noqa: E402
from tests.support.testhost import TestHost, booted, collect_stale_hosts  # noqa: E402

MODES = ["floor", "systemd-run", "dbus", "http-wait", "http-poll", "http-warm"]
UNITBOX_MODES = ["http-wait", "http-poll", "http-warm"]
PROGRAMS = ["pass", "print_1mb", "cpu_100ms"]
CONCURRENCY = [1, 4, 16]
LABELS = {"floor": "floor (bare python3)", "systemd-run": "systemd-run --wait --pipe", "dbus": "D-Bus ceiling",
          "http-wait": "unitbox wait=true", "http-poll": "unitbox submit+poll", "http-warm": "unitbox warm"}
DAEMON_CONFIG = 'max_concurrent = 32\nlog_target = "journal"\n'
WARM_POOL = 8
COLD_CONFIG = DAEMON_CONFIG + "[warm.default]\nsize = 0\n"
WARM_CONFIG = DAEMON_CONFIG + f"[warm.default]\nsize = {WARM_POOL}\n"
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
RESULTS = REPO / "bench" / "results"
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


# -- the plan ---------------------------------------------------------------------
def runs_per_batch(program: str, concurrency: int, quick: bool) -> int:
    if quick:
        return {1: 2, 4: 4, 16: 16}[concurrency]
    base = {1: 16, 4: 32, 16: 64}[concurrency]
    return base // 2 if program == "cpu_100ms" else base


def plan(quick: bool, rounds: int) -> list[dict[str, Any]]:
    batches = []
    for rnd in range(rounds):
        for concurrency in CONCURRENCY:
            for p_index, program in enumerate(PROGRAMS):
                shift = (rnd + p_index + concurrency) % len(MODES)
                for mode in MODES[shift:] + MODES[:shift]:
                    batches.append({"round": rnd, "mode": mode, "program": program, "concurrency": concurrency,
                                    "runs": runs_per_batch(program, concurrency, quick)})
    return batches


# -- measuring from outside ---------------------------------------------------------
def cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """utime + stime of a process (all its threads), in seconds; with
    `reaped_children`, plus that of its children that have exited."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return sum(int(f) for f in fields[11:15 if reaped_children else 13]) / CLOCK_TICK


def loop_thread_cpu_seconds(pid: int) -> float:
    """The CPU of the daemon's main thread (its event loop); the rest of its
    CPU is in its threads (the store's, and the executor's that create run
    directories)."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def broker_cpu_seconds(daemon_pid: int) -> float:
    """The broker's CPU: the daemon's children, alive (now) and reaped (a
    broker that was replaced). Runs are systemd's children, not the daemon's."""
    live = sum(cpu_seconds(child) for child in children(daemon_pid))
    return live + cpu_seconds(daemon_pid, reaped_children=True) - cpu_seconds(daemon_pid)


def lag_histogram(daemon: Daemon) -> dict[float, int]:
    return buckets(daemon.client.get("/metrics").body.decode(), "unitbox_event_loop_lag_seconds")


def hist_delta(before: dict[float, int], after: dict[float, int]) -> dict[float, int]:
    return {le: after[le] - before.get(le, 0) for le in after}


def hist_quantile(cumulative: dict[float, int], q: float) -> float | None:
    """Upper bound of the bucket holding quantile q (cumulative counts)."""
    total = cumulative.get(math.inf, 0)
    if not total:
        return None
    for le in sorted(cumulative):
        if cumulative[le] >= q * total:
            return le
    return math.inf


class Progress:
    def __init__(self, total: int, out: TextIO = sys.stderr) -> None:
        self.total, self.done, self.out = total, 0, out
        self.began = time.monotonic()
        self.tty = out.isatty()
        self._last_line = 0.0

    def show(self, done: int, label: str) -> None:
        self.done = done
        now = time.monotonic()
        if not self.tty and now - self._last_line < 5 and done < self.total:
            return
        self._last_line = now
        fraction = min(1.0, done / max(1, self.total))
        elapsed = now - self.began
        eta = elapsed / fraction - elapsed if fraction > 0.02 else 0
        bar = "#" * int(fraction * 30)
        line = f"[{bar:<30}] {fraction * 100:5.1f}%  {done}/{self.total} runs  {label:<34} ETA {eta:4.0f}s"
        self.out.write(("\r" + line) if self.tty else line + "\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty:
            self.out.write("\n")


class DriverProcess:
    """bench/driver.py inside the test host, spoken to in JSON lines."""

    def __init__(self, host: TestHost, base_url: str, warm_url: str, log: Path) -> None:
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            host.command(str(REPO / ".venv" / "bin" / "python"), str(REPO / "bench" / "driver.py"), base_url,
                         warm_url),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
        self.log = log
        self._expect("ready")

    def _expect(self, key: str, on_progress: Any = None) -> Any:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            if key in message:
                return message[key]
            if "progress" in message and on_progress:
                on_progress(message["progress"])
        raise RuntimeError(f"the driver died:\n{self.log.read_text()[-3000:]}")

    def batch(self, mode: str, program: str, concurrency: int, runs: int, on_progress: Any = None) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": "batch", "mode": mode, "program": program,
                                          "concurrency": concurrency, "runs": runs}) + "\n")
        return self._expect("result", on_progress)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


# -- the run ----------------------------------------------------------------------
def prepare_host(host: TestHost) -> None:
    """unitbox.slice as an operator installs it, and the baseline's privileged scripts."""
    host.path("/etc/systemd/system/unitbox.slice").write_text((REPO / "units" / "unitbox.slice").read_text())
    host.run("systemctl", "daemon-reload")
    host.sh(f"mkdir -p {BENCH_STATE}/runs")
    profile = profile_for("x", RunDir(Path("/nonexistent"), Path("/nonexistent")))
    for path, script in script_files(profile).items():
        host.path(path).parent.mkdir(parents=True, exist_ok=True)
        host.path(path).write_text(script)


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:  # noqa: PLR0915
    batches = plan(args.quick, args.rounds)
    soak_runs = args.soak
    profile_runs = (150 if args.quick else 600) if args.profile else 0
    warmup = [(mode, program) for program in PROGRAMS for mode in MODES]
    warm = 1 if args.quick else 3
    total = sum(b["runs"] for b in batches) + soak_runs + profile_runs + warm * len(warmup)
    progress = Progress(total)
    done_before = 0
    results: dict[str, Any] = {"batches": [], "machine": machine_info()}

    collect_stale_hosts()
    with booted("bench") as host:
        prepare_host(host)
        daemon = Daemon(host, workdir, config=COLD_CONFIG, name="bench")
        daemon.start()
        warm_daemon = Daemon(host, workdir, config=WARM_CONFIG, name="bench-warm")
        warm_daemon.start()
        driver = None
        try:
            driver = DriverProcess(host, daemon.client.base_url, warm_daemon.client.base_url, workdir / "driver.log")
            pid, pid1 = daemon.pid, host.pid

            def run_batch(mode: str, program: str, concurrency: int, runs: int, label: str) -> dict[str, Any]:
                nonlocal done_before
                assert driver is not None
                target = warm_daemon if mode == "http-warm" else daemon
                tpid = target.pid
                if mode == "http-warm":  # each batch starts with a full pool, as after a pause
                    wait_for_pool(warm_daemon)
                lag0 = lag_histogram(target) if mode in UNITBOX_MODES else {}
                pool0 = warm_counts(warm_daemon) if mode == "http-warm" else {}
                cpu0, broker0, pid1_cpu0 = cpu_seconds(tpid), broker_cpu_seconds(tpid), cpu_seconds(pid1)
                loop0 = loop_thread_cpu_seconds(tpid)
                result = driver.batch(mode, program, concurrency, runs,
                                      lambda n: progress.show(done_before + n, label))
                result["daemon_cpu_s"] = cpu_seconds(tpid) - cpu0
                result["broker_cpu_s"] = broker_cpu_seconds(tpid) - broker0
                result["daemon_loop_cpu_s"] = loop_thread_cpu_seconds(tpid) - loop0
                result["pid1_cpu_s"] = cpu_seconds(pid1) - pid1_cpu0
                if mode in UNITBOX_MODES:
                    result["lag_hist"] = hist_delta(lag0, lag_histogram(target))
                if mode == "http-warm":
                    time.sleep(0.6)  # the counts come with the broker's heartbeat
                    pool1 = warm_counts(warm_daemon)
                    result["warm_hits"] = pool1["hits"] - pool0["hits"]
                    result["warm_misses"] = pool1["misses"] - pool0["misses"]
                    wait_for_pool(warm_daemon)  # its refill is not left to load the next batch of another mode
                done_before += runs
                progress.show(done_before, label)
                if result["errors"]:
                    progress.out.write(f"\n{label}: {result['errors']} failed runs, e.g. {result['error_samples']}\n")
                return dict(result)

            for mode, program in warmup:
                w = run_batch(mode, program, warm, warm, f"warm-up {mode} {program}")
                if not w["latencies"]:
                    raise RuntimeError(f"every warm-up run of {mode} {program} failed, e.g. {w['error_samples'][:1]}: "
                                       "the test host cannot run units; not measuring")
            results["rss_kib_start"] = daemon.rss_kib()
            for b in batches:
                label = f"{b['mode']} {b['program']} x{b['concurrency']}"
                result = run_batch(b["mode"], b["program"], b["concurrency"], b["runs"], label)
                results["batches"].append({**b, **result})
            results["rss_kib_before_soak"] = daemon.rss_kib()
            soak = run_batch("http-wait", "pass", 16, soak_runs, f"soak: {soak_runs} runs x16")
            results["soak"] = {**soak, "runs": soak_runs, "concurrency": 16, "program": "pass", "mode": "http-wait"}
            results["rss_kib_after_soak"] = daemon.rss_kib()
            if profile_runs:
                results["profile"] = profile_unitbox(pid, lambda: run_batch(
                    "http-wait", "pass", 16, profile_runs, f"py-spy: {profile_runs} runs x16"), args.out)
            progress.finish()
            results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        finally:
            if driver is not None:
                driver.close()
            daemon.stop()
            warm_daemon.stop()
    return results


def warm_counts(daemon: Daemon) -> dict[str, float]:
    text = daemon.client.get("/metrics").body.decode()
    return {key: float(m.group(1)) if (m := re.search(rf"^unitbox_warm_{key} (\S+)$", text, re.M)) else 0.0
            for key in ("hits", "misses", "ready")}


def wait_for_pool(daemon: Daemon, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while warm_counts(daemon)["ready"] < WARM_POOL and time.monotonic() < deadline:
        time.sleep(0.2)


def machine_info() -> dict[str, Any]:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_at_start": [round(x, 2) for x in load],
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


# -- py-spy -------------------------------------------------------------------------
def profile_unitbox(pid: int, load: Any, out_dir: Path) -> dict[str, Any]:
    """py-spy in CPU mode (on-CPU samples only: no --gil, no --idle) on the
    daemon and on its broker at once, under `load`."""
    py_spy = shutil.which("py-spy", path=str(REPO / ".venv" / "bin")) or shutil.which("py-spy")
    if py_spy is None:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    targets = {"daemon": pid}
    if broker := children(pid):
        targets["broker"] = broker[0]
    raws = {name: out_dir / f"profile-{name}.collapsed.txt" for name in targets}
    spies = [subprocess.Popen([py_spy, "record", "--pid", str(target), "--rate", "200", "--format", "raw",
                               "--output", str(raws[name]), "--threads"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, target in targets.items()]
    time.sleep(1.0)
    try:
        batch = load()
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(30)
    runs = len(batch["latencies"])
    summary: dict[str, Any] = {"runs": runs, "batch": {k: batch[k] for k in ("wall_s", "errors", "daemon_cpu_s",
                                                                            "broker_cpu_s")}}
    for name, raw in raws.items():
        summary[name] = summarize_profile(raw) if raw.exists() else {"error": "py-spy wrote nothing"}
        summary[name]["cpu_ms_per_run"] = 1000 * batch[f"{name}_cpu_s"] / max(1, runs)
        if "error" not in summary[name]:
            summary[name]["ms_per_run_by_module"] = cost_per_run(summary[name])
        if raw.exists():  # keep it for a flame graph (speedscope reads it), compressed
            with raw.open("rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            raw.unlink()
    return summary


def _frame_name(frame: str) -> str:
    """'func (path/to/file.py:12)' → 'file.py:func'."""
    match = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not match:
        return frame
    return f"{Path(match[2]).name}:{match[1]}"


# Leaves where a thread waits rather than runs. py-spy cannot tell idle
# threads of a process in another pid namespace (the test host's) by their
# OS state, so waits are dropped here: what is left is on-CPU time.
IDLE_LEAVES = frozenset({"selectors.py:EpollSelector.select", "thread.py:_worker",
                         "unix_events.py:ThreadedChildWatcher._do_waitpid", "threading.py:Condition.wait",
                         "threading.py:Event.wait", "queue.py:Queue.get"})


def summarize_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    self_time: dict[str, int] = defaultdict(int)
    inclusive: dict[str, int] = defaultdict(int)
    modules: dict[str, int] = defaultdict(int)
    threads: dict[str, int] = defaultdict(int)
    total = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread, frames = frames[0], [_frame_name(f) for f in frames[1:]]
        if not frames or frames[-1] in IDLE_LEAVES:
            idle += count
            continue
        total += count
        threads[thread] += count
        self_time[frames[-1]] += count
        modules[frames[-1].split(":")[0]] += count
        for name in set(frames):
            inclusive[name] += count

    def ranked(table: dict[str, int]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / max(1, total), 1))
                for name, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]]
    return {"samples": total, "idle_samples_dropped": idle, "threads": ranked(threads),
            "self_pct": ranked(self_time), "inclusive_pct": ranked(inclusive), "module_self_pct": ranked(modules)}


def cost_per_run(part: dict[str, Any]) -> list[tuple[str, float]]:
    """Each module's share of the on-CPU samples, as ms of CPU per run."""
    return [(module, round(pct * part["cpu_ms_per_run"] / 100, 3)) for module, pct in part["module_self_pct"]]


# -- the numbers ----------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def aggregate(results: dict[str, Any]) -> dict[str, Any]:
    cells: dict[tuple[str, str, int], dict[str, Any]] = {}
    for b in results["batches"]:
        cell = cells.setdefault((b["program"], b["mode"], b["concurrency"]), {
            "latencies": [], "wall_s": 0.0, "errors": 0, "daemon_cpu_s": 0.0, "broker_cpu_s": 0.0, "pid1_cpu_s": 0.0,
            "lag_hist": defaultdict(int), "error_samples": [], "warm_hits": 0, "warm_misses": 0})
        cell["latencies"] += b["latencies"]
        cell["wall_s"] += b["wall_s"]
        cell["errors"] += b["errors"]
        cell["error_samples"] += b["error_samples"]
        cell["daemon_cpu_s"] += b["daemon_cpu_s"]
        cell["broker_cpu_s"] += b.get("broker_cpu_s", 0.0)
        cell["pid1_cpu_s"] += b["pid1_cpu_s"]
        cell["warm_hits"] += b.get("warm_hits", 0)
        cell["warm_misses"] += b.get("warm_misses", 0)
        for le, n in b.get("lag_hist", {}).items():
            cell["lag_hist"][float(le)] += n
    table = []
    for (program, mode, concurrency), cell in cells.items():
        runs = len(cell["latencies"])
        table.append({
            "program": program, "mode": mode, "concurrency": concurrency, "runs": runs, "errors": cell["errors"],
            "error_samples": cell["error_samples"][:3],
            "throughput": runs / cell["wall_s"] if cell["wall_s"] else 0.0,
            "p50_ms": _ms(percentile(cell["latencies"], 0.5)), "p90_ms": _ms(percentile(cell["latencies"], 0.9)),
            "p99_ms": _ms(percentile(cell["latencies"], 0.99)),
            "daemon_cpu_ms_per_run": 1000 * cell["daemon_cpu_s"] / runs if runs else None,
            "broker_cpu_ms_per_run": 1000 * cell["broker_cpu_s"] / runs if runs else None,
            "unitbox_cpu_ms_per_run": 1000 * (cell["daemon_cpu_s"] + cell["broker_cpu_s"]) / runs if runs else None,
            "pid1_cpu_ms_per_run": 1000 * cell["pid1_cpu_s"] / runs if runs else None,
            "lag_hist": dict(cell["lag_hist"]),
            "warm_hit_rate": (cell["warm_hits"] / (cell["warm_hits"] + cell["warm_misses"])
                              if cell["warm_hits"] + cell["warm_misses"] else None),
        })
    key = {(r["program"], r["mode"], r["concurrency"]): r for r in table}
    for row in table:
        base = key.get((row["program"], "systemd-run", row["concurrency"]))
        ceiling = key.get((row["program"], "dbus", row["concurrency"]))
        row["x_systemd_run"] = _ratio(row["throughput"], base["throughput"] if base else None)
        row["x_ceiling"] = _ratio(row["throughput"], ceiling["throughput"] if ceiling else None)
        row["p50_x_systemd_run"] = _ratio(row["p50_ms"], base["p50_ms"] if base else None)
    table.sort(key=lambda r: (PROGRAMS.index(r["program"]), r["concurrency"], MODES.index(r["mode"])))

    lag16: dict[float, int] = defaultdict(int)
    for row in table:
        if row["mode"] in UNITBOX_MODES and row["concurrency"] == 16:
            for le, n in row["lag_hist"].items():
                lag16[le] += n
    soak = results["soak"]
    for le, n in soak.get("lag_hist", {}).items():
        lag16[float(le)] += n
    wait_rows = [r for r in table if r["mode"] == "http-wait"]
    summary = {
        "rss_kib_start": results["rss_kib_start"], "rss_kib_before_soak": results["rss_kib_before_soak"],
        "rss_kib_after_soak": results["rss_kib_after_soak"],
        "soak_runs": soak["runs"], "soak_errors": soak["errors"],
        "soak_throughput": len(soak["latencies"]) / soak["wall_s"] if soak["wall_s"] else 0.0,
        "soak_daemon_cpu_ms_per_run": 1000 * soak["daemon_cpu_s"] / max(1, len(soak["latencies"])),
        "soak_broker_cpu_ms_per_run": 1000 * soak.get("broker_cpu_s", 0.0) / max(1, len(soak["latencies"])),
        "soak_daemon_loop_cpu_ms_per_run": 1000 * soak.get("daemon_loop_cpu_s", 0.0) / max(1, len(soak["latencies"])),
        "rss_growth_mib_soak": (results["rss_kib_after_soak"] - results["rss_kib_before_soak"]) / 1024,
        "rss_growth_mib_total": (results["rss_kib_after_soak"] - results["rss_kib_start"]) / 1024,
        "lag16_samples": lag16.get(math.inf, 0),
        "lag16_p50_le_s": hist_quantile(lag16, 0.5), "lag16_p99_le_s": hist_quantile(lag16, 0.99),
        "lag16_hist": dict(lag16),
        "daemon_cpu_ms_per_run_wait": {f"{r['program']} x{r['concurrency']}": r["daemon_cpu_ms_per_run"]
                                       for r in wait_rows},
        "unitbox_cpu_ms_per_run_wait": {f"{r['program']} x{r['concurrency']}": r["unitbox_cpu_ms_per_run"]
                                        for r in wait_rows},
    }
    return {"table": table, "summary": summary, "targets": targets(table, summary)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(table: list[dict[str, Any]], summary: dict[str, Any]) -> list[dict[str, Any]]:
    wait = [r for r in table if r["mode"] == "http-wait"]

    def worst(rows: list[dict[str, Any]], field: str, low: bool = True) -> dict[str, Any]:
        rows = [r for r in rows if r[field] is not None]
        return (min if low else max)(rows, key=lambda r: r[field])

    t: list[dict[str, Any]] = []
    w = worst(wait, "x_systemd_run")
    t.append({"target": "throughput ≥ 1.0 × systemd-run at every concurrency (unitbox wait=true)",
              "value": f"worst {w['x_systemd_run']:.2f}× ({w['program']} x{w['concurrency']})",
              "met": all(r["x_systemd_run"] >= 1.0 for r in wait if r["x_systemd_run"] is not None)})
    w = worst(wait, "x_ceiling")
    t.append({"target": "throughput ≥ 0.9 × the D-Bus ceiling (unitbox wait=true)",
              "value": f"worst {w['x_ceiling']:.2f}× ({w['program']} x{w['concurrency']})",
              "met": all(r["x_ceiling"] >= 0.9 for r in wait if r["x_ceiling"] is not None)})
    c1 = [r for r in wait if r["concurrency"] == 1]
    w = worst(c1, "p50_x_systemd_run", low=False)
    t.append({"target": "p50 latency ≤ systemd-run at concurrency 1 (unitbox wait=true)",
              "value": f"worst {w['p50_x_systemd_run']:.2f}× ({w['program']}: {w['p50_ms']:.1f} ms)",
              "met": all(r["p50_x_systemd_run"] <= 1.0 for r in c1 if r["p50_x_systemd_run"] is not None)})
    for program, most in (("pass", 2.0), ("print_1mb", 5.0)):
        rows = [r for r in wait if r["program"] == program]
        w = worst(rows, "unitbox_cpu_ms_per_run", low=False)
        t.append({"target": f"unitbox CPU (daemon + broker) ≤ {most:g} ms per run ({program}, wait=true, "
                            "worst concurrency)",
                  "value": f"{w['unitbox_cpu_ms_per_run']:.2f} ms (daemon {w['daemon_cpu_ms_per_run']:.2f} + "
                           f"broker {w['broker_cpu_ms_per_run']:.2f}, x{w['concurrency']})",
                  "met": w["unitbox_cpu_ms_per_run"] <= most})
    warm = {(r["program"], r["concurrency"]): r for r in table if r["mode"] == "http-warm"}
    if (one := warm.get(("pass", 1))) is not None and one["p50_ms"] is not None:
        t.append({"target": "unitbox warm: p50 ≤ 7 ms, p99 ≤ 20 ms (pass, concurrency 1, wait=true)",
                  "value": f"p50 {one['p50_ms']:.1f} ms, p99 {one['p99_ms']:.1f} ms "
                           f"(hit rate {_f(100 * (one['warm_hit_rate'] or 0), '.0f')} %)",
                  "met": one["p50_ms"] <= 7 and one["p99_ms"] <= 20})
    cold = {(r["program"], r["concurrency"]): r for r in wait}
    saturated = [(w, cold[k]) for k, w in warm.items() if k[1] == 16 and k in cold]
    if saturated:
        lowest = min(saturated, key=lambda pair: pair[0]["throughput"] / max(pair[1]["throughput"], 1e-9))
        t.append({"target": "unitbox warm: throughput at 16-way not below the cold path's",
                  "value": f"worst {lowest[0]['throughput'] / max(lowest[1]['throughput'], 1e-9):.2f}× "
                           f"({lowest[0]['program']})",
                  "met": all(w["throughput"] >= 0.95 * c["throughput"] for w, c in saturated)})
    before, after = summary["rss_kib_before_soak"] / 1024, summary["rss_kib_after_soak"] / 1024
    t.append({"target": f"RSS growth < 20 MB over {summary['soak_runs']} runs",
              "value": f"{summary['rss_growth_mib_soak']:+.1f} MiB ({before:.0f} → {after:.0f} MiB)",
              "met": summary["rss_growth_mib_soak"] < 20})
    p99 = summary["lag16_p99_le_s"]
    t.append({"target": "event-loop lag p99 < 20 ms at 16-way",
              "value": "no samples" if p99 is None else f"≤ {p99 * 1000:g} ms (histogram bucket)",
              "met": p99 is not None and p99 <= 0.02})
    return t


def _f(value: float | None, fmt: str = ".1f") -> str:
    return "–" if value is None else format(value, fmt)


def markdown(report: dict[str, Any], meta: dict[str, Any]) -> str:
    load = f"load average {meta['loadavg_at_start'][0]} at the start"
    if "loadavg_at_end" in meta:
        load += f", {meta['loadavg_at_end'][0]} at the end"
    lines = [f"unitbox benchmark, {meta['date']} ({meta['mode']}, {meta['rounds']} interleaved rounds, "
             f"{meta['seconds']:.0f} s; {meta['cpus']} CPUs, {load}). Latency in ms; ×sd-run and ×ceiling are "
             "throughput ratios; p50 ×sd-run is a latency ratio (lower is better).", ""]
    for program in PROGRAMS:
        lines += [f"**{program}**", "",
                  "| conc | mode | runs/s | p50 | p90 | p99 | ×sd-run | ×ceiling | p50 ×sd-run "
                  "| unitbox CPU ms/run (daemon + broker) | PID 1 CPU ms/run | errors |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["table"]:
            if r["program"] != program:
                continue
            daemon_cpu = (f"{_f(r['unitbox_cpu_ms_per_run'], '.2f')} ({_f(r['daemon_cpu_ms_per_run'], '.2f')} + "
                          f"{_f(r['broker_cpu_ms_per_run'], '.2f')})") if r["mode"] in UNITBOX_MODES else ""
            label = LABELS[r["mode"]]
            if r.get("warm_hit_rate") is not None:
                label += f" ({100 * r['warm_hit_rate']:.0f} % warm)"
            lines.append(
                f"| {r['concurrency']} | {label} | {_f(r['throughput'])} | {_f(r['p50_ms'])} | "
                f"{_f(r['p90_ms'])} | {_f(r['p99_ms'])} | {_f(r['x_systemd_run'], '.2f')} | "
                f"{_f(r['x_ceiling'], '.2f')} | {_f(r['p50_x_systemd_run'], '.2f')} | {daemon_cpu} | "
                f"{_f(r['pid1_cpu_ms_per_run'], '.2f')} | {r['errors']} |")
        lines.append("")
    s = report["summary"]
    lines += [f"Soak: {s['soak_runs']} `pass` runs at 16-way over HTTP (wait=true): "
              f"{s['soak_throughput']:.1f} runs/s, {s['soak_errors']} errors, CPU per run: daemon "
              f"{s['soak_daemon_cpu_ms_per_run']:.2f} ms (its event loop "
              f"{s.get('soak_daemon_loop_cpu_ms_per_run', 0.0):.2f}) + broker "
              f"{s['soak_broker_cpu_ms_per_run']:.2f} ms, "
              f"RSS {s['rss_kib_start'] / 1024:.1f} MiB after warm-up → "
              f"{s['rss_kib_before_soak'] / 1024:.1f} MiB before the soak → {s['rss_kib_after_soak'] / 1024:.1f} MiB "
              f"after. Event-loop lag at 16-way ({s['lag16_samples']} samples of a 50 ms sleep): p50 ≤ "
              f"{_f(s['lag16_p50_le_s'] and s['lag16_p50_le_s'] * 1000, 'g')} ms, p99 ≤ "
              f"{_f(s['lag16_p99_le_s'] and s['lag16_p99_le_s'] * 1000, 'g')} ms.", "",
              "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (make bench installs it)", file=sys.stderr)
        return False
    styles = {"floor": ("#999999", ":", "o"), "systemd-run": ("#d62728", "--", "s"), "dbus": ("#7f7f7f", "-.", "^"),
              "http-wait": ("#1f77b4", "-", "o"), "http-poll": ("#17becf", "-", "D"),
              "http-warm": ("#2ca02c", "-", "*")}
    fig, axes = plt.subplots(2, len(PROGRAMS), figsize=(5 * len(PROGRAMS), 8), constrained_layout=True)
    for col, program in enumerate(PROGRAMS):
        for row, (field, title) in enumerate([("throughput", "runs/s"), ("p50_ms", "p50 latency (ms)")]):
            ax = axes[row][col]
            for mode in MODES:
                rows = [r for r in report["table"] if r["program"] == program and r["mode"] == mode]
                rows.sort(key=lambda r: r["concurrency"])
                color, dash, marker = styles[mode]
                ax.plot([r["concurrency"] for r in rows], [r[field] for r in rows], dash, color=color, marker=marker,
                        label=LABELS[mode], linewidth=2 if mode.startswith("http") else 1.3)
            ax.set_xscale("log", base=2)
            ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
            ax.set_xlabel("concurrency")
            ax.set_ylabel(title)
            if field == "throughput":
                ax.set_yscale("log")  # the floor is far above: ratios read as distances
            else:
                ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.set_title(f"{program}: {title}")
    axes[0][0].legend(fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def update_readme(md: str) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        print(f"README.md has no {README_START} … {README_END} block: not updated", file=sys.stderr)
        return
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{md}\n![benchmark](bench/results/latest.png)\n{README_END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round (under a minute)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; 1 with --quick)")
    parser.add_argument("--soak", type=int, help="runs for the RSS soak (default 5000; 100 with --quick)")
    parser.add_argument("--profile", action="store_true", help="also record the daemon with py-spy at 16-way")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md's Benchmark section")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report", type=Path, metavar="RAW_JSON",
                        help="measure nothing: render the report again from a run's raw-*.json")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.soak = args.soak if args.soak is not None else (100 if args.quick else 5000)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "latest"
    if args.report:
        results = json.loads(args.report.read_text())
    else:
        if os.geteuid() != 0:
            print("make bench boots a systemd test host and needs root", file=sys.stderr)
            return 2
        began = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="unitbox-bench-", dir="/var/tmp") as tmp:
            try:
                results = measure(args, Path(tmp))
            except BaseException:
                for log in Path(tmp).glob("*.log"):
                    print(f"--- {log.name} (last lines)\n{log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
                raise
        results["meta"] = {**results["machine"], "mode": "quick" if args.quick else "full", "rounds": args.rounds,
                           "seconds": round(time.monotonic() - began, 1)}
        (args.out / f"raw-{stem}.json").write_text(json.dumps(results, default=str) + "\n")
    report = aggregate(results)
    meta = results["meta"]
    md = markdown(report, meta)
    document = {"meta": meta, **report, "raw_batches": [{k: v for k, v in b.items() if k != "latencies"}
                                                         for b in results["batches"]]}
    if "profile" in results:
        document["profile"] = results["profile"]
    (args.out / f"{stem}.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(md)
    drew = chart(report, args.out / f"{stem}.png")
    print(md)
    if "profile" in results:
        print(profile_text(results["profile"]))
    print(f"wrote {args.out}/{stem}.json, {stem}.md{', ' + stem + '.png' if drew else ''} "
          f"in {meta['seconds']:.0f} s", file=sys.stderr)
    if args.readme:
        update_readme(md)
    return 0


def profile_text(profile: dict[str, Any]) -> str:
    if "error" in profile:
        return f"py-spy: {profile['error']}"
    lines = [f"py-spy (CPU mode) over {profile['runs']} runs at 16-way in {profile['batch']['wall_s']:.1f} s"]
    for name in ("daemon", "broker"):
        part = profile.get(name)
        if part is None or "error" in part:
            lines.append(f"{name}: {part['error'] if part else 'not found'}")
            continue
        lines += [f"{name}: {part['samples']} samples, {part['cpu_ms_per_run']:.2f} ms CPU per run; threads: "
                  + ", ".join(f"{n} {p}%" for n, p in part["threads"][:4]), "  top self time:"]
        lines += [f"    {p:5.1f}%  {n}" for n, p in part["self_pct"][:12]]
        lines += ["  CPU ms per run, by module (self time):"]
        lines += [f"    {ms:6.3f}  {n}" for n, ms in part.get("ms_per_run_by_module", [])[:15]]
        lines += ["  top inclusive:"] + [f"    {p:5.1f}%  {n}" for n, p in part["inclusive_pct"][:20]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
