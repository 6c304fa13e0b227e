"""The broker refuses, with a clear error and a log line, what the daemon
must never get past it: limits above the maxima, a malformed id, fields
that would say how to build the unit, inputs it does not own or that are
not plain files and directories, an unknown runtime, a signal it does not
send. These tests talk to the broker's server directly over the real wire
(a fake systemd behind it records what would have reached PID 1)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_systemd import FakeSystemd
from unitbox.broker.server import BrokerServer
from unitbox.broker.wire import Channel, Message, socket_pair
from unitbox.config import Config, load_config
from unitbox.errors import SystemdError
from unitbox.limits import Limits
from unitbox.rundir import RunDir
from unitbox.unit_scripts import LINT_SCRIPT

RUN = "0123456789abcdef"
OTHER_UID = 4242


class Daemon:
    """The daemon's end of the wire, by hand."""

    def __init__(self, config: Config, fake: FakeSystemd, stage_root: Path) -> None:
        self.config, self.fake, self.stage_root = config, fake, stage_root
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        ours, theirs = socket_pair()
        self.server = BrokerServer(theirs, config, fake, stage_root=stage_root)
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

    async def start(self, run: str = RUN, fds: list[int] | None = None, inputs: Path | None = None,
                    **fields: Any) -> Message:
        fields = {"limits": Limits().as_dict(), "runtime": "default", **fields}
        if fds is None:
            inputs = inputs or RunDir.of(self.config, RUN).inputs
            fds = [os.open("/dev/null", flags) for flags in (os.O_RDONLY, os.O_WRONLY, os.O_WRONLY)] \
                + [os.open(inputs, os.O_RDONLY)]
        try:
            return await self.ask("start", fds, run=run, **fields)
        finally:
            for fd in fds:
                os.close(fd)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    config = load_config(Path("/dev/null"), environ={}, cli={"state_dir": str(tmp_path / "state")})
    run = RunDir.of(config, RUN)
    run.create(b"print('hi')\n", b"", ["a"], files=[("data/x.txt", b"x" * 10)])
    side = Daemon(config, FakeSystemd(auto_finish=False), tmp_path / "stage")
    assert (await asyncio.wait_for(side.messages.get(), 5))["ev"] == "ready"
    yield side
    side.channel.close()
    side.server.close()


def refused(reply: Message, *words: str) -> bool:
    return reply.get("kind") == "refused" and all(word in reply["error"] for word in words)


async def test_a_valid_start_stages_the_inputs_and_reaches_systemd_with_the_broker_s_profile(
        daemon: Daemon) -> None:
    reply = await daemon.start()
    assert "error" not in reply, reply
    properties = daemon.fake.properties[f"unitbox-run-{RUN}.service"]
    assert properties["MemoryMax"] == 256 * 1024 * 1024 and properties["DynamicUser"] is True
    staged = daemon.stage_root / RUN / "in"
    assert (staged / "main.py").read_bytes() == b"print('hi')\n"
    assert (staged / "files" / "data" / "x.txt").read_bytes() == b"x" * 10
    assert (staged / "main.py").stat().st_mode & 0o777 == 0o644
    ends = daemon.config.ends_dir / RUN
    assert ends.is_dir() and daemon.config.ends_dir.stat().st_mode & 0o777 == 0o750
    stop_post = properties["ExecStopPost"]
    assert stop_post[stop_post.index("unitbox-stop-post") + 2] == str(ends)  # root writes only there


async def test_a_retried_start_keeps_the_first_staged_copy_and_a_failed_one_leaves_no_stage(
        daemon: Daemon) -> None:
    assert "error" not in await daemon.start()
    staged = daemon.stage_root / RUN / "in" / "main.py"
    first = staged.stat().st_ino
    assert (await daemon.start())["kind"] == "exists"  # the unit is running on it: kept
    assert staged.stat().st_ino == first
    daemon.fake.start_error = SystemdError("refused by the fake")
    assert (await daemon.start("fedcba9876543210", inputs=RunDir.of(daemon.config, RUN).inputs))["kind"] \
        == "systemd"
    assert not (daemon.stage_root / "fedcba9876543210").exists()


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
    assert refused(await daemon.ask("forget", runs=[RUN, run]), "malformed run id")
    assert daemon.fake.started == [] and daemon.fake.stopped == []


async def test_a_start_that_says_how_to_build_the_unit_is_refused_and_logged(
        daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "unitbox.broker.server"):
        assert refused(await daemon.start(properties={"User": "root"}), "no field 'properties'")
        assert refused(await daemon.start(dir="/etc"), "no field 'dir'")
    assert daemon.fake.started == []
    assert sum("refused start" in r.getMessage() and "properties" in r.getMessage() for r in caplog.records) == 1


