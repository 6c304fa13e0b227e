"""Warm units on the real test host (broker/warm.py; docs/operations.md
"Warm units"): pooled runs are fresh, hardened, single-use units whose
limits, deadline, cancel and output caps hold as a cold run's do; a daemon
killed with idle and handed-over units leaks nothing."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Client, Daemon, serving
from tests.support.hostile import contained_afterwards
from tests.support.testhost import TestHost, wait_until

POOL = 3
CONFIG = f"max_concurrent = 8\n[warm.default]\nsize = {POOL}\npreload = [\"decimal\"]\n"
IDENTITY = ("import os\n"
            "print(os.getuid(), sorted(os.listdir('/tmp')), sorted(os.listdir('.')), len(os.listdir('/proc')))\n"
            "open('/tmp/mine', 'w').write('x'); open('left', 'w').write('y')\n")


def metric(client: Client, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", client.get("/metrics").body.decode(), re.M)
    assert found, name
    return float(found.group(1))


def ready(client: Client, at_least: int = POOL) -> None:
    assert wait_until(lambda: metric(client, "unitbox_warm_ready") >= at_least, 60, interval=0.2), \
        "the pool did not fill"


def warm_units(host: TestHost) -> list[str]:
    out = host.run("systemctl", "list-units", "--plain", "--no-legend", "--all", "unitbox-warm-*", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pooled(testhost: TestHost, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from serving(testhost, tmp_path_factory.mktemp("warm"), CONFIG, "warm")


@pytest.fixture(scope="module", autouse=True)
def _contained(pooled: Daemon, testhost: TestHost) -> Iterator[None]:
    yield from contained_afterwards(pooled, testhost)


def handed(client: Client, code: str, **fields: object) -> dict[str, object]:
    """Run `code` once a unit is ready, and check it was handed to one."""
    ready(client, 1)
    hits = metric(client, "unitbox_warm_hits")
    run = client.run(code, **fields)
    assert wait_until(lambda: metric(client, "unitbox_warm_hits") == hits + 1, 3, interval=0.1), \
        "the run started cold"  # (the count comes with the broker's heartbeat, every 0.5 s)
    return run


def test_the_pool_fills_and_shows_in_systemctl(pooled: Daemon) -> None:
    ready(pooled.client)
    units = warm_units(pooled.host)
    assert len(units) >= POOL and all(re.fullmatch(r"unitbox-warm-[0-9a-f]{12}\.service", u) for u in units)
    shown = pooled.host.run("systemctl", "show", "-P", "Description", units[0]).stdout
    assert "idle" in shown


def test_a_pooled_run_finds_the_pool_s_preloads_imported(pooled: Daemon) -> None:
    run = handed(pooled.client, "import sys\nprint('decimal' in sys.modules, sys.argv, __name__)")
    assert run["stdout"] == "True ['/run/unitbox/code/main.py'] __main__\n", run


def test_a_pooled_run_reads_its_stdin_and_fails_as_a_cold_one_does(pooled: Daemon) -> None:
    read = handed(pooled.client, "import sys\nprint(repr(sys.stdin.read()), sys.stdin.seekable())", stdin="hello\n")
    assert read["stdout"] == "'hello\\n' True\n", read
    failed = handed(pooled.client, "def f():\n    raise ValueError('no')\nf()\n")
    assert failed["state"] == "failed" and failed["exit_code"] == 1, failed
    assert failed["stderr"] == ('Traceback (most recent call last):\n'
                                '  File "/run/unitbox/code/main.py", line 3, in <module>\n    f()\n'
                                '  File "/run/unitbox/code/main.py", line 2, in f\n'
                                "    raise ValueError('no')\nValueError: no\n"), failed["stderr"]  # the stub's frames are hidden, as the bootstrap's


def test_consecutive_pooled_runs_are_fresh_units_that_see_nothing_of_each_other(pooled: Daemon) -> None:
    first = handed(pooled.client, IDENTITY)
    second = handed(pooled.client, IDENTITY)
    assert first["state"] == second["state"] == "succeeded", (first, second)
    a, b = str(first["stdout"]).split(), str(second["stdout"]).split()
    assert a[0] != b[0], "two pooled runs shared a dynamic UID"
    assert "[]" in str(second["stdout"]) and "mine" not in str(second["stdout"]), second["stdout"]
    assert "left" not in str(second["stdout"])


def test_a_pooled_run_gets_the_request_s_memory_limit_exactly(pooled: Daemon) -> None:
    fits = handed(pooled.client, "b = bytearray(96 << 20); print(len(b))", limits={"memory_mb": 160})
    assert fits["state"] == "succeeded", fits
    over = handed(pooled.client, "b = bytearray(200 << 20); print(len(b))", limits={"memory_mb": 160})
    assert over["state"] == "oom_killed", over


def test_a_pooled_run_times_out_on_time(pooled: Daemon) -> None:
    ready(pooled.client, 1)
    started = time.monotonic()
    run = handed(pooled.client, "while True: pass", limits={"timeout_s": 1})
    took = time.monotonic() - started
    assert run["state"] == "timed_out", run
    assert took < 1.3 + 0.7, took  # the deadline, plus the HTTP round trips and the unit's end
    assert 950 <= float(run["duration_ms"]) <= 1300, run["duration_ms"]  # type: ignore[arg-type]


def test_a_pooled_run_can_be_cancelled(pooled: Daemon) -> None:
    ready(pooled.client, 1)
    hits = metric(pooled.client, "unitbox_warm_hits")
    run_id = pooled.client.submit("import time\nprint('up', flush=True)\ntime.sleep(60)")
    assert wait_until(lambda: pooled.client.status(run_id)["state"] == "running", 10)
    assert wait_until(lambda: metric(pooled.client, "unitbox_warm_hits") == hits + 1, 3, interval=0.1)
    assert pooled.client.request("DELETE", f"/runs/{run_id}").status in (200, 202)
    assert pooled.client.wait(run_id, 15)["state"] == "cancelled"


def test_a_pooled_run_s_output_is_capped(pooled: Daemon) -> None:
    run = handed(pooled.client, "import sys\nsys.stdout.write('x' * (300 << 10))", limits={"output_kb": 64})
    assert run["stdout_truncated"] is True and run["stdout_bytes"] == 64 << 10, run


def test_a_pooled_run_s_figures_are_its_own(pooled: Daemon) -> None:
    run = handed(pooled.client, "x = sum(range(3_000_000))")
    assert run["state"] == "succeeded", run
    assert 0 < float(run["cpu_ms"]) < 2000 and float(run["duration_ms"]) < 2000, run  # type: ignore[arg-type]


def answered(client: Client, code: str) -> tuple[dict[str, object], dict[str, object]]:
    """A pooled run submitted with wait=true: (the answer as it came, the record once complete)."""
    ready(client, 1)
    reply = client.post_json("/run-json?wait=true", {"code": code})
    assert reply.status == 200, reply.body
    answer: dict[str, object] = reply.json()
    assert str(answer["unit"]).startswith("unitbox-warm-"), answer
    return answer, client.complete(answer)


def test_a_waiting_client_is_answered_at_the_program_s_exit_and_the_figures_follow(pooled: Daemon) -> None:
    answer, final = answered(pooled.client, "print('hi')\nimport sys\nsys.exit(3)")
    assert (answer["state"], answer["exit_code"], answer["stdout"]) == ("failed", 3, "hi\n"), answer
    assert answer["cpu_ms"] is None and answer["memory_peak_bytes"] is None, answer  # before the unit's end
    assert (final["state"], final["exit_code"], final["stdout_bytes"]) == ("failed", 3, 3), final
    assert float(final["cpu_ms"]) > 0 and int(final["memory_peak_bytes"]) > 0, final  # type: ignore[arg-type]


def test_a_run_that_leaves_files_is_answered_with_them(pooled: Daemon) -> None:
    answer, _ = answered(pooled.client, "open('plot.txt', 'w').write('x')")
    assert answer["output_files"] == 1 and answer["cpu_ms"] is not None, answer  # the unit's end collected it


def test_a_process_the_program_left_is_gone_before_the_answer(pooled: Daemon) -> None:
    answer, final = answered(pooled.client, "import os, time\nif os.fork() == 0:\n    time.sleep(1)\n"
                                            "    print('late', flush=True)\n    os._exit(0)\nprint('early', flush=True)")
    assert answer["stdout"] == "early\n" and answer["state"] == "succeeded", answer  # its leftover was killed
    assert final["stdout_bytes"] == 6 and pooled.client.get(f"/output/{final['id']}").json()["stdout"] == "early\n"


def owned(host: TestHost, state_dir: str) -> set[str]:
    """The warm units a daemon's broker started (their staging directory names its state dir)."""
    def owner(unit: str) -> str:
        slot = unit.removeprefix("unitbox-warm-").removesuffix(".service")
        try:
            return host.path(f"/run/unitbox-runs/warm-{slot}/owner").read_text()
        except OSError:
            return ""
    return {unit for unit in warm_units(host) if owner(unit) == state_dir}


