"""The run engine on a real systemd: outcomes, limits, isolation (issue 2)."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

from tests.support.daemon import Client, Daemon
from tests.support.hostile import slice_pids
from tests.support.testhost import TestHost, wait_until


def test_print_hello_succeeds(client: Client) -> None:
    run = client.run('print("hello")')
    assert run["state"] == "succeeded"
    assert run["exit_code"] == 0
    assert run["stdout"] == "hello\n"
    assert run["stderr"] == ""
    # Its own unit, or the warm unit it was handed to (broker/warm.py)
    assert run["unit"] == f"unitbox-run-{run['id']}.service" or re.fullmatch(r"unitbox-warm-[0-9a-f]{12}\.service",
                                                                             run["unit"]), run["unit"]
    assert run["cpu_ms"] is not None and run["cpu_ms"] > 0
    assert run["duration_ms"] is not None and run["duration_ms"] > 0
    assert run["started_at"] and run["finished_at"]


def test_sys_exit_3_fails_with_exit_code(client: Client) -> None:
    run = client.run("import sys; sys.exit(3)")
    assert (run["state"], run["exit_code"], run["signal"]) == ("failed", 3, None)


def test_exception_fails_with_traceback_on_stderr(client: Client) -> None:
    run = client.run("def f():\n    raise ValueError('boom')\nf()")
    assert run["state"] == "failed"
    assert run["exit_code"] == 1
    assert "Traceback (most recent call last)" in run["stderr"]
    assert "ValueError: boom" in run["stderr"]
    assert '"<string>"' not in run["stderr"]  # the bootstrap frame is hidden


def test_stdin_is_echoed_back(client: Client) -> None:
    run = client.run("import sys; sys.stdout.write(sys.stdin.read())", stdin="line one\nline two\n")
    assert run["stdout"] == "line one\nline two\n"


def test_args_reach_sys_argv(client: Client) -> None:
    run = client.run("import sys, json; print(json.dumps(sys.argv[1:]))", args=["--flag", "x y", "ünï"])
    assert json.loads(run["stdout"]) == ["--flag", "x y", "ünï"]


def test_infinite_loop_times_out_at_timeout(client: Client) -> None:
    began = time.monotonic()
    run = client.run("while True: pass", limits={"timeout_s": 1})
    assert run["state"] == "timed_out"
    assert time.monotonic() - began < 3.0
    assert 900 <= run["duration_ms"] < 2000


def test_memory_over_limit_is_oom_killed(client: Client) -> None:
    run = client.run("b = bytearray(b'x' * 200 * 1024 * 1024)", limits={"memory_mb": 64})
    # This machine's cgroups are hybrid v1: systemd cannot say oom-kill there,
    # but the run's own memory cgroup counts the OOM kill, which unitbox reads.
    assert run["state"] == "oom_killed", run
    assert run["signal"] == "SIGKILL"
    assert run["memory_peak_bytes"] is not None and run["memory_peak_bytes"] <= 64 * 1024 * 1024 + 1024 * 1024


def test_fork_bomb_stops_at_tasks(client: Client) -> None:
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(n, e.errno)\n"
    )
    run = client.run(code, limits={"tasks": 8, "timeout_s": 10})
    count, errno = run["stdout"].split()
    assert errno == "11"  # EAGAIN
    assert int(count) == 7  # the parent + 7 children = 8 tasks
    assert run["state"] == "succeeded"  # the parent exited; KillMode ends the children


def test_busy_loop_at_20_percent_cpu_uses_at_most_0_6_s(client: Client) -> None:
    code = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 2: pass\n"
    run = client.run(code, limits={"cpu_percent": 20})
    assert run["state"] == "succeeded"
    assert run["cpu_ms"] <= 600, run["cpu_ms"]
    assert run["cpu_ms"] >= 200, run["cpu_ms"]  # it did run, throttled


def test_uid_is_not_root_and_differs_between_concurrent_runs(client: Client) -> None:
    code = "import os, time; print(os.getuid()); time.sleep(1.5)"
    ids = [client.submit(code) for _ in range(2)]
    runs = [client.wait(i) for i in ids]
    uids = [int(client.get(f"/output/{r['id']}").json()["stdout"]) for r in runs]
    assert all(r["state"] == "succeeded" for r in runs)
    assert 0 not in uids
    assert uids[0] != uids[1]


def test_writes_outside_the_work_dir_fail(client: Client) -> None:
    code = (
        "import errno\n"
        "for p in ['/etc/x', '/usr/x', '/var/x', '/home/x', '/x', '/run/unitbox/code/x']:\n"
        "    try:\n"
        "        open(p, 'w')\n"
        "        print(p, 'WRITTEN')\n"
        "    except OSError as e:\n"
        "        print(p, errno.errorcode[e.errno])\n"
    )
    lines = client.run(code)["stdout"].splitlines()
    assert len(lines) == 6
    for line in lines:
        assert line.split()[1] in ("EROFS", "EACCES", "ENOENT"), line


def test_no_network(client: Client) -> None:
    code = (
        "import socket\n"
        "for fam in (socket.AF_INET, socket.AF_INET6):\n"
        "    try:\n"
        "        socket.socket(fam, socket.SOCK_STREAM); print('created')\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__, e.errno)\n"
    )
    out = client.run(code)["stdout"].splitlines()
    assert out == ["OSError 97", "OSError 97"] or all("created" not in line for line in out), out


def test_work_dir_is_writable_and_empty_at_start(client: Client) -> None:
    code = "import os; print(os.getcwd()); print(os.listdir('.')); open('f', 'w').write('x'); print('ok')"
    out = client.run(code)["stdout"].splitlines()
    assert out[1] == "[]"
    assert out[2] == "ok"


def test_files_left_behind_are_gone_in_the_next_run(client: Client) -> None:
    client.run("open('left.txt','w').write('x'); open('/tmp/left.txt','w').write('x'); "
               "open('/var/tmp/left.txt','w').write('x'); open('/dev/shm/left','w').write('x')")
    out = client.run("import os; print([p for p in ['left.txt','/tmp/left.txt','/var/tmp/left.txt','/dev/shm/left'] "
                     "if os.path.exists(p)])")["stdout"]
    assert out.strip() == "[]"


def test_output_over_cap_is_truncated_and_flagged(client: Client) -> None:
    run = client.run("import sys\nfor _ in range(64): sys.stdout.write('x' * 65536)\nprint('done', file=sys.stderr)",
                     limits={"output_kb": 100})
    assert run["state"] == "succeeded"
    assert run["stdout_bytes"] == 100 * 1024
    assert run["stdout_truncated"] is True
    assert run["stderr"] == "done\n"
    assert run["stderr_truncated"] is False


def test_twenty_concurrent_runs_all_finish_and_leave_no_unit(client: Client, testhost: TestHost) -> None:
    codes = [f"import time; time.sleep({i % 3} * 0.2); print({i} * {i})" for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(client.submit, codes))
        runs = list(pool.map(client.wait, ids))
    for i, run in enumerate(runs):
        assert run["state"] == "succeeded", run
        assert client.get(f"/output/{run['id']}").json()["stdout"] == f"{i * i}\n"
    assert wait_until(lambda: not testhost.units(), 10), testhost.units()


def test_live_unit_scores_at_most_1_in_systemd_analyze_security(client: Client, testhost: TestHost) -> None:
    run_id = client.submit("import time; time.sleep(5)")
    assert wait_until(lambda: client.status(run_id)["state"] == "running", 10)
    unit = client.status(run_id)["unit"]
    out = testhost.run("systemd-analyze", "security", "--no-pager", unit, check=False).stdout
    client.request("POST", f"/runs/{run_id}/cancel")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out
    assert float(match.group(1)) <= 1.0


def test_unit_is_visible_to_systemctl_and_journalctl(client: Client, testhost: TestHost) -> None:
    run_id = client.submit("import sys, time; print('to-journal?', file=sys.stderr); time.sleep(3)")
    assert wait_until(lambda: client.status(run_id)["state"] == "running", 10)
    unit = client.status(run_id)["unit"]
    status = testhost.run("systemctl", "status", "--no-pager", unit, check=False).stdout
    assert "unitbox run " + run_id in status
    assert "unitbox.slice" in testhost.run("systemctl", "show", "-P", "Slice", unit).stdout
    client.request("POST", f"/runs/{run_id}/cancel")
    assert client.wait(run_id)["state"] == "cancelled"
    journal = testhost.run("journalctl", "--no-pager", f"UNITBOX_RUN_ID={run_id}", check=False).stdout
    assert run_id in journal


def test_cancel_of_a_sleeping_run_is_prompt(client: Client, testhost: TestHost) -> None:
    run_id = client.submit("import time; time.sleep(60)")
    assert wait_until(lambda: client.status(run_id)["state"] == "running", 10)
    began = time.monotonic()
    reply = client.request("POST", f"/runs/{run_id}/cancel")
    assert reply.status == 202
    run = client.wait(run_id, timeout=10)
    assert run["state"] == "cancelled"
    assert time.monotonic() - began < 2.0
    assert run["unit"] not in testhost.units()


def test_code_and_outputs_are_invisible_to_runs(client: Client, daemon: Daemon) -> None:
    code = (
        "import os\n"
        f"for p in ['{daemon.state_dir}', '{daemon.state_dir}/daemon/unitbox.db', '/etc/unitbox', '/run/dbus/system_bus_socket',"
        " '/run/systemd/transient', '/etc/shadow']:\n"
        "    try:\n"
        "        open(p).read() if not os.path.isdir(p) else os.listdir(p); print(p, 'READ')\n"
        "    except OSError as e:\n"
        "        print(p, type(e).__name__)\n"
    )
    for line in client.run(code)["stdout"].splitlines():
        assert "READ" not in line, line


def test_proc_shows_only_the_runs_own_processes(client: Client) -> None:
    out = client.run("import os; print(sorted(p for p in os.listdir('/proc') if p.isdigit()))")["stdout"]
    pids = eval(out)
    assert len(pids) <= 2, pids


def test_killed_by_signal_reports_the_signal(client: Client) -> None:
    run = client.run("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert run["state"] == "failed"
    assert run["signal"] == "SIGSEGV"
    assert run["exit_code"] is None


def test_no_process_is_left_in_the_slice_after_a_double_fork(client: Client, testhost: TestHost) -> None:
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(1000)\n"
        "    os._exit(0)\n"
        "print('parent done')\n"
    )
    run = client.run(code)
    assert run["state"] == "succeeded"
    assert wait_until(lambda: slice_pids(testhost) == [], 5), slice_pids(testhost)


def test_runs_finish_while_healthz_is_polled_hard(client: Client, daemon: Daemon) -> None:
    """/healthz makes a blocking D-Bus call; signals it reads on the way must
    still be handled, or a run's end sits unseen in sd-bus's queue."""
    import threading

    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            daemon.client.get("/healthz", timeout=5)

    pollers = [threading.Thread(target=hammer) for _ in range(3)]
    for poller in pollers:
        poller.start()
    try:
        for _ in range(8):
            run_id = client.submit("import time; time.sleep(0.3)")
            deadline = time.monotonic() + 10
            while client.status(run_id)["state"] not in ("succeeded", "failed", "timed_out", "error"):
                assert time.monotonic() < deadline, "the run's end was never seen"
                time.sleep(0.05)
    finally:
        stop.set()
        for poller in pollers:
            poller.join()
