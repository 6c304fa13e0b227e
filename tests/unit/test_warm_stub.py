"""The warm unit's stub (unit_scripts.WARM_STUB), run for real as a local
process: the frame and fds the broker sends, the program's own stdio,
rlimits and thread variables, and an exit status that is the program's. The
rest of the unit (its sandbox) is the test host's to check
(tests/integration/test_attacks_warm.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from unitbox.unit_scripts import WARM_STUB

StartStub = Callable[..., "Stub"]
SPAWNS_A_THREAD = "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"


@dataclass
class Stub:
    process: subprocess.Popen[bytes]
    sock: socket.socket
    out: int
    err: int

    def read(self, fd: int) -> bytes:
        data = b""
        while chunk := os.read(fd, 4096):
            data += chunk
        return data


@pytest.fixture
def start_stub(tmp_path: Path) -> Iterator[StartStub]:
    started: list[Stub] = []

    def start(program: str, preload: tuple[str, ...] = ()) -> Stub:
        (tmp_path / "spawns_a_thread.py").write_text(SPAWNS_A_THREAD)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = subprocess.Popen([sys.executable, "-c", WARM_STUB + program, *preload], stdin=theirs,
                                   stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(tmp_path)})
        theirs.close()
        ours.settimeout(10)
        assert ours.recv(64) == b"ready"
        stdin = tmp_path / "stdin"
        stdin.write_bytes(b"the input\n")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        stdin_fd = os.open(stdin, os.O_RDONLY)
        frame = json.dumps({"nproc": 100, "fsize": 1 << 30, "env": {"OMP_NUM_THREADS": "1"}}).encode()
        socket.send_fds(ours, [frame], [stdin_fd, out_w, err_w])
        for fd in (stdin_fd, out_w, err_w):
            os.close(fd)  # the stub's copies are the only writers now
        stub = Stub(process, ours, out_r, err_r)
        started.append(stub)
        return stub
    yield start
    for stub in started:
        if stub.process.poll() is None:
            stub.process.kill()
        stub.process.wait()
        stub.sock.close()
        os.close(stub.out)
        os.close(stub.err)


def test_the_program_gets_the_run_s_stdio_limits_and_variables_and_its_exit_is_the_unit_s(
        start_stub: StartStub) -> None:
    stub = start_stub("import os, resource, sys\nprint(sys.stdin.read().upper(), end='')\n"
                      "print('to stderr', file=sys.stderr)\nprint(os.environ['OMP_NUM_THREADS'])\n"
                      "print(resource.getrlimit(resource.RLIMIT_NPROC)[0], os.get_inheritable(0))\n"
                      "sys.stdin.seek(0)\nprint(sys.stdin.read(3))\nsys.exit(3)\n", preload=("spawns_a_thread",))
    assert stub.read(stub.out) == b"THE INPUT\n1\n100 True\nthe\n"  # stdin a seekable file, as in a cold run
    assert stub.read(stub.err) == b"to stderr\n"
    assert stub.process.wait(10) == 3


def test_the_socket_is_gone_before_the_program_runs(start_stub: StartStub) -> None:
    stub = start_stub("import os\nsockets = 0\nfor fd in os.listdir('/proc/self/fd'):\n"
                      "    try:\n        sockets += os.readlink(f'/proc/self/fd/{fd}').startswith('socket:')\n"
                      "    except OSError:\n        pass  # the listing's own fd\nprint(sockets)\n")
    assert stub.read(stub.out) == b"0\n"  # nothing it runs can speak to the broker
    assert stub.process.wait(10) == 0
