"""The attack catalogue, part 7: files in and out (issue 14). A run's output
files are collected by privileged code on the host (collect.py, in
ExecStopPost) from a tree hostile code made — the judge0 CVE-2024-28185/28189
class, where host code followed sandbox-made symlinks; its result value and
input file paths are untrusted bytes too. Each attack goes through the HTTP
API to the real daemon on the systemd test host; the module's fixture checks
that nothing is left running and that the daemon's RSS stayed flat."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.support.daemon import Client, Daemon
from tests.support.hostile import contained_afterwards
from tests.support.testhost import TestHost


@pytest.fixture(scope="module", autouse=True)
def _contained(daemon: Daemon, testhost: TestHost) -> Iterator[None]:
    yield from contained_afterwards(daemon, testhost)


def skipped(client: Client, run_id: str) -> dict[str, str]:
    listed = client.get(f"/runs/{run_id}/files").json()
    return {s["path"]: s["reason"] for s in listed["skipped"]}


def test_symlinks_to_secrets_and_to_the_state_dir_are_never_followed(client: Client, daemon: Daemon) -> None:
    code = ("import os\n"
            "os.symlink('/etc/shadow', 'shadow')\n"
            f"os.symlink({daemon.state_dir!r}, 'state')\n"
            f"os.symlink({daemon.state_dir + '/daemon/unitbox.db'!r}, 'db.sqlite')\n"
            "os.symlink('/run/unitbox-runs', 'boxes')\n")
    run = client.run(code)
    assert run["state"] == "succeeded"
    assert run["files"] == [] and run["output_files"] == 0
    assert skipped(client, run["id"]) == {name: "symlink: not collected"
                                          for name in ("boxes", "db.sqlite", "shadow", "state")}
    for name in ("shadow", "state", "db.sqlite"):
        assert client.get(f"/runs/{run['id']}/files/{name}").status == 404


def test_a_fifo_is_never_opened_and_the_run_ends_at_once(client: Client) -> None:
    run = client.run("import os\nos.mkfifo('fifo')\nos.mkfifo('out.csv')\n")
    assert run["state"] == "succeeded" and run["duration_ms"] < 5000
    assert skipped(client, run["id"]) == {"fifo": "FIFO: not collected", "out.csv": "FIFO: not collected"}


def test_a_hundred_thousand_empty_files_stop_at_the_caps(client: Client, daemon: Daemon) -> None:
    rss = daemon.rss_kib()
    code = ("import os\n"
            "for i in range(100_000):\n"
            "    open(f'f{i:06}', 'w').close()\n")
    began = time.monotonic()
    run = client.run(code, limits={"timeout_s": 60})
    assert run["state"] == "succeeded", run
    assert time.monotonic() - began < 60
    assert run["output_files"] == 100  # files.output_count
    listed = client.get(f"/runs/{run['id']}/files").json()
    assert listed["incomplete"] is True and len(listed["files"]) == 100
    assert "not collected (a cap was reached)" in run["error"]
    assert daemon.rss_kib() < rss + 20 * 1024


def test_a_2_gib_sparse_file_is_refused_and_a_big_one_is_skipped_unread(client: Client) -> None:
    code = ("import os, signal\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "f = open('huge', 'wb')\n"
            "try:\n    f.truncate(2 << 30)\n    print('2 GiB allowed')\n"
            "except OSError as e:\n    print('2 GiB refused', e.errno)\n"
            "f.truncate(60 << 20)\n"  # within disk_mb=64 (LimitFSIZE), over output_file_mb=32
            "f.close()\n")
    run = client.run(code)
    assert run["state"] == "succeeded", run
    assert run["stdout"] == "2 GiB refused 27\n"  # EFBIG: LimitFSIZE= is disk_mb
    assert run["files"] == []
    assert "over the 33554432-byte cap per file" in skipped(client, run["id"])["huge"]


def test_a_file_still_being_written_by_a_leftover_process(client: Client, testhost: TestHost) -> None:
    code = ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time\\n"
            "f = open(\"growing.log\", \"a\")\\nwhile True:\\n    f.write(\"x\" * 1000); f.flush(); time.sleep(0.01)'])\n"
            "time.sleep(0.5)\n")
    run = client.run(code, limits={"timeout_s": 30})
    assert run["state"] == "succeeded"
    assert run["duration_ms"] < 10_000  # the leftover was killed with the run, not waited for
    files = {f["path"]: f for f in run["files"]}
    assert files["growing.log"]["size"] > 0
    served = client.get(files["growing.log"]["url"])
    assert len(served.body) == files["growing.log"]["size"]  # collected once everything was dead: consistent


def test_a_path_of_4000_characters_is_not_collected(client: Client) -> None:
    code = ("import os\n"
            "path = '/'.join(['d' * 190] * 21)\n"  # 4,010 characters, 21 deep
            "os.makedirs(path)\n"
            "open(path + '/deep.txt', 'w').write('x')\n"
            "open('n' * 250, 'w').write('x')\n"  # a long but legal name: over no cap
            "open('ok.txt', 'w').write('x')\n")
    run = client.run(code)
    assert run["state"] == "succeeded", run["stderr"]
    assert sorted(f["path"] for f in run["files"]) == ["n" * 250, "ok.txt"]
    reasons = skipped(client, run["id"])
    assert any("deeper than" in reason or "longer than" in reason for reason in reasons.values()), reasons


def test_main_returning_100_mb_fails_and_the_daemon_never_holds_it(client: Client, daemon: Daemon) -> None:
    rss = daemon.rss_kib()
    run = client.run("def main():\n    return 'x' * 100_000_000\n", entrypoint="main",
                     limits={"memory_mb": 1024, "timeout_s": 60})
    assert run["state"] == "failed", run
    assert "over the result_kb limit" in run["error"]
    assert run["result"] is None
    assert daemon.rss_kib() < rss + 20 * 1024


def test_a_forged_result_file_is_checked_as_untrusted(client: Client, daemon: Daemon) -> None:
    rss = daemon.rss_kib()
    big = client.run("def main():\n    return 1\n"
                     "open('/run/unitbox/out/result.json', 'w').write('1' * 30_000_000)\n", entrypoint="main",
                     limits={"timeout_s": 60})
    # The bootstrap wrote its own value after the program's module ran: the forged file was replaced.
    assert big["state"] == "succeeded" and big["result"] == 1
    forged = client.run("import os, json\n"
                        "def main():\n"
                        "    open('/run/unitbox/out/result.json', 'w').write('[1, 2, NaN]')\n"
                        "    os._exit(0)\n", entrypoint="main")
    assert forged["state"] == "failed" and "not valid JSON" in forged["error"]
    huge = client.run("import os\n"
                      "def main():\n"
                      "    open('/run/unitbox/out/result.json', 'w').write('1' * 30_000_000)\n"
                      "    os._exit(0)\n", entrypoint="main", limits={"timeout_s": 60})
    assert huge["state"] == "failed" and "over the result_kb limit" in huge["error"]
    assert daemon.rss_kib() < rss + 20 * 1024


@pytest.mark.parametrize("path", ["../x", "/etc/x", "a/../../x", "\u0000", "x\u0000y", "..", "a\\..\\x"])
def test_input_file_paths_that_leave_the_working_directory_are_refused(client: Client, path: str) -> None:
    reply = client.post_json("/run-json", {"code": "print(1)", "files": [
        {"path": "fine.txt", "content": "ok"}, {"path": path, "content": "owned"}]})
    assert reply.status == 422, reply.body
    assert reply.json()["error"]["details"][0]["field"] == "files[1].path"


def test_a_written_page_cannot_act_as_the_service(client: Client) -> None:
    run = client.run("open('x.html', 'w').write('<script>fetch(\"/runs\")</script>')\n"
                     "open('x.svg', 'w').write('<svg xmlns=\"http://www.w3.org/2000/svg\"><script>1</script></svg>')\n")
    for name in ("x.html", "x.svg"):
        served = client.get(f"/runs/{run['id']}/files/{name}")
        assert served.status == 200
        assert "sandbox" in served.headers["Content-Security-Policy"]
        assert served.headers["Content-Disposition"].startswith("attachment")
        assert served.headers["X-Content-Type-Options"] == "nosniff"
