"""The attack catalogue, part 1: hostile use of time, memory, processes, CPU,
disk and output (issue 5). Each test submits a hostile program through the
HTTP API to the real daemon on the systemd test host and asserts the run's
state, exit/signal and the observable effect of the protection; the hostile
programs print what they achieved, so a missing protection shows up as a
different observation, not as a silent pass."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.daemon import Client, Daemon
from tests.support.hostile import (
    MiB,
    contained_afterwards,
    finished,
    report_of,
    run_hostile,
    slice_pids,
    submit_hostile,
    wait_output,
)
from tests.support.pace import TIME_SCALE, scaled
from tests.support.testhost import TestHost, wait_until


@pytest.fixture(scope="module", autouse=True)
def _contained(daemon: Daemon, testhost: TestHost) -> Iterator[None]:
    yield from contained_afterwards(daemon, testhost)


# -- time ---------------------------------------------------------------------------------------

# Long enough for the program to start and report (seconds of CPU under emulation).
DEADLINE_S = scaled(1)


def test_sleep_forever_times_out_at_the_deadline(client: Client, testhost: TestHost) -> None:
    began = time.monotonic()
    run = run_hostile(client, "report(sleeping=True)\nimport time\ntime.sleep(10**6)\nreport(woke=True)",
                      timeout_s=DEADLINE_S)
    assert run["state"] == "timed_out", run
    assert (run["exit_code"], run["signal"]) == (None, "SIGKILL")  # RuntimeMaxSec's stop: KillSignal=SIGKILL
    assert report_of(run) == {"sleeping": True}
    assert DEADLINE_S * 900 <= run["duration_ms"] < (DEADLINE_S + scaled(1)) * 1000, run["duration_ms"]
    assert time.monotonic() - began < DEADLINE_S + scaled(3)
    assert run["unit"] not in testhost.units()


def test_sigterm_handler_cannot_delay_the_deadline(client: Client) -> None:
    code = (
        "import signal, time\n"
        "def handler(signum, frame):\n"
        "    report(got=signal.Signals(signum).name)\n"
        "signal.signal(signal.SIGTERM, handler)\n"
        "report(armed=True)\n"
        "while True:\n"
        "    time.sleep(0.01)\n"
    )
    began = time.monotonic()
    run = run_hostile(client, code, timeout_s=DEADLINE_S)
    elapsed = time.monotonic() - began
    assert run["state"] == "timed_out", run
    assert (run["exit_code"], run["signal"]) == (None, "SIGKILL")
    assert report_of(run) == {"armed": True}  # killed at the deadline: no SIGTERM to catch and stall on
    # generous margin for a loaded CI machine
    assert DEADLINE_S * 0.9 <= elapsed < DEADLINE_S + scaled(2), elapsed


def test_all_signals_blocked_busy_loop_is_sigkilled_after_the_deadline(client: Client) -> None:
    code = (
        "import signal\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})\n"
        "report(blocked=len(signal.pthread_sigmask(signal.SIG_BLOCK, [])))\n"
        "while True:\n"
        "    pass\n"
    )
    began = time.monotonic()
    run = run_hostile(client, code, timeout_s=DEADLINE_S)
    assert run["state"] == "timed_out", run
    assert run["signal"] == "SIGKILL"
    assert report_of(run)["blocked"] > 30
    assert time.monotonic() - began < DEADLINE_S + scaled(4)


def test_self_stopped_run_is_still_ended_at_the_deadline(client: Client) -> None:
    # SIGSTOP itself (and its child): a stopped process cannot act on SIGTERM,
    # but systemd follows with SIGCONT, then SIGKILL.
    code = ("import signal\nif os.fork() == 0:\n    os.kill(os.getpid(), signal.SIGSTOP)\n"
            "report(stopping=True)\nos.kill(os.getpid(), signal.SIGSTOP)\nreport(resumed=True)\n")
    began = time.monotonic()
    run = run_hostile(client, code, timeout_s=DEADLINE_S)
    assert run["state"] == "timed_out", run
    assert run["signal"] in ("SIGTERM", "SIGKILL"), run
    assert report_of(run) == {"stopping": True}
    assert time.monotonic() - began < DEADLINE_S + scaled(4)


def test_child_outliving_its_parent_is_killed_with_the_run(client: Client, testhost: TestHost) -> None:
    code = (
        "import os, signal, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.setsid()\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "    while True:\n"
        "        os.write(1, b'child alive\\n'); time.sleep(0.05)\n"
        "time.sleep(0.3)\n"
        "report(parent_exits=True, child=pid)\n"
    )
    began = time.monotonic()
    run = run_hostile(client, code, timeout_s=30)
    assert run["exit_code"] == 0  # the run is its main process: it exited 0
    assert report_of(run)["parent_exits"] is True
    assert "child alive" in run["stdout"]
    # The child ignores SIGTERM: KillMode=control-group SIGKILLs it 1 s later;
    # far from the 30 s timeout or the child's "forever".
    assert time.monotonic() - began < 6
    assert slice_pids(testhost) == []
    later = client.get(f"/output/{run['id']}").json()["stdout"]
    time.sleep(0.3)
    assert client.get(f"/output/{run['id']}").json()["stdout"] == later  # nobody is writing any more
    _assert_exit_reported_not_timeout(run)


def _assert_exit_reported_not_timeout(run: dict[str, object]) -> None:
    """A leftover SIGTERM-ignoring process makes systemd's stop of the unit
    time out (Result=timeout) after the main process exited 0: that is not
    the run reaching timeout_s, and must be reported as the exit it was."""
    assert run["state"] == "succeeded", run


# -- memory -------------------------------------------------------------------------------------

def test_one_gigabyte_allocation_is_oom_killed(client: Client) -> None:
    run = run_hostile(client, "report(start=True)\nb = bytearray(1 << 30)\nreport(allocated=len(b))", memory_mb=64)
    assert run["state"] == "oom_killed", run
    assert (run["exit_code"], run["signal"]) == (None, "SIGKILL")
    assert report_of(run) == {"start": True}
    assert run["memory_peak_bytes"] is not None and run["memory_peak_bytes"] <= 65 * MiB


def test_slow_memory_growth_is_oom_killed_near_memory_mb(client: Client) -> None:
    code = (
        "import time\n"
        "chunks = []\n"
        "for i in range(1, 200):\n"
        "    chunks.append(bytearray(2 << 20))\n"
        "    report(mb=2 * i)\n"
        "    time.sleep(0.005)\n"
        "report(escaped=True)\n"
    )
    run = run_hostile(client, code, memory_mb=64, timeout_s=10)
    assert run["state"] == "oom_killed", run
    assert run["signal"] == "SIGKILL"
    reached = report_of(run)["mb"]
    assert 32 <= reached <= 64, reached  # grew to near the limit (the interpreter needs ~10 MB), never past it
    assert run["memory_peak_bytes"] <= 65 * MiB


def test_two_children_share_one_memory_limit(client: Client) -> None:
    # Each child stays under memory_mb on its own (60 of 96 MB); together they
    # are over it. A per-process limit would let both live; the cgroup does not.
    code = (
        "import os, time\n"
        "kids = []\n"
        "for _ in range(2):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        hold = [bytearray(4 << 20) for _ in range(15)]\n"
        "        time.sleep(1.5)\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "statuses = [os.waitpid(k, 0)[1] for k in kids]\n"
        "killed = [os.WIFSIGNALED(s) and os.WTERMSIG(s) for s in statuses]\n"
        "report(killed=killed)\n"
        "sys.exit(3 if any(killed) else 0)\n"
    )
    run = run_hostile(client, code, memory_mb=96, timeout_s=10)
    assert run["state"] == "oom_killed", run
    if run["stdout"]:  # cgroup v1: the parent survives and tells what happened to its children
        assert 9 in report_of(run)["killed"]  # at least one child got SIGKILL from the OOM killer
    assert run["memory_peak_bytes"] <= 97 * MiB


def test_memfd_filling_is_charged_to_the_memory_limit(client: Client) -> None:
    code = (
        "fds = []\n"
        "first = os.memfd_create('probe')\n"
        "huge = attempt(os.ftruncate, first, 1 << 40)\n"
        "report(huge=huge)\n"
        "for i in range(1, 100):\n"
        "    fd = os.memfd_create(f'fill{i}')\n"
        "    os.write(fd, b'x' * (4 << 20))\n"
        "    fds.append(fd)\n"
        "    report(huge=huge, mb=4 * i)\n"
        "report(escaped=True)\n"
    )
    run = run_hostile(client, code, memory_mb=64, disk_mb=16, timeout_s=10)
    assert run["state"] == "oom_killed", run
    assert run["signal"] == "SIGKILL"
    seen = report_of(run)
    assert seen["huge"] == "EFBIG"  # LimitFSIZE also bounds a memfd
    assert 24 <= seen["mb"] <= 64, seen  # shared memory is the run's memory: killed near memory_mb


def test_huge_anonymous_mmap_is_oom_killed_when_touched(client: Client) -> None:
    code = (
        "import mmap\n"
        "m = mmap.mmap(-1, 1 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
        "report(mapped=len(m) >> 20)\n"
        "for off in range(0, len(m), 4096):\n"
        "    m[off] = 1\n"
        "report(touched=True)\n"
    )
    run = run_hostile(client, code, memory_mb=64, timeout_s=10)
    assert run["state"] == "oom_killed", run
    assert run["signal"] == "SIGKILL"
    # 16 times memory_mb, yet within the RAM of a small VM: Linux's default
    # overcommit refuses outright one mapping larger than RAM + swap.
    assert report_of(run) == {"mapped": 1024}  # mapping address space is free; touching it is not
    assert run["memory_peak_bytes"] <= 65 * MiB


# -- processes ----------------------------------------------------------------------------------

def test_fork_bomb_stops_at_tasks_limit(client: Client, testhost: TestHost, daemon: Daemon) -> None:
    # Every process forks forever and shrugs off EAGAIN: the classic bomb.
    code = (
        "root = os.getpid()\n"
        "told = False\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError as e:\n"
        "        if os.getpid() == root and not told:\n"
        "            told = True\n"
        "            os.write(1, (json.dumps({'first_error': errno.errorcode[e.errno]}) + '\\n').encode())\n"
    )
    run_id = submit_hostile(client, code, tasks=24, timeout_s=2)
    peak, health = 0, []
    while (status := client.status(run_id))["state"] in ("queued", "starting", "running"):
        unit = status["unit"]
        current = testhost.run("systemctl", "show", "-P", "TasksCurrent", unit, check=False).stdout.strip()
        if current.isdigit():
            peak = max(peak, int(current))
        health.append(daemon.client.get("/healthz", timeout=5).status)
        time.sleep(0.05)
    run = finished(client, run_id)
    assert run["state"] == "timed_out", (run["error"], testhost.run(
        "journalctl", "--no-pager", "-o", "short-precise", f"UNITBOX_RUN_ID={run_id}", check=False).stdout[-3000:])
    assert run["signal"] in ("SIGTERM", "SIGKILL")
    assert report_of(run) == {"first_error": "EAGAIN"}
    assert 20 <= peak <= 24, peak  # it did fill the budget, and never went past it
    assert set(health) == {200}
    assert wait_until(lambda: slice_pids(testhost) == [], 5)


def test_thread_bomb_stops_at_tasks_limit(client: Client) -> None:
    code = (
        "import threading\n"
        "stop = threading.Event()\n"
        "n, error = 0, None\n"
        "while n < 5000:\n"
        "    try:\n"
        "        threading.Thread(target=stop.wait, daemon=True).start()\n"
        "    except RuntimeError as e:\n"
        "        error = str(e); break\n"
        "    n += 1\n"
        "report(threads=n, error=error)\n"
    )
    run = run_hostile(client, code, tasks=16)
    assert run["state"] == "succeeded", run
    assert report_of(run) == {"threads": 15, "error": "can't start new thread"}  # + the main thread = 16


def test_multiprocessing_pool_within_limits_works(client: Client) -> None:
    code = (
        "import multiprocessing\n"
        "def square(x):\n"
        "    return x * x\n"
        "if __name__ == '__main__':\n"
        "    with multiprocessing.Pool(4) as pool:\n"
        "        report(total=sum(pool.map(square, range(1000))), workers=len(multiprocessing.active_children()))\n"
    )
    run = run_hostile(client, code, tasks=32, memory_mb=256)
    assert run["state"] == "succeeded", run
    assert report_of(run) == {"total": sum(x * x for x in range(1000)), "workers": 4}


def test_double_forked_daemon_ignoring_sigterm_dies_with_the_run(client: Client, testhost: TestHost) -> None:
    code = (
        "import signal, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "        signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "        for fd in (0, 1, 2): os.close(fd)\n"
        "        while True: time.sleep(1)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "report(daemonized=True)\n"
    )
    began = time.monotonic()
    run = run_hostile(client, code, timeout_s=30)
    assert run["exit_code"] == 0
    assert report_of(run) == {"daemonized": True}
    assert time.monotonic() - began < 6  # SIGKILLed 1 s after the main process exited, not at 30 s
    assert wait_until(lambda: slice_pids(testhost) == [], 5), slice_pids(testhost)
    assert run["unit"] not in testhost.units()
    _assert_exit_reported_not_timeout(run)


def test_moving_out_of_the_run_cgroup_is_refused(client: Client) -> None:
    code = (
        "mine = open('/proc/self/cgroup').read().splitlines()\n"
        "tried = {}\n"
        "for target in ('/sys/fs/cgroup/cgroup.procs', '/sys/fs/cgroup/pids/cgroup.procs',\n"
        "               '/sys/fs/cgroup/memory/cgroup.procs', '/sys/fs/cgroup/unified/cgroup.procs'):\n"
        "    tried[target] = attempt(lambda: open(target, 'w').write(str(os.getpid())))\n"
        "report(tried=tried, moved=open('/proc/self/cgroup').read().splitlines() != mine)\n"
    )
    run = run_hostile(client, code)
    seen = report_of(run)
    # ENOENT: /sys/fs/cgroup is an empty read-only tmpfs in a run (test_attacks_visibility)
    assert set(seen["tried"].values()) <= {"EROFS", "EACCES", "ENOENT"}, seen
    assert seen["moved"] is False


# -- CPU ----------------------------------------------------------------------------------------

def test_busy_threads_are_held_to_cpu_percent(client: Client) -> None:
    # Four threads hashing big buffers (hashlib releases the GIL) for 2 s of
    # wall time: unthrottled that is up to 4 s of CPU on 2 cores; at 50 % it is
    # ~1 s. The bound leaves room for scheduler granularity, not for 2 cores.
    # The program measures its own share of CPU over those 2 s: the run's
    # cpu_ms also holds Python's start, seconds of CPU in an emulated VM.
    code = (
        "import hashlib, threading, time\n"
        "data = b'x' * (1 << 20)\n"
        "def spin():\n"
        "    end = time.monotonic() + 2\n"
        "    while time.monotonic() < end:\n"
        "        hashlib.sha256(data).digest()\n"
        "threads = [threading.Thread(target=spin) for _ in range(4)]\n"
        "cpu, wall = time.process_time(), time.monotonic()\n"
        "for t in threads: t.start()\n"
        "for t in threads: t.join()\n"
        "report(cpu_ms=(time.process_time() - cpu) * 1000, wall_ms=(time.monotonic() - wall) * 1000)\n"
    )
    run = run_hostile(client, code, cpu_percent=50, timeout_s=scaled(10))
    assert run["state"] == "succeeded", run
    spun = report_of(run)
    assert 0.15 <= spun["cpu_ms"] / spun["wall_ms"] <= 0.65, spun  # 300 to 1300 ms in 2 s
    assert run["cpu_ms"] >= spun["cpu_ms"], run["cpu_ms"]  # the run's account holds all of it


@pytest.mark.skipif(TIME_SCALE > 1, reason="a latency bound under load: meaningless where the CPU is emulated")
def test_healthz_answers_fast_while_twenty_busy_runs_execute(client: Client, daemon: Daemon) -> None:
    busy = "import threading\ndef spin():\n    while True: pass\nfor _ in range(2): threading.Thread(target=spin).start()\n"
    with ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(lambda _: client.submit(busy, limits={"timeout_s": 20, "cpu_percent": 100}), range(20)))

    def all_running() -> bool:
        return all(client.status(i)["state"] == "running" for i in ids)
    assert wait_until(all_running, 30, interval=0.2), [client.status(i)["state"] for i in ids]
    latencies = []
    for _ in range(25):
        began = time.monotonic()
        reply = daemon.client.get("/healthz", timeout=5)
        latencies.append(time.monotonic() - began)
        assert reply.status == 200
        time.sleep(0.02)
    assert all_running()  # they were all spinning while we measured
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda i: client.request("POST", f"/runs/{i}/cancel"), ids))
        runs = list(pool.map(client.wait, ids))
    assert {r["state"] for r in runs} == {"cancelled"}
    assert all(r["cpu_ms"] > 0 for r in runs)
    # The spec says 100 ms. The machine is shared (other test hosts, a VM) and
    # has 2 cores for 20 spinning runs + this client: the median must meet the
    # spec, single probes may be late by a scheduler hiccup.
    assert statistics.median(latencies) < 0.1, sorted(latencies)
    assert max(latencies) < 1.0, sorted(latencies)


# -- disk ---------------------------------------------------------------------------------------

def fill_code(places: tuple[str, ...], per_place: int) -> str:
    """A program writing 256 KiB files to each place in turn (at most
    `per_place` bytes there) until ENOSPC; it reports the error, the bytes
    written and each place's used bytes (statvfs)."""
    return (
        "chunk = b'x' * (256 << 10)\n"
        "total, error, used = 0, None, {}\n"
        f"for where in {places!r}:\n"
        f"    for i in range({per_place} // len(chunk)):\n"
        "        try:\n"
        "            with open(os.path.join(where, f'fill{i}'), 'wb') as f: f.write(chunk)\n"
        "        except OSError as e:\n"
        "            error = errno.errorcode[e.errno]; break\n"
        "        total += len(chunk)\n"
        "    fs = os.statvfs(where)\n"
        "    used[where] = (fs.f_blocks - fs.f_bfree) * fs.f_frsize\n"
        "report(error=error, total=total, used=used)\n"
    )


