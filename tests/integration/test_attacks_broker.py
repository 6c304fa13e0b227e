"""Attack catalogue: the broker is the only process that may ask PID 1 for a
unit, so it checks every request itself — whatever the HTTP-facing daemon
(the process exposed to clients) sends. These tests are that daemon gone
bad: they talk to a real `unitbox broker` on the test host directly —
started as a root daemon's child, and, in the packaged split, through
unitbox-broker.socket from a process running as the daemon's user
`unitbox`. Refused requests never reach systemd and are logged; a valid
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

from tests.support.split import CONFIG as SPLIT_CONFIG
from tests.support.split import SOCKET, VENV_UNITBOX, Split
from tests.support.split import STATE as SPLIT_STATE
from tests.support.testhost import REPO, TestHost, wait_until
from unitbox.broker.wire import socket_pair
from unitbox.limits import Limits
from unitbox.rundir import RunDir

STATE = "/var/lib/unitbox-brokerdirect"
RUN, LINKED = "00000000000000a1", "00000000000000a2"
INPUTS = f"{STATE}/daemon/runs/{RUN}/in"


class Broker:
    def __init__(self, host: TestHost) -> None:
        self.host = host
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

    def start(self, run: str, stdout: int, inputs: str = INPUTS, **fields: Any) -> dict[str, Any]:
        fds = [os.open("/dev/null", os.O_RDONLY), stdout, os.open("/dev/null", os.O_WRONLY),
               os.open(self.host.path(inputs), os.O_RDONLY)]
        request = {"limits": Limits().as_dict(), "runtime": "default", **fields}
        try:
            return self.ask("start", fds, run=run, **request)
        finally:
            for fd in (fds[0], fds[2], fds[3]):
                os.close(fd)

    def close(self) -> None:
        self.sock.close()  # the broker exits when its daemon hangs up
        self.process.wait(10)


@pytest.fixture
def broker(testhost: TestHost) -> Iterator[Broker]:
    testhost.sh(f"rm -rf {STATE} && mkdir -p {STATE}/daemon/runs && chmod 700 {STATE}")
    RunDir(testhost.path(f"{STATE}/daemon/runs/{RUN}"), testhost.path(f"{STATE}/ends/{RUN}")).create(
        b"print('hi from the broker test')\n", b"", [])
    testhost.sh(f"mkdir -p {STATE}/daemon/runs/{LINKED}/in && ln -s /etc/shadow {STATE}/daemon/runs/{LINKED}/in/main.py")
    side = Broker(testhost)
    yield side
    side.close()
    testhost.sh(f"rm -rf {STATE}")


def refused(reply: dict[str, Any], words: str) -> bool:
    return reply.get("kind") == "refused" and words in reply.get("error", "")


def test_a_compromised_daemon_cannot_get_a_unit_past_the_broker(broker: Broker, testhost: TestHost) -> None:
    devnull = os.open("/dev/null", os.O_WRONLY)
    try:
        over = {**Limits().as_dict(), "memory_mb": 1 << 20}
        assert refused(broker.start(RUN, devnull, limits=over), "memory_mb")
        assert refused(broker.start(LINKED, devnull, inputs=f"{STATE}/daemon/runs/{LINKED}/in"), "neither")
        assert refused(broker.start(RUN, devnull, dir="/etc"), "no field 'dir'")
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
        assert (testhost.path(f"{STATE}/ends/{RUN}/result").read_text().splitlines()[-1]) == "end=1"
    finally:
        os.close(read_end)


# -- the packaged split: the daemon as the user `unitbox`, the broker behind a socket (fixture `split`) ----
# Run as the daemon's user by Split.as_front: the daemon taken over, talking to the broker's socket itself.
FRONT = r'''
import array, json, os, socket, sys
SOCKET, RUN, LIMITS = sys.argv[1], "00000000000000b1", json.loads(sys.argv[2])

def connect():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(SOCKET)
    sock.settimeout(30)
    assert json.loads(sock.recv(1 << 20))["ev"] == "ready"
    return sock

asked = 0
def ask(sock, op, fds=(), **fields):
    global asked
    asked += 1
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([json.dumps({"id": asked, "op": op, **fields}).encode()], rights)
    while True:
        message = json.loads(sock.recv(1 << 20))
        if message.get("id") == asked:
            return message

def start(sock, inputs, run=RUN, **fields):
    fds = [os.open("/dev/null", os.O_RDONLY), os.open("/dev/null", os.O_WRONLY), os.open("/dev/null", os.O_WRONLY),
           os.open(inputs, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        return ask(sock, "start", fds, run=run, **{"limits": LIMITS, "runtime": "default", **fields})
    finally:
        for fd in fds:
            os.close(fd)

own = "/tmp/front-inputs"  # the daemon's user's own inputs, and one pointing at root's
os.makedirs(own + "/good", exist_ok=True)
open(own + "/good/main.py", "w").write("print('hi')\n")
os.makedirs(own + "/linked", exist_ok=True)
if not os.path.lexists(own + "/linked/main.py"):
    os.symlink("/etc/shadow", own + "/linked/main.py")
if not os.path.lexists(own + "/etc"):
    os.symlink("/etc", own + "/etc")
sock = connect()
replies = {
    "user_root": start(sock, own + "/good", properties={"User": "root"}),
    "over_maxima": start(sock, own + "/good", limits={**LIMITS, "memory_mb": 1 << 20}),
    "dir_is_etc": start(sock, own + "/good", dir="/etc"),
    "inputs_are_etc": start(sock, "/etc"),
    "inputs_through_a_symlink_to_etc": start(sock, own + "/etc"),
    "input_is_a_symlink_to_shadow": start(sock, own + "/linked"),
    "forged_run_id": start(sock, own + "/good", run="../../../etc/x"),
    "stop_a_unit_that_is_not_a_run": ask(sock, "stop", run="dbus.service"),
    "kill_a_unit_that_is_not_a_run": ask(sock, "kill", run="unitbox-broker.socket", signal=9),
    "stop_signal": ask(sock, "kill", run=RUN, signal=19),
    "forget_a_path": ask(sock, "forget", runs=["../../../etc"]),
    "set_properties": ask(sock, "set-properties", run=RUN, properties={"User": "root"}),
}
print(json.dumps(replies))
'''


def test_a_compromised_daemon_user_cannot_get_a_unit_past_the_socket_activated_broker(split: Split) -> None:
    began = time.time()
    out = split.as_front(FRONT, SOCKET, json.dumps(Limits().as_dict()))
    replies = json.loads(out.strip().splitlines()[-1])
    for name, reply in replies.items():
        assert reply.get("kind") == "refused", (name, reply)
    # The inputs were refused for whose they are, before anything was copied.
    assert "owned by uid 0" in replies["inputs_are_etc"]["error"]
    assert "neither a regular file nor a directory" in replies["input_is_a_symlink_to_shadow"]["error"]
    assert "no field 'properties'" in replies["user_root"]["error"]
    assert split.host.run("systemctl", "list-units", "--all", "--plain", "--no-legend", "unitbox-run-*").stdout == ""
    journal = split.journal("unitbox-broker@*", since=began - 1)
    assert journal.count("broker: refused") >= len(replies), journal
    assert not split.host.path("/run/unitbox-runs/00000000000000b1").exists()


# Connects as whoever runs it; prints what happened.
OTHER_PEER = r'''
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.settimeout(15)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit()
sock.send(json.dumps({"id": 1, "op": "list"}).encode())
try:
    print("answered" if sock.recv(1 << 20) else "hung up")
except (ConnectionResetError, TimeoutError) as exc:
    print(type(exc).__name__)
'''


def test_only_the_daemon_s_user_is_served_whoever_else_reaches_the_socket(split: Split) -> None:
    began = time.time()
    assert split.as_front(OTHER_PEER, SOCKET, user="nobody", group="nogroup").strip() == "EACCES"  # the socket's mode: 0660
    # root passes the socket's mode; the broker checks the peer itself (SO_PEERCRED) and serves nothing.
    assert split.as_front(OTHER_PEER, SOCKET, user="root").strip() in {"hung up", "ConnectionResetError"}
    assert wait_journal(split, "refused a connection from", began)


def test_a_valid_start_from_the_daemon_s_user_runs_and_root_writes_only_its_own_directory(split: Split) -> None:
    run = split.client.run("import os\nprint('uid', os.getuid())\nopen('left.txt', 'w').write('x')\n")
    assert run["state"] == "succeeded" and run["stdout"].startswith("uid "), run
    assert [f["path"] for f in split.client.get(f"/runs/{run['id']}/files").json()["files"]] == ["left.txt"]
    probe = r'''
import os, sys
ends = sys.argv[1]
print(open(ends + "/result").read().splitlines()[-1])
for target in (ends + "/forged", os.path.dirname(ends) + "/forged"):
    try:
        open(target, "w")
        print("WROTE", target)
    except PermissionError:
        print("EACCES")
'''
    seen = split.as_front(probe, f"{SPLIT_STATE}/ends/{run['id']}").split()
    assert seen == ["end=1", "EACCES", "EACCES"], seen  # the daemon reads what root wrote; it cannot write there
    owners = split.host.sh(f"stat -c '%U:%G %a' {SPLIT_STATE}/ends {SPLIT_STATE}/daemon {SPLIT_STATE}").split("\n")
    assert owners[:3] == ["root:unitbox 750", "unitbox:unitbox 700", "root:root 755"], owners
    front = split.host.run("systemctl", "show", "-P", "MainPID", "unitbox.service").stdout.strip()
    assert split.host.sh(f"ps -o user= -p {front}").strip() == "unitbox"


def wait_journal(split: Split, needle: str, since: float) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if needle in split.journal("unitbox-broker@*", since=since - 1):
            return True
        time.sleep(0.2)
    return False


def test_a_runtime_built_by_root_is_listed_and_used_by_the_unprivileged_daemon(split: Split) -> None:
    split.host.path("/etc/unitbox/tiny.txt").write_text("# nothing: the host's Python and a venv of its own\n")
    built = split.host.run(str(VENV_UNITBOX), "--config", SPLIT_CONFIG, "runtime", "build", "tiny", "-r",
                           "/etc/unitbox/tiny.txt", check=False, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    assert wait_until(lambda: "tiny" in {r["name"] for r in split.client.get("/runtimes").json()["runtimes"]}, 10)
    run = split.client.run("import sys\nprint(sys.prefix)\n", runtime="tiny")
    assert (run["state"], run["runtime"], run["stdout"]) == ("succeeded", "tiny", "/run/unitbox/runtime\n"), run
