"""A fake of the systemd adapter for the fast tiers: no D-Bus, no sandbox. It
sits behind a real broker server (in the test's own loop, over a real
socketpair: `fake_broker`) and plays a unit's life (active → output → ExecStopPost's result file → over)
through the same typed events as the real adapter, and can misbehave the
ways PID 1 and the bus do: merged signals (only the end arrives), signals
lost, a dropped bus, a start that fails half-way, a unit that ends by itself
just as a cancel reaches it. Everything docs/sandbox.md and SECURITY.md
promise is tested against the real systemd in tests/integration/."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unitbox.broker.client import Broker, in_process_spawner
from unitbox.config import Config
from unitbox.errors import SystemdError
from unitbox.systemd import MainExited, NoAnswer, UnitActive, UnitEnd, UnitEvent, UnitInfo


@dataclass
class FakeUnit:
    run_dir: Path | None  # None: a warm unit not (yet) handed a run
    fds: dict[str, int]
    end: UnitEnd | None = None
    activated_at: float | None = None
    stage: Path | None = None  # a warm unit's: where the broker writes the run's id
    stub: socket.socket | None = None  # a warm unit's end of the broker's socket, while it waits
    frame: bytes = b""  # what the broker handed it (JSON)
    properties_set: list[Mapping[str, Any]] | None = None


class FakeSystemd:
    def __init__(self, *, auto_finish: bool = True, stdout: bytes = b"fake output\n", exit_status: int = 0,
                 merge_signals: bool = False, lose_signals: bool = False, record_outcome: bool = True,
                 start_error: BaseException | None = None, natural_end_on_stop: bool = False,
                 unanswered_starts: int = 0, unanswered_goes_through: bool = False, warm: bool = False) -> None:
        self.auto_finish = auto_finish
        self.stdout = stdout
        self.exit_status = exit_status
        self.merge_signals = merge_signals  # only the end arrives, never "active"
        self.lose_signals = lose_signals  # no event at all: only a look (probe) finds the end
        self.record_outcome = record_outcome  # ExecStopPost writes the result file
        self.leftovers: dict[str, bytes] = {}  # files ExecStopPost's collector leaves in the run dir (relative paths)
        self.start_error = start_error  # raised by start_transient_service
        self.natural_end_on_stop = natural_end_on_stop  # the program exits 0 just before a stop/kill lands
        self.unanswered_starts = unanswered_starts  # so many starts get no answer in time (NoAnswer) …
        self.unanswered_goes_through = unanswered_goes_through  # … and still create their unit, or not
        self.warm = warm  # warm units play the stub: ready, then run what is handed over (else they never get ready)
        self.warm_started: list[str] = []
        self.warm_stopped: list[str] = []
        self.stage_root: Path | None = None  # where the broker under test stages runs (warm units' directories)
        self.warm_units: dict[str, FakeUnit] = {}  # apart from `units`, which are runs' own
        self.start_requests: list[str] = []
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.killed: list[tuple[str, int]] = []
        self.properties: dict[str, Mapping[str, Any]] = {}
        self.reachable = True
        self.opened = 0
        self.units: dict[str, FakeUnit] = {}
        self.silenced: set[str] = set()  # units whose events are not sent (e.g. a dead broker's)
        self._on_event: Callable[[str, UnitEvent], None] | None = None
        self.exits_of = ""  # units whose main process's end is reported (open's `exits_of`)
        self._on_lost: Callable[[str], None] = lambda reason: None

    # -- connection ----------------------------------------------------------
    def open(self, on_event: Callable[[str, UnitEvent], None], on_lost: Callable[[str], None],
             prefix: str, exits_of: str = "") -> None:
        if not self.reachable:
            raise SystemdError("cannot talk to systemd over the system bus: fake outage")
        self.opened += 1
        self._on_event, self._on_lost, self.exits_of = on_event, on_lost, exits_of

    def close(self) -> None:
        self._on_event = None
        for unit in self.warm_units.values():  # as PID 1 would once the broker is gone: its stub exits
            if unit.stub is not None:
                unit.stub.close()
                unit.stub = None

    def drop_bus(self) -> None:
        """The connection breaks: events stop until the owner reconnects."""
        self.reachable = False
        on_lost, self._on_event = self._on_lost, None
        on_lost("fake: the bus went away")

    def restore_bus(self) -> None:
        self.reachable = True

    def _check(self) -> None:
        if not self.reachable:
            raise SystemdError("not connected to systemd")

    # -- units ---------------------------------------------------------------
    def start_transient_service(self, name: str, properties: Mapping[str, Any],
                                stdio: Mapping[str, int] | None = None) -> None:
        self._check()
        if name.startswith("unitbox-warm-"):  # the misbehaviours below are for runs' own units
            self._start_warm(name, properties, stdio or {})
            return
        self.start_requests.append(name)
        if self.start_error is not None:
            raise self.start_error
        unanswered = self.unanswered_starts > 0
        if unanswered:
            self.unanswered_starts -= 1
            if not self.unanswered_goes_through:
                raise NoAnswer("systemd StartTransientUnit: systemd did not answer in time (fake)")
        if name in self.units:
            raise SystemdError(f"Unit {name} already exists.")
        self.started.append(name)
        self.properties[name] = properties
        stop_post = properties["ExecStopPost"]
        run_dir = Path(stop_post[stop_post.index("unitbox-stop-post") + 2])  # after the stage dir
        fds = {stream: os.dup(fd) for stream, fd in (stdio or {}).items()}  # the caller closes its own
        self.units[name] = FakeUnit(run_dir, fds)
        if self.auto_finish:
            asyncio.get_running_loop().call_soon(self.finish, name)
        if unanswered:
            raise NoAnswer("systemd StartTransientUnit: systemd did not answer in time (fake)")

    def _start_warm(self, name: str, properties: Mapping[str, Any], stdio: Mapping[str, int]) -> None:
        self.warm_started.append(name)
        self.properties[name] = properties
        # The broker's staging root (the profile names the host's /run/unitbox-runs, not the test's).
        stage = (self.stage_root or Path("/run/unitbox-runs")) / f"warm-{name[len('unitbox-warm-'):-len('.service')]}"
        unit = self.warm_units[name] = FakeUnit(None, {}, stage=stage, properties_set=[])
        if self.stage_root is not None:  # as ExecStartPre mounts it: where the program may leave files
            for place in ("work", "out"):
                (stage / "box" / place).mkdir(parents=True, exist_ok=True)
        unit.stub = socket.socket(fileno=os.dup(stdio["input"]))  # held: else the broker reads EOF
        unit.stub.setblocking(False)
        if self.warm:  # else it never gets ready
            loop = asyncio.get_running_loop()
            loop.call_soon(unit.stub.send, b"ready")
            loop.add_reader(unit.stub.fileno(), self._handed_over, name)

    def _handed_over(self, name: str) -> None:
        unit = self.warm_units[name]
        assert unit.stub is not None and unit.stage is not None
        asyncio.get_running_loop().remove_reader(unit.stub.fileno())
        try:
            frame, fds, _flags, _ = socket.recv_fds(unit.stub, 4096, 3)
        except OSError:
            frame, fds = b"", []
        unit.stub.close()
        unit.stub = None
        if not frame:  # the broker is gone: the stub exits, the unit ends with no run
            self.finish(name)
            return
        unit.frame = frame
        unit.fds = dict(zip(("input", "output", "error"), fds, strict=True))
        stop_post = self.properties[name]["ExecStopPost"]
        ends = Path(stop_post[stop_post.index("unitbox-stop-post") + 2])
        unit.run_dir = ends / (unit.stage / "run").read_text().strip()
        if self.auto_finish:
            asyncio.get_running_loop().call_soon(self.finish, name)

    def program_exits(self, name: str, status: int = 0, *, killed: bool = False, result: str | None = None) -> None:
        """A warm unit's program ends (exit `status`, or killed by signal `status`):
        its output written, its processes gone, and MainExited said as systemd says
        it when the unit enters ExecStopPost (for units under `exits_of` only).
        The unit is not over yet."""
        unit = self.warm_units[name]
        if "output" in unit.fds:
            os.write(unit.fds["output"], self.stdout)
        self._close_fds(unit)
        if self.exits_of and name.startswith(self.exits_of):
            result = result or ("signal" if killed else "success" if status == 0 else "exit-code")
            self._emit(name, MainExited(result, "killed" if killed else "exited", str(status)))

    def set_unit_properties(self, name: str, properties: Mapping[str, Any]) -> None:
        self._check()
        unit = self._unit(name)
        if unit is None or unit.end is not None:
            raise SystemdError(f"Unit {name} not loaded.")
        assert unit.properties_set is not None
        unit.properties_set.append(properties)

    def control_group(self, name: str) -> str:
        return f"/fake.slice/{name}"

    def _unit(self, name: str) -> FakeUnit | None:
        return self.units.get(name) or self.warm_units.get(name)

    def activate(self, name: str) -> None:
        if (unit := self._unit(name)) is not None:
            unit.activated_at = time.time()
        self._emit(name, UnitActive(time.time()))

    def finish(self, name: str, result: str = "success", exit_code: str = "exited",
               exit_status: str | None = None, exited_at: float | None = None) -> None:
        unit = self._unit(name)
        if unit is None or unit.end is not None:
            return
        if not self.merge_signals and unit.stage is None:
            self.activate(name)
        if unit.stub is not None:
            with contextlib.suppress(ValueError):
                asyncio.get_running_loop().remove_reader(unit.stub.fileno())
            unit.stub.close()
            unit.stub = None
        if unit.run_dir is None:  # a warm unit that never had a run: nothing is recorded
            unit.end = UnitEnd("success", "exited", "0", None, time.time())
            self._emit(name, unit.end)
            return
        if "output" in unit.fds:
            with contextlib.suppress(BrokenPipeError):  # its reader is gone (a daemon stopped without fd store)
                os.write(unit.fds["output"], self.stdout)
        self._close_fds(unit)
        status = exit_status if exit_status is not None else str(self.exit_status)
        if result == "success" and status != "0":
            result = "exit-code"
        for relative, content in self.leftovers.items():  # what collect.py would have taken
            (unit.run_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            (unit.run_dir / relative).write_bytes(content)
        if self.record_outcome:
            (unit.run_dir / "result").write_text(
                f"service_result={result}\nexit_code={exit_code}\nexit_status={status}\n"
                "cpu_ns=1000000\nmemory_peak=4096\noom_kill=0\nend=1\n")
        now = time.time()
        unit.end = UnitEnd(result, exit_code, status, now - 0.01, exited_at or now)
        self._emit(name, unit.end)

    def _emit(self, name: str, event: UnitEvent) -> None:
        if self._on_event is None or not self.reachable or self.lose_signals or name in self.silenced:
            return
        self._on_event(name, event)

    @staticmethod
    def _close_fds(unit: FakeUnit) -> None:
        for fd in unit.fds.values():
            os.close(fd)
        unit.fds.clear()

    def _live(self, name: str) -> bool:
        unit = self._unit(name)
        return unit is not None and unit.end is None

    def stop_unit(self, name: str) -> None:
        self._check()
        (self.warm_stopped if name in self.warm_units else self.stopped).append(name)
        self._end_by(name, "9")

    def kill_unit(self, name: str, signal: int) -> None:
        self._check()
        self.killed.append((name, signal))
        self._end_by(name, str(signal))

    def _end_by(self, name: str, signal: str) -> None:
        if not self._live(name):
            return
        if self.natural_end_on_stop:  # it exited by itself right after it started, before any stop came
            self.finish(name, exited_at=self._unit(name).activated_at or time.time() - 0.05)  # type: ignore[union-attr]
        else:
            self.finish(name, result="signal", exit_code="killed", exit_status=signal)

    def list_units(self, patterns: list[str]) -> list[UnitInfo]:
        self._check()
        return [UnitInfo(name, "active", "running") for name in [*self.units, *self.warm_units]
                if self._live(name) and any(fnmatch.fnmatchcase(name, p) for p in patterns)]

    def probe(self, name: str) -> UnitInfo | UnitEnd:
        self._check()
        unit = self._unit(name)
        if unit is not None and unit.end is None:
            return UnitInfo(name, "active", "running")
        return unit.end if unit is not None and unit.end is not None else UnitEnd("", "", "", None, None)

    def ensure_slice(self, name: str, properties: Mapping[str, Any]) -> bool:
        return False

    def version(self) -> str:
        if not self.reachable:
            raise SystemdError("systemd does not answer: fake outage")
        return "252-fake"


def fake_broker(config: Config, fake: FakeSystemd) -> Broker:
    """The daemon's broker client, its server in-process over the fake."""
    return Broker(in_process_spawner(config, fake))


async def until(check: Callable[[], object], within_s: float = 5.0) -> None:
    """Wait for what the broker does next (its requests are answered on the loop)."""
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within_s} s: {check}")
        await asyncio.sleep(0.005)