@pytest.mark.parametrize("where", [".", "/tmp", "/var/tmp", "/dev/shm"],
                         ids=["work_dir", "tmp", "var_tmp", "dev_shm"])
def test_filling_a_writable_dir_stops_with_enospc_at_disk_mb(client: Client, where: str) -> None:
    run = run_hostile(client, fill_code((where,), 256 * MiB), disk_mb=8, memory_mb=128)
    assert run["state"] == "succeeded", run
    seen = report_of(run)
    assert seen["error"] == "ENOSPC", seen
    assert 7 * MiB <= seen["total"] <= 8 * MiB, seen


def test_one_disk_budget_holds_for_every_writable_place(client: Client) -> None:
    # /tmp, /var/tmp, /dev/shm, the working directory and out/ are directories
    # of one tmpfs of disk_mb (the box): filling them in turn never gets more
    # than disk_mb in all, and each sees the others' bytes in its statvfs.
    places = ("/tmp", "/var/tmp", "/dev/shm", ".", "/run/unitbox/out")
    run = run_hostile(client, fill_code(places, 2 * MiB), disk_mb=8, memory_mb=128)
    assert run["state"] == "succeeded", run
    seen = report_of(run)
    assert seen["error"] == "ENOSPC", seen
    assert 7 * MiB <= seen["total"] <= 8 * MiB, seen
    assert seen["used"]["/tmp"] >= 2 * MiB and seen["used"]["/run/unitbox/out"] >= 7 * MiB, seen


