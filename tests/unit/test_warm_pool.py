"""The broker's warm pools (broker/warm.py) against a fake systemd whose
warm units play the stub: they say `ready`, take the hand-over frame and
"run" the program. What a real unit does with it (the sandbox, the limits
in force, the deadline) is tested on the real test host
(tests/integration/test_attacks_warm.py)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_systemd import FakeSystemd, until
from unitbox.broker import handover, warm
from unitbox.broker.server import BrokerServer
from unitbox.broker.wire import Channel, Message, socket_pair
from unitbox.config import Config, load_config
from unitbox.errors import SystemdError
from unitbox.limits import Limits
from unitbox.rundir import RunDir
from unitbox.systemd import UNKNOWN_END

RUNS = ("0123456789abcdef", "1123456789abcdef", "2123456789abcdef")
MiB = 1 << 20


class Side:
    """The daemon's end of the wire, by hand, keeping the events apart."""

    def __init__(self, config: Config, fake: FakeSystemd, stage_root: Path) -> None:
        self.config, self.fake, self.stage_root = config, fake, stage_root
        fake.stage_root = stage_root
        self.replies: dict[int, Message] = {}
        self.events: list[Message] = []
        ours, theirs = socket_pair()
        self.server = BrokerServer(theirs, config, fake, stage_root=stage_root)
        self.channel = Channel(ours, self._on_message, lambda reason: None)
        self.server.start()
        self._ids = iter(range(1, 1000))

    def _on_message(self, message: Message, fds: list[int]) -> None:
        if "ev" in message:
            self.events.append(message)
        else:
            self.replies[message["id"]] = message

    async def ask(self, op: str, fds: list[int] | None = None, **fields: Any) -> Message:
        request = next(self._ids)
        self.channel.send({"id": request, "op": op, **fields}, fds or [])
        await until(lambda: request in self.replies)
        return self.replies.pop(request)

    async def start(self, run: str, **fields: Any) -> Message:
        fields = {"limits": Limits().as_dict(), "runtime": "default", **fields}
        run_dir = RunDir.of(self.config, run)
        run_dir.create(b"print('hi')\n", b"some input", [])
        self.out_r, out_w = os.pipe()
        fds = [os.open(run_dir.stdin, os.O_RDONLY), out_w, os.open("/dev/null", os.O_WRONLY),
               os.open(run_dir.inputs, os.O_RDONLY)]
        try:
            return await self.ask("start", fds, run=run, **fields)
        finally:
            for fd in fds:
                os.close(fd)

    def ends(self, run: str) -> list[Message]:
        return [e for e in self.events if e.get("run") == run and e["ev"] == "end"]

    async def pool_ready(self, count: int) -> None:
        await until(lambda: self.server._warm.counts()["ready"] >= count)

    def close(self) -> None:
        self.channel.close()
        self.server.close()


def config_of(tmp_path: Path, pool: str = "[warm.default]\nsize = 2\n") -> Config:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "unitbox.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n{pool}')
    return load_config(path, environ={})


@pytest.fixture
async def side(tmp_path: Path) -> AsyncIterator[Side]:
    fake = FakeSystemd(warm=True)
    broker = Side(config_of(tmp_path), fake, tmp_path / "stage")
    yield broker
    broker.close()


async def test_a_fitting_run_is_handed_to_a_ready_unit_with_its_limits_its_stdio_and_its_inputs(side: Side) -> None:
    await side.pool_ready(2)
    assert len(side.fake.warm_started) == 2 and side.fake.started == []
    limits = {**Limits().as_dict(), "memory_mb": 300, "cpu_percent": 50, "tasks": 20, "timeout_s": 7}
    reply = await side.start(RUNS[0], limits=limits)
    unit = reply["ok"]["warm"]
    assert unit in side.fake.warm_started and side.fake.started == []  # no unit of its own
    fake_unit = side.fake.warm_units[unit]
    assert fake_unit.properties_set == [{"Description": f"unitbox run {RUNS[0]} (warm unit {unit[13:25]})",
                                         "CPUQuota": 50, "MemoryMax": 300 * MiB, "TasksMax": 28}]
    frame = json.loads(fake_unit.frame)
    assert frame["nproc"] == 20 and frame["fsize"] == Limits().disk_mb * MiB
    assert frame["env"]["OMP_NUM_THREADS"] == "1"
    stage = fake_unit.stage
    assert stage is not None and (stage / "in" / "main.py").read_bytes() == b"print('hi')\n"
    assert (stage / "run").read_text().strip() == RUNS[0]
    assert float((stage / "deadline").read_text()) - float((stage / "started").read_text()) == pytest.approx(7, 0.01)
    await until(lambda: side.ends(RUNS[0]))
    assert os.read(side.out_r, 100) == b"fake output\n"  # the program's stdout is the run's pipe
    assert (side.config.ends_dir / RUNS[0] / "result").exists()
    assert [e["ev"] for e in side.events if e.get("run") == RUNS[0]] == ["active", "end"]
    await until(lambda: len(side.fake.warm_started) == 3)  # the pool is filled again


