"""`unitbox run` and the other client commands against the real daemon on the
real test host, as a person runs them: a separate process talking HTTP to
the daemon (the test host shares this machine's network). Exit statuses,
stdout and stderr apart, output arriving line by line as it is printed,
files up and down, --json, Ctrl-C, and a daemon with tokens (issue 17)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import VENV_UNITBOX, Client, Daemon
from tests.support.testhost import TestHost


def unitbox(url: str, *argv: str, token: str | None = None, cwd: Path | None = None,
            stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UNITBOX_URL": url}
    env.pop("UNITBOX_TOKEN", None)
    if token is not None:
        env["UNITBOX_TOKEN"] = token
    done = subprocess.run([str(VENV_UNITBOX), *argv], input=stdin, capture_output=True, env=env, cwd=cwd,
                          timeout=timeout, check=False)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def script(tmp_path: Path, code: str, name: str = "prog.py") -> str:
    path = tmp_path / name
    path.write_text(code)
    return str(path)


@pytest.mark.parametrize(("code", "options", "status"), [
    ("print('fine')", [], 0),
    ("import sys\nsys.exit(3)", [], 3),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", [], 128 + signal.SIGSEGV),
    ("while True:\n    pass", ["--timeout", "1"], 124),
    ("b = bytearray(1 << 30)", ["--memory", "64"], 137),
], ids=["exit-0", "exit-3", "sigsegv", "timed-out", "oom-killed"])
def test_exit_status_is_the_programs_or_the_documented_one(client: Client, tmp_path: Path, code: str,
                                                           options: list[str], status: int) -> None:
    done = unitbox(client.base_url, "run", *options, script(tmp_path, code))
    assert done.returncode == status, (done.stdout, done.stderr)
    if status in (124, 137):
        state = {124: "timed_out", 137: "oom_killed"}[status]
        assert done.stderr.startswith("unitbox: run ") and f" {state}: " in done.stderr, done.stderr


def test_stdout_and_stderr_stay_apart_and_args_and_stdin_arrive(client: Client, tmp_path: Path) -> None:
    code = "import sys\nprint('out', sys.argv[1:])\nprint('err', sys.stdin.read(), file=sys.stderr)\n"
    done = unitbox(client.base_url, "run", "--stdin", "-", script(tmp_path, code), "--flag", "x y",
                   stdin=b"from stdin")
    assert (done.returncode, done.stdout, done.stderr) == (0, "out ['--flag', 'x y']\n", "err from stdin\n")


def test_output_arrives_line_by_line_as_it_is_printed(client: Client, tmp_path: Path) -> None:
    code = "import time\nfor i in range(4):\n    print(f'tick {i}', flush=True)\n    time.sleep(1)\n"
    began = time.monotonic()
    with subprocess.Popen([str(VENV_UNITBOX), "run", "--url", client.base_url, script(tmp_path, code)],
                          stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        arrivals = [(line.decode(), time.monotonic() - began) for line in process.stdout]
        assert process.wait(30) == 0
    assert [line for line, _ in arrivals] == [f"tick {i}\n" for i in range(4)]
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(arrivals)]
    assert all(0.7 < gap < 1.5 for gap in gaps), arrivals  # each line when printed, not all at the end


def test_files_go_up_and_come_down(client: Client, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.csv").write_text("a,b\n1,2\n3,4\n")
    code = ("import os\n"
            "rows = open('data/in.csv').read().splitlines()[1:]\n"
            "os.makedirs('out', exist_ok=True)\n"
            "open('out/sums.txt', 'w').write('\\n'.join(str(sum(map(int, r.split(',')))) for r in rows))\n"
            "open('blob.bin', 'wb').write(bytes(range(256)) * 100)\n")
    done = unitbox(client.base_url, "run", "--file", "data/in.csv", "--out", str(tmp_path / "got"),
                   script(tmp_path, code), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "got" / "out" / "sums.txt").read_text() == "3\n7"
    assert (tmp_path / "got" / "blob.bin").read_bytes() == bytes(range(256)) * 100
    assert (tmp_path / "got" / "data" / "in.csv").read_text() == "a,b\n1,2\n3,4\n"  # the working directory's


def test_json_is_the_final_run_with_its_output_result_and_files(client: Client, tmp_path: Path) -> None:
    code = "print('working')\nopen('note.txt', 'w').write('hi')\ndef main():\n    return {'answer': 42}\n"
    done = unitbox(client.base_url, "run", "--json", "--entrypoint", "main", script(tmp_path, code))
    run = json.loads(done.stdout)
    assert done.returncode == 0 and done.stderr == ""
    assert run["state"] == "succeeded" and run["stdout"] == "working\n" and run["result"] == {"answer": 42}
    assert [(f["path"], f["sha256"]) for f in run["files"]] == [("note.txt", hashlib.sha256(b"hi").hexdigest())]
    assert run == client.get(f"/status/{run['id']}?include=output").json()
    done = unitbox(client.base_url, "run", "--entrypoint", "main", script(tmp_path, code))
    assert done.stdout == 'working\n{"answer": 42}\n'


def test_lint_findings_are_file_line_col(client: Client, tmp_path: Path) -> None:
    path = script(tmp_path, "import os\n\nprint(undefined_name)\n")
    done = unitbox(client.base_url, "run", "--lint-only", path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [f"{path}:1:8: F401 `os` imported but unused",
                                        f"{path}:3:7: F821 Undefined name `undefined_name`"]


def test_detach_then_status_logs_and_runs(client: Client, tmp_path: Path) -> None:
    done = unitbox(client.base_url, "run", "--detach", script(tmp_path, "import sys\nprint('later')\nsys.exit(4)"))
    run_id = done.stdout.strip()
    assert done.returncode == 0 and len(run_id) == 16
    follow = unitbox(client.base_url, "logs", "--follow", run_id)
    assert (follow.returncode, follow.stdout) == (4, "later\n")
    status = unitbox(client.base_url, "status", run_id)
    assert "state        failed\n" in status.stdout and "ended        exit 4\n" in status.stdout
    listed = unitbox(client.base_url, "runs", "--state", "failed", "--limit", "1000")
    assert any(line.startswith(f"{run_id}  failed") for line in listed.stdout.splitlines())


def test_ctrl_c_cancels_the_run(client: Client, tmp_path: Path) -> None:
    code = "import time\nprint('started', flush=True)\ntime.sleep(60)\n"
    with subprocess.Popen([str(VENV_UNITBOX), "run", "--url", client.base_url, "--json", script(tmp_path, code)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        deadline = time.monotonic() + 20
        while not [r for r in client.get("/runs?state=running").json()["runs"] if r["stdout_bytes"]]:
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.1)
        began = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 130, err
    assert time.monotonic() - began < 10
    run = json.loads(out)
    assert run["state"] == "cancelled" and run["stdout"] == "started\n"
    assert b"cancelling run" in err


SECRET = "cli-9d2f41"


@pytest.fixture(scope="module")
def token_daemon(testhost: TestHost, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    server = Daemon(testhost, tmp_path_factory.mktemp("cli-tokens"), name="cli-tokens",
                    config=f'[tokens.carol]\nsecret = "{SECRET}"\n')
    server.start()
    yield server
    server.stop()


def test_tokens_from_the_environment_or_the_option(token_daemon: Daemon, tmp_path: Path) -> None:
    url = token_daemon.client.base_url
    path = script(tmp_path, "print('authorised')")
    done = unitbox(url, "run", path)
    assert done.returncode == 125 and done.stderr == (f"unitbox: the server at {url} needs a token: "
                                                      "--token or $UNITBOX_TOKEN\n")
    done = unitbox(url, "run", path, token="wrong")
    assert done.returncode == 125 and "refused the token" in done.stderr
    assert unitbox(url, "run", path, token=SECRET).stdout == "authorised\n"
    done = unitbox(url, "runs", "--token", SECRET)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1


def test_an_unreachable_server_is_one_line(tmp_path: Path) -> None:
    done = unitbox("http://127.0.0.1:9", "run", script(tmp_path, "print(1)"))
    assert done.returncode == 125
    assert done.stderr == ("unitbox: cannot reach the unitbox server at http://127.0.0.1:9: Connection refused "
                           "(is it running? --url or $UNITBOX_URL)\n")