def test_hundred_thousand_tiny_files_stop_at_disk_mb(client: Client) -> None:
    # Each 1-byte file costs a 4 KiB page of the capped tmpfs: 8 MiB hold 2048.
    code = (
        "n, error = 0, None\n"
        "while n < 100_000:\n"
        "    try:\n"
        "        with open(f'f{n}', 'wb') as f: f.write(b'x')\n"
        "    except OSError as e:\n"
        "        error = errno.errorcode[e.errno]; break\n"
        "    n += 1\n"
        "report(files=n, error=error)\n"
    )
    run = run_hostile(client, code, disk_mb=8, memory_mb=128)
    assert run["state"] == "succeeded", run
    seen = report_of(run)
    assert seen["error"] == "ENOSPC", seen
    assert 1800 <= seen["files"] <= 2048, seen


def test_hundred_thousand_empty_files_stay_within_the_run(client: Client, testhost: TestHost) -> None:
    code = (
        "n, error = 0, None\n"
        "while n < 100_000:\n"
        "    try:\n"
        "        os.close(os.open(f'/tmp/e{n}', os.O_CREAT | os.O_WRONLY, 0o600))\n"
        "    except OSError as e:\n"
        "        error = errno.errorcode[e.errno]; break\n"
        "    n += 1\n"
        "fs = os.statvfs('/tmp')\n"
        "report(files=n, error=error, listed=len(os.listdir('/tmp')), size=fs.f_blocks * fs.f_frsize,\n"
        "       inodes=fs.f_files)\n"
    )
    run = run_hostile(client, code, disk_mb=8, memory_mb=256, timeout_s=20)
    assert run["state"] == "succeeded", run
    seen = report_of(run)
    # Empty files cost no blocks: they fit, in the run's own /tmp, a tmpfs of
    # disk_mb whose inodes are capped too (a million files would get ENOSPC)
    # and whose dentries and inodes are charged to the run's memory.
    assert seen == {"files": 100_000, "error": None, "listed": 100_000, "size": 8 * MiB,
                    "inodes": seen["inodes"]}, seen
    assert 100_000 < seen["inodes"] <= 1_000_000, seen
    assert run["memory_peak_bytes"] <= 257 * MiB
    # Gone with the run: nothing on the host's /tmp or /var/tmp.
    assert testhost.sh("find /tmp /var/tmp -maxdepth 4 -name e99999 | head -1") == ""