@pytest.mark.parametrize(("ending", "left", "oom_kills", "passed_on"), [
    ({"status": 0}, None, 0, 0),
    ({"status": 3}, None, 0, 3),
    ({"status": 9, "killed": True}, None, 0, None),  # the unit's end says by whom (OOM, the deadline, a stop)
    ({"status": 0}, "timed-out", 0, None),  # the deadline passed as it exited: the end decides
    ({"status": 0}, "box/work/plot.png", 0, None),  # files to collect: only the unit's end has them
    ({"status": 0}, "box/out/result.json", 0, None),
    ({"status": 0}, None, 1, None),  # something in the unit was OOM-killed
    ({"status": 0}, None, None, None),  # its cgroup cannot be read
])
async def test_the_program_s_exit_is_passed_on_only_when_the_unit_s_end_can_add_nothing_but_figures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: dict[str, Any], left: str | None,
        oom_kills: int | None, passed_on: int | None) -> None:
    monkeypatch.setattr(handover, "cgroup_oom_kills", lambda cgroup: oom_kills)
    fake = FakeSystemd(warm=True, auto_finish=False)
    broker = Side(config_of(tmp_path), fake, tmp_path / "stage")
    try:
        await broker.pool_ready(2)
        assert fake.exits_of == "unitbox-warm-"  # asked of systemd because there is a pool
        unit = (await broker.start(RUNS[0]))["ok"]["warm"]
        await until(lambda: [e for e in broker.events if e.get("run") == RUNS[0]])  # active
        stage = fake.warm_units[unit].stage
        assert stage is not None
        if left is not None:
            (stage / left).write_bytes(b"x")
        fake.program_exits(unit, **ending)
        fake.program_exits(unit, **ending)  # systemd says it again at the next step of the stop
        await asyncio.sleep(0.05)
        exits = [e for e in broker.events if e.get("run") == RUNS[0] and e["ev"] == "exited"]
        assert exits == ([{"ev": "exited", "run": RUNS[0], "code": passed_on}] if passed_on is not None else [])
        fake.finish(unit)
        await until(lambda: broker.ends(RUNS[0]))  # the unit's end follows either way
    finally:
        broker.close()


@pytest.mark.parametrize("pools", ["", "[warm.default]\nsize = 0\n"])
async def test_without_a_pool_no_exit_is_asked_of_systemd(tmp_path: Path, pools: str) -> None:
    fake = FakeSystemd()
    broker = Side(config_of(tmp_path, pools), fake, tmp_path / "stage")
    await until(lambda: fake.opened)
    assert fake.exits_of == ""  # PropertiesChanged: every unit's comes to a listener, not listened to
    broker.close()


async def test_runs_that_do_not_fit_start_cold(side: Side) -> None:
    await side.pool_ready(2)
    assert (await side.start(RUNS[0], limits={**Limits().as_dict(), "disk_mb": 32}))["ok"] is None  # another box size
    assert (await side.start(RUNS[1], lint="only"))["ok"] is None  # the lint steps are fixed at start
    assert side.fake.started == [f"unitbox-run-{RUNS[0]}.service", f"unitbox-run-{RUNS[1]}.service"]
    assert (await side.start(RUNS[2], runtime="nope"))["kind"] == "refused"
    assert side.server._warm.stats.hits == 0 and side.server._warm.stats.misses == 2
    assert all(u.properties_set == [] for u in side.fake.warm_units.values())


