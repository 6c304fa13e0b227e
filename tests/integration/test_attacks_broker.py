"""Attack catalogue: the broker is the only process that may ask PID 1 for a
unit, so it checks every request itself — whatever the HTTP-facing daemon
(the process exposed to clients) sends. These tests are that daemon gone
bad: they start a real `unitbox broker` on the test host and talk to it
directly over its socket. Refused requests never reach systemd; a valid
one starts a unit whose profile only the broker built."""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.testhost import REPO, TestHost
from unitbox.broker.wire import socket_pair
from unitbox.limits import Limits
from unitbox.rundir import RunDir

STATE = "/var/lib/unitbox-brokerdirect"
RUN, LINKED = "00000000000000a1", "00000000000000a2"


class Broker:
    def __init__(self, host: TestHost) -> None:
        self.sock, theirs = socket_pair()
        python = REPO / ".venv" / "bin" / "python"
        env = {**os.environ, "SYSTEMD_BUS_TIMEOUT": "5s"}
        self.process = subprocess.Popen(
            host.command(str(python), "-m", "unitbox", "broker", "--fd", str(theirs.fileno()), "--state-dir", STATE),
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.sock.settimeout(30)
        self.events: list[dict[str, Any]] = []
        self._next = 0
        assert self.receive()["ev"] == "ready"

    def receive(self) -> dict[str, Any]:
        data = self.sock.recv(1 << 20)
        assert data, "the broker hung up"
        message: dict[str, Any] = json.loads(data)
        return message

    def ask(self, op: str, fds: list[int] | None = None, **fields: Any) -> dict[str, Any]:
        self._next += 1
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([json.dumps({"id": self._next, "op": op, **fields}).encode()], rights)
        while (message := self.receive()).get("id") != self._next:
            self.events.append(message)
        return message

    def start(self, run: str, stdout: int, **fields: Any) -> dict[str, Any]:
        stdio = [os.open("/dev/null", os.O_RDONLY), stdout, os.open("/dev/null", os.O_WRONLY)]
        request = {"limits": Limits().as_dict(), "runtime": "default", "dir": f"{STATE}/runs/{run}", **fields}
        try:
            return self.ask("start", stdio, run=run, **request)
        finally:
            os.close(stdio[0])
            os.close(stdio[2])

    def close(self) -> None:
        self.sock.close()  # the broker exits when its daemon hangs up
        self.process.wait(10)


@pytest.fixture
def broker(testhost: TestHost) -> Iterator[Broker]:
    testhost.sh(f"rm -rf {STATE} && mkdir -p {STATE}/runs && chmod 700 {STATE}")
    RunDir(testhost.path(f"{STATE}/runs/{RUN}")).create(b"print('hi from the broker test')\n", b"", [])
    testhost.sh(f"mkdir -p /tmp/elsewhere && ln -s /tmp/elsewhere {STATE}/runs/{LINKED}")
    side = Broker(testhost)
    yield side
    side.close()
    testhost.sh(f"rm -rf {STATE} /tmp/elsewhere")


def refused(reply: dict[str, Any], words: str) -> bool:
    return reply.get("kind") == "refused" and words in reply.get("error", "")


def test_a_compromised_daemon_cannot_get_a_unit_past_the_broker(broker: Broker, testhost: TestHost) -> None:
    devnull = os.open("/dev/null", os.O_WRONLY)
    try:
        over = {**Limits().as_dict(), "memory_mb": 1 << 20}
        assert refused(broker.start(RUN, devnull, limits=over), "memory_mb")
        assert refused(broker.start(LINKED, devnull), "symlink")
        assert refused(broker.start(RUN, devnull, dir="/etc"), "is not")
        assert refused(broker.start("../../../etc/x", devnull), "malformed run id")
        assert refused(broker.start(RUN, devnull, runtime="/bin/sh"), "/bin/sh")
        assert refused(broker.ask("kill", run=RUN, signal=19), "SIGTERM or SIGKILL")
        assert refused(broker.ask("set-properties", run=RUN, properties={"User": "root"}), "unknown operation")
    finally:
        os.close(devnull)
    assert testhost.units() == []  # nothing reached PID 1


def test_a_valid_start_runs_with_the_profile_the_broker_built(broker: Broker, testhost: TestHost) -> None:
    read_end, write_end = os.pipe()
    try:
        reply = broker.start(RUN, write_end)
        os.close(write_end)
        assert "error" not in reply, reply
        unit = f"unitbox-run-{RUN}.service"
        assert testhost.run("systemctl", "show", "-P", "DynamicUser", unit).stdout.strip() == "yes"
        deadline = time.monotonic() + 30
        while not any(e.get("ev") == "end" and e.get("run") == RUN for e in broker.events):
            assert time.monotonic() < deadline, broker.events
            broker.events.append(broker.receive())
        assert os.read(read_end, 1000) == b"hi from the broker test\n"
        assert [e["ev"] for e in broker.events if e.get("run") == RUN] == ["active", "end"]
        assert (testhost.path(f"{STATE}/runs/{RUN}/result").read_text().splitlines()[-1]) == "end=1"
    finally:
        os.close(read_end)