def test_terabyte_sparse_file_is_refused_by_the_file_size_limit(client: Client) -> None:
    code = (
        "f = open('sparse', 'wb')\n"
        "grow = attempt(os.truncate, 'sparse', 1 << 40)\n"
        "f.seek(1 << 40)\n"
        "seek_write = attempt(lambda: (f.write(b'x'), f.flush()))\n"
        "under = attempt(os.truncate, 'sparse', 4 << 20)\n"
        "report(grow=grow, seek_write=seek_write, under=under, size=os.stat('sparse').st_size)\n"
    )
    run = run_hostile(client, code, disk_mb=8)
    assert run["state"] == "succeeded", run
    # A sparse file costs no tmpfs blocks: only LimitFSIZE stops it (SIGXFSZ is ignored by Python).
    assert report_of(run) == {"grow": "EFBIG", "seek_write": "EFBIG", "under": "OK", "size": 4 << 20}


def test_writes_everywhere_but_the_private_tmpfs_dirs_are_refused(client: Client) -> None:
    code = (
        "places = set()\n"
        "for line in open('/proc/self/mountinfo'):\n"
        "    places.add(line.split()[4])\n"
        "for top in ('/', '/usr', '/var', '/etc', '/opt', '/srv', '/boot', '/var/lib', '/var/cache', '/var/log',\n"
        "            '/var/spool', '/var/mail', '/var/lib/private', '/var/cache/private', '/var/log/private',\n"
        "            '/run', '/run/lock', '/var/lock', '/dev', '/dev/mqueue', '/root', '/home', '/mnt', '/media',\n"
        "            '/usr/local/bin', '/usr/lib/python3/dist-packages', '/proc/self', '/sys/fs/cgroup'):\n"
        "    places.add(top)\n"
        "writable = []\n"
        "for d in sorted(places):\n"
        "    if attempt(lambda: os.close(os.open(os.path.join(d, '.unitbox-probe'), os.O_CREAT | os.O_WRONLY, 0o600))) == 'OK':\n"
        "        writable.append(d)\n"
        "report(writable=writable, checked=len(places))\n"
    )
    seen = report_of(run_hostile(client, code))
    assert seen["checked"] > 30
    # The box's five binds (one tmpfs of disk_mb); /dev/mqueue is the run's own
    # (PrivateIPC): see the cross-run tests.
    box = {"/dev/shm", "/run/unitbox/work", "/run/unitbox/out", "/tmp", "/var/tmp"}
    assert box <= set(seen["writable"]) <= box | {"/dev/mqueue"}, seen