async def test_a_failed_hand_over_stops_the_unit_and_the_run_starts_cold(side: Side,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    await side.pool_ready(2)

    def refuse(name: str, properties: Any) -> None:
        raise SystemdError("Unit not loaded (fake)")
    monkeypatch.setattr(side.fake, "set_unit_properties", refuse)
    reply = await side.start(RUNS[0])
    assert reply["ok"] is None and side.fake.started == [f"unitbox-run-{RUNS[0]}.service"]
    assert len(side.fake.warm_stopped) == 1
    await until(lambda: side.ends(RUNS[0]))


async def test_the_run_s_deadline_is_the_broker_s_timer(side: Side) -> None:
    side.fake.auto_finish = False
    await side.pool_ready(2)
    reply = await side.start(RUNS[0], limits={**Limits().as_dict(), "timeout_s": 0.2})
    unit = reply["ok"]["warm"]
    stage = side.fake.warm_units[unit].stage
    assert stage is not None
    await until(lambda: (unit, 9) in side.fake.killed, 2)
    assert (stage / "timed-out").exists()  # ExecStopPost records service_result=timeout from it


async def test_units_that_never_get_ready_pause_their_pool(tmp_path: Path) -> None:
    fake = FakeSystemd(warm=False)  # its stubs never say ready …
    broker = Side(config_of(tmp_path), fake, tmp_path / "stage")
    try:
        while broker.server._warm.stats.failed < 3:
            await until(lambda: len(fake.warm_units) > 0)
            for name in list(fake.warm_units):  # … and end: a preload that cannot be imported
                fake.finish(name)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        started = len(fake.warm_started)
        for name in fake.warm_started[4:]:
            fake.finish(name)
        await asyncio.sleep(0.1)
        assert len(fake.warm_started) == started  # paused: no new unit for a while
        reply = await broker.start(RUNS[0])
        assert reply["ok"] is None  # runs start cold meanwhile
    finally:
        broker.close()


async def test_a_pool_warms_up_a_bounded_number_of_units_at_once(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warm, "WARMING_AT_ONCE", 1)  # so refills do not crowd out runs at saturation
    fake = FakeSystemd(warm=False)  # its stubs say ready only when the test says so
    broker = Side(config_of(tmp_path, "[warm.default]\nsize = 3\n"), fake, tmp_path / "stage")
    try:
        for ready in range(3):
            await until(lambda n=ready + 1: len(fake.warm_started) == n)
            await asyncio.sleep(0.05)
            assert len(fake.warm_started) == ready + 1  # the next waits for this one
            stub = fake.warm_units[fake.warm_started[-1]].stub
            assert stub is not None
            stub.send(b"ready")
        await until(lambda: broker.server._warm.counts()["ready"] == 3)
        await asyncio.sleep(0.05)
        assert len(fake.warm_started) == 3
    finally:
        broker.close()


async def test_a_new_broker_adopts_units_holding_a_run_and_stops_idle_ones(tmp_path: Path) -> None:
    fake = FakeSystemd(warm=True, auto_finish=False)
    config = config_of(tmp_path)
    first = Side(config, fake, tmp_path / "stage")
    await first.pool_ready(2)
    unit = (await first.start(RUNS[0], limits={**Limits().as_dict(), "timeout_s": 30}))["ok"]["warm"]
    await until(lambda: len(fake.warm_started) == 3)
    await first.pool_ready(2)
    idle = [name for name in fake.warm_units if name != unit]
    first.channel.close()  # the daemon went away; the old broker exits without stopping anything
    await until(first.server.done.is_set)
    second = Side(config, fake, tmp_path / "stage")
    try:
        assert set(idle) <= set(fake.warm_stopped) and unit not in fake.warm_stopped
        assert second.server._warm.unit_of(RUNS[0]) == unit
        probe = await second.ask("probe", run=RUNS[0])
        assert probe["ok"]["info"][0] == f"unitbox-run-{RUNS[0]}.service"  # the daemon knows runs, not slots
        listed = [info[0] for info in (await second.ask("list"))["ok"]]
        assert f"unitbox-run-{RUNS[0]}.service" in listed
        await second.ask("stop", run=RUNS[0])
        assert unit in fake.stopped + fake.warm_stopped
        await until(lambda: second.ends(RUNS[0]))
    finally:
        second.close()
        first.server.close()


async def test_another_daemon_s_units_are_left_alone(tmp_path: Path) -> None:
    fake = FakeSystemd(warm=True)
    mine = Side(config_of(tmp_path / "a"), fake, tmp_path / "stage")
    await mine.pool_ready(2)
    other = Side(config_of(tmp_path / "b"), fake, tmp_path / "stage")
    try:
        await other.pool_ready(2)
        assert fake.warm_stopped == []  # same host, same staging root, another state directory
    finally:
        other.close()
        mine.close()


async def test_a_lookup_of_the_run_s_own_unit_name_does_not_end_a_handed_over_run(side: Side) -> None:
    """`systemctl status unitbox-run-<id>` loads a unit of that name, which systemd unloads at
    once (UnitRemoved): for a run in a warm unit that name never existed, and says nothing."""
    side.fake.auto_finish = False
    await side.pool_ready(2)
    unit = (await side.start(RUNS[0]))["ok"]["warm"]
    side.fake._emit(f"unitbox-run-{RUNS[0]}.service", UNKNOWN_END)
    await asyncio.sleep(0.05)
    assert side.ends(RUNS[0]) == []
    side.fake.finish(unit)
    await until(lambda: side.ends(RUNS[0]))