def test_a_killed_daemon_leaks_no_warm_unit_and_its_pooled_runs_end_right(testhost: TestHost, tmp_path: Path) -> None:
    server = Daemon(testhost, tmp_path, config=CONFIG, name="warm-kill")
    server.start()
    try:
        ready(server.client)
        hits = metric(server.client, "unitbox_warm_hits")
        # It prints nothing after the kill: without systemd's fd store (a daemon run by hand) that output is lost.
        run_id = server.client.submit("import time\ntime.sleep(3)\nopen('done', 'w').write('yes')")
        assert wait_until(lambda: server.client.status(run_id)["state"] == "running", 10)
        assert wait_until(lambda: metric(server.client, "unitbox_warm_hits") == hits + 1, 3, interval=0.1)
        before = owned(testhost, server.state_dir)  # not the module's pool, which it leaves alone
        assert len(before) == POOL + 1
        server.stop(signal.SIGKILL)
        # Idle units end by themselves (their stub reads EOF); the handed-over one runs on.
        assert wait_until(lambda: len(set(warm_units(testhost)) & before) == 1, 30, interval=0.2), \
            warm_units(testhost)
        server.start()
        run = server.client.wait(run_id, 30)
        assert run["state"] == "succeeded" and 2900 <= run["duration_ms"] < 6000, run
        assert run["output_files"] == 1, run
    finally:
        server.stop()
    assert wait_until(lambda: not (set(warm_units(testhost)) & before), 30, interval=0.2)
    assert wait_until(lambda: not owned(testhost, server.state_dir), 30, interval=0.2), "the new broker's pool leaked"