# -- output -------------------------------------------------------------------------------------

def _flood(client: Client, daemon: Daemon, code: str) -> dict[str, object]:
    before = daemon.rss_kib()
    began = time.monotonic()
    run = run_hostile(client, code, output_kb=1024, timeout_s=30)
    assert time.monotonic() - began < 20  # never blocked or throttled for writing
    grown = daemon.rss_kib() - before
    assert grown < 32 * 1024, f"daemon RSS grew by {grown} KiB while draining 100 MB"
    return run


def test_100_mb_to_stdout_is_capped_and_flagged(client: Client, daemon: Daemon) -> None:
    run = _flood(client, daemon, "chunk = b'o' * (1 << 20)\nfor _ in range(100): sys.stdout.buffer.write(chunk)\n"
                                 "sys.stdout.flush()\nos.write(2, b'wrote 100 MB')\n")
    assert run["state"] == "succeeded", run
    assert (run["stdout_bytes"], run["stdout_truncated"]) == (1024 * 1024, True)
    assert run["stdout"] == "o" * (1024 * 1024)
    assert (run["stderr"], run["stderr_truncated"]) == ("wrote 100 MB", False)


def test_100_mb_to_stderr_is_capped_and_flagged(client: Client, daemon: Daemon) -> None:
    run = _flood(client, daemon, "chunk = b'e' * (1 << 20)\nfor _ in range(100): sys.stderr.buffer.write(chunk)\n"
                                 "sys.stderr.flush()\nprint('wrote 100 MB')\n")
    assert run["state"] == "succeeded", run
    assert (run["stderr_bytes"], run["stderr_truncated"]) == (1024 * 1024, True)
    assert run["stderr"] == "e" * (1024 * 1024)
    assert (run["stdout"], run["stdout_truncated"]) == ("wrote 100 MB\n", False)


