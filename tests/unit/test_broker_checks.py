"""The broker refuses, with a clear error, what the daemon must never get
past it: limits above the maxima, a malformed id, a run directory that is a
symlink or outside the state dir, an unknown runtime, a signal it does not
send. These tests talk to the broker's server directly over the real wire
(a fake systemd behind it records what would have reached PID 1)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_systemd import FakeSystemd
from unitbox.broker.server import BrokerServer
from unitbox.broker.wire import Channel, Message, socket_pair
from unitbox.config import Config, load_config
from unitbox.limits import Limits
from unitbox.unit_scripts import LINT_SCRIPT

RUN = "0123456789abcdef"


class Daemon:
    """The daemon's end of the wire, by hand."""

    def __init__(self, config: Config, fake: FakeSystemd) -> None:
        self.config, self.fake = config, fake
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        ours, theirs = socket_pair()
        self.server = BrokerServer(theirs, config, fake)
        self.channel = Channel(ours, lambda message, fds: self.messages.put_nowait(message), lambda reason: None)
        self.server.start()
        self._ids = iter(range(1, 1000))

    async def ask(self, op: str, fds: list[int] | None = None, **fields: Any) -> Message:
        request = next(self._ids)
        self.channel.send({"id": request, "op": op, **fields}, fds or [])
        while True:
            message = await asyncio.wait_for(self.messages.get(), 5)
            if message.get("id") == request:
                return message

    async def start(self, run: str = RUN, fds: list[int] | None = None, **fields: Any) -> Message:
        run_dir = self.config.runs_dir / str(run)
        fields = {"limits": Limits().as_dict(), "runtime": "default", "dir": str(run_dir), **fields}
        if fds is None:
            fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
        try:
            return await self.ask("start", fds, run=run, **fields)
        finally:
            for fd in fds:
                os.close(fd)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    config = load_config(Path("/dev/null"), environ={}, cli={"state_dir": str(tmp_path / "state")})
    (config.runs_dir / RUN).mkdir(parents=True)
    side = Daemon(config, FakeSystemd(auto_finish=False))
    assert (await asyncio.wait_for(side.messages.get(), 5))["ev"] == "ready"
    yield side
    side.channel.close()
    side.server.close()


def refused(reply: Message, *words: str) -> bool:
    return reply.get("kind") == "refused" and all(word in reply["error"] for word in words)


async def test_a_valid_start_reaches_systemd_with_the_profile_the_broker_built(daemon: Daemon) -> None:
    reply = await daemon.start()
    assert "error" not in reply, reply
    properties = daemon.fake.properties[f"unitbox-run-{RUN}.service"]
    assert properties["MemoryMax"] == 256 * 1024 * 1024 and properties["DynamicUser"] is True


async def test_limits_above_the_maxima_are_refused(daemon: Daemon) -> None:
    limits = {**Limits().as_dict(), "memory_mb": daemon.config.maximum_limits.memory_mb + 1}
    assert refused(await daemon.start(limits=limits), "memory_mb", "at most")
    assert refused(await daemon.start(limits={"memory_mb": 1}), "limits must name")
    assert refused(await daemon.start(limits={**Limits().as_dict(), "tasks": 1}), "tasks")
    assert daemon.fake.started == []


@pytest.mark.parametrize("run", ["../../etc", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", 7, None])
async def test_a_malformed_run_id_is_refused(daemon: Daemon, run: Any) -> None:
    for op in ("start", "stop", "probe"):
        reply = await (daemon.start(run) if op == "start" else daemon.ask(op, run=run))
        assert refused(reply, "malformed run id"), reply
    assert daemon.fake.started == [] and daemon.fake.stopped == []


async def test_a_run_directory_outside_the_state_dir_or_not_its_own_is_refused(daemon: Daemon,
                                                                              tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / RUN
    elsewhere.mkdir(parents=True)
    assert refused(await daemon.start(dir=str(elsewhere)), "is not")
    assert refused(await daemon.start(dir=str(daemon.config.runs_dir / RUN / ".." / RUN)), "is not")
    assert refused(await daemon.start(dir=str(daemon.config.runs_dir / "fedcba9876543210")), "is not")
    assert refused(await daemon.start("fedcba9876543210"), "missing")  # its own path, but no directory
    assert daemon.fake.started == []


async def test_a_symlinked_run_directory_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    other = "fedcba9876543210"
    (daemon.config.runs_dir / other).symlink_to(target)
    assert refused(await daemon.start(other), "symlink")
    # … anywhere on the way: the runs dir itself swapped for a link
    runs = daemon.config.runs_dir
    runs.rename(tmp_path / "real-runs")
    runs.symlink_to(tmp_path / "real-runs")
    assert refused(await daemon.start(), "symlink")
    assert daemon.fake.started == []


async def test_unknown_runtimes_signals_and_operations_and_missing_fds_are_refused(daemon: Daemon) -> None:
    assert refused(await daemon.start(runtime="no-such-runtime"), "no-such-runtime")
    assert refused(await daemon.start(fds=[os.open("/dev/null", os.O_RDONLY)]), "file descriptors")
    assert refused(await daemon.ask("kill", run=RUN, signal=1), "SIGTERM or SIGKILL")
    assert refused(await daemon.ask("set-property", run=RUN), "unknown operation")
    assert daemon.fake.started == [] and daemon.fake.killed == []


async def test_lint_modes_are_checked_and_build_the_linter_into_the_unit(daemon: Daemon) -> None:
    assert refused(await daemon.start(lint="sometimes"), "lint must be one of")
    assert refused(await daemon.start(lint=["only"]), "lint must be one of")
    assert daemon.fake.started == []
    assert "error" not in await daemon.start(lint="only")
    properties = daemon.fake.properties[f"unitbox-run-{RUN}.service"]
    assert properties["ExecStart"][:3] == [":/bin/sh", "-c", LINT_SCRIPT]  # the program itself never starts


async def test_replies_come_in_order_for_pipelined_requests(daemon: Daemon) -> None:
    ids = []
    for _ in range(50):
        request = len(ids) + 100
        daemon.channel.send({"id": request, "op": "health"})
        ids.append(request)
    replies = [await asyncio.wait_for(daemon.messages.get(), 5) for _ in ids]
    assert [r["id"] for r in replies] == ids and all(r["ok"] == "252-fake" for r in replies)