async def test_inputs_the_daemon_s_user_does_not_own_are_refused(daemon: Daemon, tmp_path: Path) -> None:
    inputs = RunDir.of(daemon.config, RUN).inputs
    os.chown(inputs / "argv", OTHER_UID, OTHER_UID)  # e.g. a hard link to a file of someone else's
    assert refused(await daemon.start(), "'argv'", f"uid {OTHER_UID}")
    os.chown(inputs / "argv", 0, 0)
    # /etc as the inputs directory: root's, but not the daemon's user in the split — here the
    # daemon is root, so a directory of another user stands for it.
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, OTHER_UID, OTHER_UID)
    assert refused(await daemon.start(inputs=other), "inputs directory", f"uid {OTHER_UID}")
    assert refused(await daemon.start(fds=[os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
                                      + [os.open(inputs / "main.py", os.O_RDONLY)]), "not a directory")
    assert daemon.fake.started == []
    assert not (daemon.stage_root / RUN).exists()


@pytest.mark.parametrize("plant", ["symlink", "fifo", "symlinked-dir"])
async def test_inputs_that_are_not_plain_files_and_directories_are_refused(daemon: Daemon, plant: str) -> None:
    inputs = RunDir.of(daemon.config, RUN).inputs
    match plant:
        case "symlink":
            (inputs / "files" / "passwd").symlink_to("/etc/shadow")
        case "fifo":
            os.mkfifo(inputs / "files" / "pipe")
        case "symlinked-dir":
            (inputs / "files" / "etc").symlink_to("/etc", target_is_directory=True)
    assert refused(await daemon.start(), "neither a regular file nor a directory")
    assert daemon.fake.started == []
    assert not (daemon.stage_root / RUN).exists()


async def test_inputs_over_the_configured_sizes_are_refused(daemon: Daemon) -> None:
    inputs = RunDir.of(daemon.config, RUN).inputs
    (inputs / "files" / "big").write_bytes(b"x" * (daemon.config.max_request_kb * 1024 + 128 * 1024))
    assert refused(await daemon.start(), "larger than the configuration allows")
    (inputs / "files" / "big").unlink()
    for index in range(2 * daemon.config.files.input_count + 4):
        (inputs / "files" / f"f{index}").write_bytes(b"")
    assert refused(await daemon.start(), "larger than the configuration allows")
    assert daemon.fake.started == []


async def test_forget_removes_only_the_broker_s_ends_directory(daemon: Daemon) -> None:
    assert "error" not in await daemon.start()
    ends = daemon.config.ends_dir / RUN
    (ends / "result").write_text("end=1\n")
    assert "error" not in await daemon.ask("forget", runs=[RUN, "fedcba9876543210"])
    assert not ends.exists() and RunDir.of(daemon.config, RUN).inputs.exists()
    assert refused(await daemon.ask("forget", runs="0123456789abcdef"), "must be a list")


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
    assert [r["id"] for r in replies] == ids and all(r["ok"]["version"] == "252-fake" for r in replies)


async def test_staged_inputs_are_readable_by_the_run_whatever_the_broker_s_umask(daemon: Daemon) -> None:
    previous = os.umask(0o077)  # a root daemon's unit has UMask=0077, and its child broker inherits it
    try:
        assert "error" not in await daemon.start()
    finally:
        os.umask(previous)
    staged = daemon.stage_root / RUN / "in"
    assert {p.stat().st_mode & 0o777 for p in staged.rglob("*") if p.is_file()} == {0o644}
    assert {p.stat().st_mode & 0o777 for p in [staged, *staged.rglob("*")] if p.is_dir()} == {0o755}


async def test_an_unanswered_start_keeps_its_staged_inputs_for_the_unit_pid_1_may_still_create(
        daemon: Daemon) -> None:
    daemon.fake.unanswered_starts, daemon.fake.unanswered_goes_through = 1, True
    assert (await daemon.start())["kind"] == "no_answer"
    assert (daemon.stage_root / RUN / "in" / "main.py").exists()


async def test_the_broker_starts_no_more_live_units_than_twice_max_concurrent_and_a_margin(
        tmp_path: Path) -> None:
    config = load_config(Path("/dev/null"), environ={}, cli={"state_dir": str(tmp_path / "state"),
                                                            "max_concurrent": 1})
    ids = [f"{i:016x}" for i in range(20)]
    for run in ids:
        RunDir.of(config, run).create(b"print(1)\n", b"", [])
    fake = FakeSystemd(auto_finish=False)
    side = Daemon(config, fake, tmp_path / "stage")
    assert (await asyncio.wait_for(side.messages.get(), 5))["ev"] == "ready"
    try:
        for run in ids[:18]:  # twice max_concurrent (1), and 16
            assert "error" not in await side.start(run, inputs=RunDir.of(config, run).inputs)
        assert refused(await side.start(ids[18], inputs=RunDir.of(config, ids[18]).inputs), "at most 18")
        fake.finish(f"unitbox-run-{ids[0]}.service")  # one ends: room again
        assert "error" not in await side.start(ids[18], inputs=RunDir.of(config, ids[18]).inputs)
    finally:
        side.channel.close()
        side.server.close()