def test_100_mb_interleaved_on_both_streams_is_capped_and_flagged(client: Client, daemon: Daemon) -> None:
    code = ("o, e = b'o' * 4096 + b'\\n', b'e' * 4096 + b'\\n'\n"
            "for _ in range(12800):\n"
            "    os.write(1, o); os.write(2, e)\n")
    run = _flood(client, daemon, code)
    assert run["state"] == "succeeded", run
    assert run["stdout_truncated"] is True and run["stderr_truncated"] is True
    assert run["stdout_bytes"] == run["stderr_bytes"] == 1024 * 1024
    assert set(run["stdout"]) == {"o", "\n"} and set(run["stderr"]) == {"e", "\n"}  # never mixed up


def test_one_gigantic_line_is_capped_and_flagged(client: Client, daemon: Daemon) -> None:
    run = _flood(client, daemon, "print('x' * (100 << 20), end='')\nprint('THE END', file=sys.stderr)\n")
    assert run["state"] == "succeeded", run
    assert (run["stdout_bytes"], run["stdout_truncated"]) == (1024 * 1024, True)
    assert "\n" not in run["stdout"]
    assert run["stderr"] == "THE END\n"


def test_invalid_utf8_output_is_kept_raw_and_replaced_in_json(client: Client) -> None:
    raw = b"ok \xff\xfe \xc3\x28 \xed\xa0\x80 end"
    run = client.run(f"import sys\nsys.stdout.buffer.write({raw!r})\n")
    assert run["state"] == "succeeded", run
    assert client.get(f"/output/{run['id']}?stream=stdout").body == raw
    assert run["stdout"] == raw.decode("utf-8", "replace")
    assert run["stdout"].startswith("ok \ufffd\ufffd ")


