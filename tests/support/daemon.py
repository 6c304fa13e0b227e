"""The real daemon inside a test host, and a small HTTP client for it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.testhost import REPO, TestHost, wait_until

VENV_UNITBOX = REPO / ".venv" / "bin" / "unitbox"
TERMINAL = {"succeeded", "failed", "timed_out", "oom_killed", "cancelled", "error"}


def multipart(fields: dict[str, tuple[str | None, bytes]] | list[tuple[str, tuple[str | None, bytes]]]
              ) -> tuple[bytes, str]:
    """A multipart/form-data body: name → (filename or None, content); a list for repeated names."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, (filename, data) in (fields.items() if isinstance(fields, dict) else fields):
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def wait_healthy(client: Client, timeout: float, why_not: Callable[[], str]) -> None:
    """Until /healthz answers 200; RuntimeError(why_not()) after `timeout`."""
    def healthy() -> bool:
        try:
            return client.get("/healthz", timeout=2).status == 200
        except OSError:
            return False
    if not wait_until(healthy, timeout, interval=0.1):
        raise RuntimeError(why_not())


class Client:
    def __init__(self, base_url: str, token: str | None = None) -> None:
        self.base_url = base_url
        self.token = token

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                timeout: float = 120, headers: dict[str, str] | None = None) -> Response:
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return Response(reply.status, dict(reply.headers), reply.read())
        except urllib.error.HTTPError as err:
            return Response(err.code, dict(err.headers), err.read())

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.request("GET", path, **kwargs)

    def post_json(self, path: str, payload: Any, **kwargs: Any) -> Response:
        return self.request("POST", path, json.dumps(payload).encode(), "application/json", **kwargs)

    def submit(self, code: str, **fields: Any) -> str:
        reply = self.post_json("/run-json", {"code": code, **fields})
        assert reply.status == 202, (reply.status, reply.body)
        return str(reply.json()["id"])

    def run(self, code: str, **fields: Any) -> dict[str, Any]:
        """Submit with wait=true; the finished Run object with its output merged in.
        Complete: a warm run answered at its program's exit, before its unit's end
        gave CPU and memory (docs/api.md), is asked for again until they are in."""
        reply = self.post_json("/run-json?wait=true", {"code": code, **fields})
        assert reply.status == 200, (reply.status, reply.body)
        run: dict[str, Any] = self.complete(reply.json())
        output = self.get(f"/output/{run['id']}").json()
        run["stdout"], run["stderr"] = output["stdout"], output["stderr"]
        return run

    def status(self, run_id: str) -> dict[str, Any]:
        reply = self.get(f"/status/{run_id}")
        assert reply.status == 200, (reply.status, reply.body)
        result: dict[str, Any] = reply.json()
        return result

    def complete(self, run: dict[str, Any]) -> dict[str, Any]:
        """`run` (finished), with CPU and memory: a warm run seen at its program's exit
        gets them a moment later, at its unit's end (docs/api.md "Waiting for a run")."""
        if run["state"] in ("succeeded", "failed") and run["cpu_ms"] is None:
            wait_until(lambda: self.status(run["id"])["cpu_ms"] is not None, 10)
            return self.status(run["id"])
        return run

    def wait(self, run_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = self.status(run_id)
            if run["state"] in TERMINAL:
                return self.complete(run)
            if time.monotonic() > deadline:
                return run
            time.sleep(0.05)


class Daemon:
    """`unitbox serve` inside the test host, on a free loopback port."""

    def __init__(self, host: TestHost, workdir: Path, config: str = "", name: str = "daemon") -> None:
        self.host = host
        self.port = free_port()
        self.state_dir = f"/var/lib/unitbox-{name}"
        self.config_path = f"/etc/unitbox-{name}.toml"
        self.log = workdir / f"{name}.log"
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.client = Client(f"http://127.0.0.1:{self.port}")
        self.extra_listen: list[str] = []
        self.pool = "warm"  # warm units: "warm" (the default pool), or "cold" (a config without)

    def config_text(self) -> str:
        listen = ", ".join(f'"{a}"' for a in [f"127.0.0.1:{self.port}", *self.extra_listen])
        return f'listen = [{listen}]\nstate_dir = "{self.state_dir}"\n{self.config}\n'

    def start(self, timeout: float = 30) -> None:
        config = self.config_text()
        self.host.path(self.config_path).write_text(config)
        self.process = self.host.popen(str(VENV_UNITBOX), "--config", self.config_path, "serve", log=self.log)

        def healthy() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited:\n{self.log.read_text()}")
            try:
                return self.client.get("/healthz", timeout=2).status == 200
            except OSError:
                return False
        if not wait_until(healthy, timeout):
            raise RuntimeError(f"the daemon did not become healthy:\n{self.log.read_text()}")

    @property
    def pid(self) -> int:
        """The daemon's own PID (outside view): nsenter's child."""
        assert self.process is not None
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False)
        return int(out.stdout.split()[0]) if out.stdout.strip() else self.process.pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.process = None


