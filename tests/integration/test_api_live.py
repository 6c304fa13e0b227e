"""The HTTP API against the real daemon on the real test host (issue 3)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Client, Daemon, free_port, multipart
from tests.support.testhost import REPO, TestHost, wait_until


def test_run_file_upload_runs(client: Client) -> None:
    body, content_type = multipart({
        "file": ("prog.py", b"import sys\nprint('args', sys.argv[1:])\nprint(sys.stdin.read().upper())\n"),
        "args": (None, b'["x", "y"]'), "stdin": (None, b"hello"), "wait": (None, b"true"),
        "limits": (None, b'{"timeout_s": 5}'),
    })
    reply = client.request("POST", "/run-file", body, content_type)
    assert reply.status == 200, reply.body
    run = reply.json()
    assert run["state"] == "succeeded"
    assert run["limits"]["timeout_s"] == 5
    assert client.get(f"/output/{run['id']}").json()["stdout"] == "args ['x', 'y']\nHELLO\n"


def test_output_while_running_is_partial(client: Client) -> None:
    run_id = client.submit("import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')")
    assert wait_until(lambda: client.get(f"/output/{run_id}").json()["stdout"] == "first\n", 10)
    assert client.status(run_id)["state"] == "running"
    raw = client.get(f"/output/{run_id}?stream=stdout")
    assert raw.body == b"first\n" and raw.headers["Content-Type"].startswith("application/octet-stream")
    assert client.wait(run_id)["state"] == "succeeded"
    assert client.get(f"/output/{run_id}").json()["stdout"] == "first\nsecond\n"


def test_wait_cap_answers_202_while_the_run_goes_on(testhost: TestHost, tmp_path: Path) -> None:
    server = Daemon(testhost, tmp_path, name="waitcap", config="wait_max_s = 1\n")
    server.start()
    try:
        began = time.monotonic()
        reply = server.client.post_json("/run-json?wait=true", {"code": "import time; time.sleep(3)"})
        assert reply.status == 202
        assert 0.9 < time.monotonic() - began < 2.5
        assert server.client.wait(reply.json()["id"])["state"] == "succeeded"
    finally:
        server.stop()


def test_unix_socket_and_token(testhost: TestHost, tmp_path: Path) -> None:
    sock = "/run/unitbox-test.sock"
    server = Daemon(testhost, tmp_path, name="unix", config='tokens = ["t0ken"]\n')
    server.extra_listen = [f"unix:{sock}"]
    server.client.token = "t0ken"
    server.start()
    try:
        out = testhost.sh(f"curl -s --unix-socket {sock} -H 'Authorization: Bearer t0ken' "
                          "-H 'Content-Type: application/json' -d '{\"code\": \"print(7)\", \"wait\": true}' "
                          "http://localhost/run-json")
        assert json.loads(out)["state"] == "succeeded"
        denied = testhost.sh(f"curl -s -o /dev/null -w '%{{http_code}}' --unix-socket {sock} http://localhost/runs")
        assert denied == "401"
    finally:
        server.stop()


def test_socket_activation(testhost: TestHost, tmp_path: Path) -> None:
    port = free_port()
    config = 'state_dir = "/var/lib/unitbox-activated"\n'
    testhost.path("/etc/unitbox-activated.toml").write_text(config)
    log = tmp_path / "activated.log"
    process = testhost.popen("systemd-socket-activate", "-l", f"127.0.0.1:{port}",
                             str(REPO / ".venv/bin/unitbox"), "--config", "/etc/unitbox-activated.toml", "serve",
                             log=log)
    try:
        client = Client(f"http://127.0.0.1:{port}")
        assert wait_until(lambda: _answers(client), 20), log.read_text()
        assert client.run("print('activated')")["stdout"] == "activated\n"
    finally:
        subprocess.run(["pkill", "-f", "--config /etc/unitbox-activated.toml serve"], check=False)
        process.terminate()
        process.wait(10)


def _answers(client: Client) -> bool:
    try:
        return client.get("/healthz", timeout=5).status == 200
    except OSError:
        return False


@pytest.fixture
def fuzz_target(testhost: TestHost, tmp_path: Path) -> Iterator[Daemon]:
    server = Daemon(testhost, tmp_path, name="fuzz", config=(
        "max_concurrent = 8\nwait_max_s = 5\n[limits]\ntimeout_s = 2\n[max_limits]\ntimeout_s = 5\n"
        "memory_mb = 256\n"))
    server.start()
    yield server
    server.stop()


def test_schemathesis_finds_no_server_error(fuzz_target: Daemon, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{fuzz_target.port}/openapi.json"
    done = subprocess.run([str(REPO / ".venv/bin/schemathesis"), "run", url, "--checks", "not_a_server_error",
                           "-n", "20", "--request-timeout", "30", "--no-color"],
                          capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:]
    assert fuzz_target.client.get("/healthz").status == 200