def test_nul_bytes_in_output_are_kept(client: Client) -> None:
    raw = b"a\x00b\x00\x00c" * 1000
    run = client.run(f"import sys\nsys.stdout.buffer.write({raw!r})\nsys.stderr.buffer.write(b'\\0')\n")
    assert run["state"] == "succeeded", run
    assert client.get(f"/output/{run['id']}?stream=stdout").body == raw
    assert run["stdout"] == raw.decode()
    assert run["stderr"] == "\x00"


def test_lone_surrogates_in_output_are_a_clean_result(client: Client) -> None:
    # Written raw (surrogatepass) they are invalid UTF-8 bytes; printed as
    # text they make Python's strict stdout raise: either way a clean result.
    raw = "\udc80\ud800".encode("utf-8", "surrogatepass")
    run = client.run("import sys\nsys.stdout.buffer.write('\\udc80\\ud800'.encode('utf-8', 'surrogatepass'))\n"
                     "sys.stdout.flush()\nprint('\\ud800')\n")
    assert run["state"] == "failed", run
    assert run["exit_code"] == 1
    assert "UnicodeEncodeError" in run["stderr"]
    assert client.get(f"/output/{run['id']}?stream=stdout").body == raw
    assert run["stdout"] == raw.decode("utf-8", "replace")
    assert "\ud800" not in run["stdout"] and "\udc80" not in run["stdout"]


def test_output_flood_while_another_client_reads_partial_output(client: Client, daemon: Daemon) -> None:
    run_id = submit_hostile(client, "import time\nreport(first=True)\nchunk = b'z' * (1 << 20)\n"
                                    "end = time.monotonic() + 2\n"
                                    "while time.monotonic() < end: os.write(1, chunk)\n",
                            output_kb=512, timeout_s=10)
    wait_output(client, run_id, '{"first": true}')
    sizes = []
    while client.status(run_id)["state"] == "running":
        sizes.append(len(client.get(f"/output/{run_id}?stream=stdout").body))
    run = finished(client, run_id)
    assert run["state"] == "succeeded", run
    assert max(sizes, default=0) <= 512 * 1024
    assert run["stdout_bytes"] == 512 * 1024 and run["stdout_truncated"] is True