def warm_ready(client: Client) -> float:
    """Warm units ready, from /metrics (as of the broker's last heartbeat)."""
    found = re.search(r"^unitbox_warm_ready (\S+)$", client.get("/metrics").body.decode(), re.M)
    return float(found.group(1)) if found else 0.0


def serving(host: TestHost, workdir: Path, config: str, name: str) -> Iterator[Daemon]:
    """A module's own daemon, for a fixture to `yield from`: started, and stopped after."""
    server = Daemon(host, workdir, config=config, name=name)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class DaemonService(Daemon):
    """The daemon as a real systemd service inside the test host (Type=notify,
    Restart=on-failure, an fd store): crash and restart it like an operator's."""

    def __init__(self, host: TestHost, workdir: Path, config: str = "", name: str = "service") -> None:
        super().__init__(host, workdir, config, name)
        self.unit = f"unitbox-{name}.service"

    def start(self, timeout: float = 30) -> None:
        self.host.path(self.config_path).write_text(self.config_text())
        unit_file = (
            "[Service]\nType=notify\nNotifyAccess=main\nFileDescriptorStoreMax=4096\n"
            "Restart=on-failure\nRestartSec=500ms\nTimeoutStopSec=30\nKillMode=mixed\n"
            f"ExecStart={VENV_UNITBOX} --config {self.config_path} serve\n"
            # A checkout testing its own code with the shared venv (git worktrees) sets PYTHONPATH.
            + (f"Environment=PYTHONPATH={os.environ['PYTHONPATH']}\n" if os.environ.get("PYTHONPATH") else "")
        )
        self.host.path(f"/etc/systemd/system/{self.unit}").write_text(unit_file)
        self.host.run("systemctl", "daemon-reload")
        self.host.run("systemctl", "start", "--no-block", self.unit)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 30) -> None:
        wait_healthy(self.client, timeout, lambda: f"{self.unit} did not become healthy:\n{self.journal(60)}")

    @property
    def pid(self) -> int:
        """The daemon's PID inside the test host's pid namespace is useless
        outside: find it by its cgroup's process list instead."""
        out = subprocess.run(["pgrep", "-f", "--", f"--config {self.config_path} serve"], capture_output=True,
                             text=True, check=False)
        return int(out.stdout.split()[0])

    @property
    def broker_pid(self) -> int:
        """The broker process the daemon started (outside the test host's pid namespace)."""
        out = subprocess.run(["pgrep", "-f", "--", f"--config {self.config_path} broker"], capture_output=True,
                             text=True, check=False)
        return int(out.stdout.split()[0])

    def main_pid(self) -> int:
        return int(self.host.run("systemctl", "show", "-P", "MainPID", self.unit).stdout.strip() or 0)

    def systemctl(self, *args: str) -> str:
        return self.host.run("systemctl", *args, self.unit, check=False).stdout

    def journal(self, lines: int = 10_000) -> str:
        return self.host.run("journalctl", "--no-pager", "-n", str(lines), "-u", self.unit, check=False).stdout

    def crash(self) -> None:
        """kill -9 the daemon; systemd restarts it (Restart=on-failure)."""
        self.host.run("systemctl", "kill", "--kill-who=main", "-s", "KILL", self.unit)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> None:
        self.host.run("systemctl", "stop", self.unit, check=False, timeout=timeout + 40)
        self.host.run("systemctl", "reset-failed", self.unit, check=False)
