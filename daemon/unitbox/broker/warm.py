"""Warm units: pools of pre-started, single-use run units, one pool per
runtime configured under [warm] (docs/operations.md "Warm units").

Each unit (`unitbox-warm-<slot>.service`) is started ahead of time with the
whole run profile (profile.build_warm_profile) at the pool's floor limits:
its namespaces, mounts, dynamic user, seccomp filter and interpreter are set
up, its preloads imported, and its trusted stub waits on a socket that is
its stdin. A start that fits a ready unit (same runtime, no lint, the pool's
disk size, memory above what warm-up used) is handed over instead of
starting a unit (`hand_over`): its inputs copied into the unit's staging
directory (already mounted at /run/unitbox/code), the run's limits applied
with SetUnitProperties (answered once applied), its rlimits, thread
variables, stdin, stdout and stderr sent in one frame; the stub closes the
socket and runs the program exactly as a cold run's bootstrap does. Then
the unit is the run's: its end is the run's end, its ExecStopPost records
the run's outcome in ends/<id>. No unit ever takes a second program.

What cannot change on a running unit is handled here: the run's deadline
is a timer (then `timed-out` is noted for ExecStopPost and the unit
SIGKILLed); the CPU the unit used before the hand-over is subtracted.

Answering fast: systemd says a unit's main process has ended, and that no
process of it is left, as the unit enters ExecStopPost (MainExited, ≈30 ms
before the teardown is done). When the record can only say the exit code
(`main_exited`), the daemon is told at once, takes what the run's pipes
hold and answers a waiting client; the unit's end completes the record
with its figures.
Refills start at most WARMING_AT_ONCE units at a time.

A broker that starts finds the units of an earlier one: those that hold a
run are adopted (their id is in their staging directory, their deadline
re-armed), idle ones stopped. A broker that goes away takes its sockets
along, and an idle stub that reads EOF exits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unitbox.broker.handover import Slot, final_exit_code, kill_at_deadline, send_run, slot_of
from unitbox.broker.staging import InputBudget
from unitbox.broker.warmstage import cgroup_memory, read_stage_file, seconds_left, write_stage_file
from unitbox.config import Config, WarmSection
from unitbox.errors import UnknownRuntime
from unitbox.limits import Limits
from unitbox.profile import UNIT_SUFFIX, WARM_PREFIX, LintMode, Runtime
from unitbox.runtimes import Runtimes
from unitbox.systemd import MainExited, UnitManager

log = logging.getLogger(__name__)

MiB = 1 << 20
READY = b"ready"
WARM_UP_BOUND_S = 120.0  # a unit not ready by then is stopped (a preload that hangs)
FAILURES_BEFORE_PAUSE = 3  # units of a pool that died before ready, in a row …
PAUSE_S = 60.0  # … then the pool starts none for this long (a preload that cannot be imported)
# Units warming up at once, across pools: a drained pool refills one or two at a time, so at
# saturation its warm-ups do not crowd out the runs (measured: 8 at once cost 20 % of throughput).
WARMING_AT_ONCE = max(1, (os.cpu_count() or 2) // 2)
MEMORY_MARGIN = 2  # a run's memory_mb must be this many times what its unit used warming up
LIFETIME_SLACK_S = 60.0
Builder = Callable[[str, Runtime, Limits, WarmSection], dict[str, Any]]
"""(slot, runtime, floor limits, pool section) → the warm unit's properties."""
ExitSink = Callable[[str, int], None]
"""(run id, exit code): a handed-over program ended by itself, and its record will say no more."""


@dataclass(slots=True)
class PoolStats:
    hits: int = 0
    misses: int = 0
    started: int = 0
    failed: int = 0  # ended before they were ready
    last_warmup_s: float = 0.0


class WarmPools:
    def __init__(self, config: Config, systemd: UnitManager, runtimes: Runtimes, *, stage_root: Path,
                 build: Builder, on_exit: ExitSink) -> None:
        self._systemd = systemd
        self._on_exit = on_exit
        self._runtimes = runtimes
        self._stage_root = stage_root
        self._build = build
        self._floor = config.default_limits
        self._pools = {name: section for name, section in config.warm.items() if section.size > 0}
        self._slots: dict[str, Slot] = {}  # by slot name
        self._runs: dict[str, Slot] = {}  # handed over, by run id
        self._failures: dict[str, int] = {}
        self._paused_until: dict[str, float] = {}
        self._owner = str(config.state_dir)  # whose units they are: another daemon's on this host are not ours
        self._filling = False
        self._closed = False
        self.stats = PoolStats()

    # -- life -------------------------------------------------------------------------
    def start(self) -> None:
        """Adopt an earlier broker's units that hold a run; stop its idle ones; fill the pools."""
        for info in self._systemd.list_units([f"{WARM_PREFIX}*{UNIT_SUFFIX}"]):
            name = slot_of(info.name)
            if name is None or info.over:
                continue
            stage = self._stage_root / f"warm-{name}"
            if read_stage_file(stage / "owner") != self._owner:
                continue
            run = read_stage_file(stage / "run")
            if run is None:
                log.info("warm unit %s was an earlier broker's, idle: stopping it", info.name)
                with contextlib.suppress(Exception):
                    self._systemd.stop_unit(info.name)
                continue
            slot = Slot(name, "", stage, None, run=run)
            self._slots[name], self._runs[run] = slot, slot
            self._arm_deadline(slot, seconds_left(stage / "deadline"))
            log.info("warm unit %s runs %s: adopted", info.name, run)
        self.fill()

    def close(self) -> None:
        """Drain: every idle unit is stopped (its stub would exit at EOF anyway)."""
        self._closed = True
        for slot in list(self._slots.values()):
            slot.cancel_timer()
            if slot.run is None:
                self._retire(slot, "the broker is closing")

    @property
    def enabled(self) -> bool:
        """Whether any pool has units (`size = 0` is none)."""
        return bool(self._pools)

    def counts(self) -> dict[str, int]:
        idle = [slot for slot in self._slots.values() if slot.run is None and slot.sock is not None]  # not retired
        return {"ready": sum(slot.ready_at is not None for slot in idle),
                "warming": sum(slot.ready_at is None for slot in idle), "running": len(self._runs)}

    # -- filling ----------------------------------------------------------------------
    def fill(self) -> None:
        """Start units until every pool has its size (idle ones: warming or ready)."""
        if self._closed or self._filling:
            return
        self._filling = True
        try:
            for pool, section in self._pools.items():
                if time.monotonic() < self._paused_until.get(pool, 0.0):
                    continue
                idle = sum(1 for slot in self._slots.values() if slot.pool == pool and slot.run is None)
                for _ in range(section.size - idle):
                    if self.counts()["warming"] >= WARMING_AT_ONCE or not self._start_one(pool, section):
                        break
        finally:
            self._filling = False

    def _start_one(self, pool: str, section: WarmSection) -> bool:
        try:
            runtime = self._runtimes.get(pool)
        except UnknownRuntime:
            log.warning("warm pool %s: no such runtime; it stays empty", pool)
            self._paused_until[pool] = time.monotonic() + PAUSE_S
            return False
        name = secrets.token_hex(6)
        stage = self._stage_root / f"warm-{name}"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        slot = Slot(name, pool, stage, ours, identity=_identity(runtime))
        try:
            os.makedirs(self._stage_root, mode=0o700, exist_ok=True)
            os.mkdir(stage, 0o700)
            os.mkdir(stage / "in", 0o755)
            (stage / "in").chmod(0o755)
            (stage / "owner").write_text(self._owner)
            profile = self._build(name, runtime, self._floor, section)
            # InaccessiblePaths=-X hides X only if it exists when the unit starts: a secret made
            # later (a config written, /etc/unitbox created) would be visible in this unit.
            slot.unhidden = tuple(path for entry in profile.get("InaccessiblePaths", [])
                                  if entry.startswith("-") and not os.path.lexists(path := entry[1:]))
            self._systemd.start_transient_service(slot.unit, profile, {"input": theirs.fileno()})
        except Exception as exc:
            ours.close()
            _remove(stage)
            log.error("warm pool %s: cannot start a unit: %s", pool, getattr(exc, "message", exc))
            self._paused_until[pool] = time.monotonic() + PAUSE_S
            return False
        finally:
            theirs.close()  # PID 1 holds the unit's end now
        ours.setblocking(False)
        self._slots[name] = slot
        self.stats.started += 1
        loop = asyncio.get_running_loop()
        loop.add_reader(ours.fileno(), self._readable, slot)
        slot.timer = loop.call_later(WARM_UP_BOUND_S, self._expire, slot, "not ready in time")
        return True

    def _readable(self, slot: Slot) -> None:
        sock = slot.sock
        if sock is None:
            return
        try:
            said = sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            said = b""
        if said == READY and slot.ready_at is None:
            slot.ready_at = time.monotonic()
            self.stats.last_warmup_s = slot.ready_at - slot.started
            self._failures[slot.pool] = 0
            try:
                slot.cgroup = self._systemd.control_group(slot.unit)
            except Exception as exc:
                self._retire(slot, f"its cgroup is unknown ({getattr(exc, 'message', exc)})")
                return
            slot.warm_bytes = cgroup_memory(slot.cgroup)
            slot.cancel_timer()
            section = self._pools[slot.pool]
            slot.timer = asyncio.get_running_loop().call_later(section.max_idle_s, self._expire, slot, "idle too long")
            self.fill()  # the next one may warm up now
        else:  # EOF: the stub is gone (it failed warming up); or it said something it never says
            self._retire(slot, "its stub ended" if not said else "its stub said something unexpected")

    def _expire(self, slot: Slot, why: str) -> None:
        slot.timer = None
        if slot.run is None:
            self._retire(slot, why)
            self.fill()

    def _retire(self, slot: Slot, why: str) -> None:
        """Stop an idle unit (its ExecStopPost only cleans up: it has no run)."""
        self._drop_socket(slot)
        slot.cancel_timer()
        log.log(logging.DEBUG if why in ("idle too long", "the broker is closing") else logging.WARNING,
                "warm unit %s: %s; stopping it", slot.unit, why)
        with contextlib.suppress(Exception):
            self._systemd.stop_unit(slot.unit)

    def _drop_socket(self, slot: Slot) -> None:
        self._drop_reader(slot)
        if slot.sock is not None:
            slot.sock.close()
            slot.sock = None

    # -- hand-over ----------------------------------------------------------------------
    def take(self, runtime: str, limits: Limits, lint: LintMode) -> Slot | None:
        """A ready unit for this start, or None (it starts cold). Counted as a hit or a miss."""
        slot = self._fitting(runtime, limits, lint) if runtime in self._pools else None
        if slot is None:
            self.stats.misses += 1
        return slot

    def _fitting(self, pool: str, limits: Limits, lint: LintMode) -> Slot | None:
        if lint is not LintMode.OFF or limits.disk_mb != self._floor.disk_mb:
            return None  # the box's size and the lint steps are fixed when a unit starts
        ready = [slot for slot in self._slots.values()
                 if slot.pool == pool and slot.run is None and slot.ready_at is not None and slot.sock is not None]
        if not ready:
            return None
        try:
            identity = _identity(self._runtimes.get(pool))
        except UnknownRuntime:
            return None
        stale = [slot for slot in ready if slot.identity != identity or any(map(os.path.lexists, slot.unhidden))]
        for slot in stale:
            self._retire(slot, "its runtime was rebuilt" if slot.identity != identity else
                         "a path it should hide appeared after it started")
        fresh = [slot for slot in ready if slot not in stale and limits.memory_mb * MiB >= MEMORY_MARGIN
                 * slot.warm_bytes]
        return min(fresh, key=lambda slot: slot.ready_at or 0.0) if fresh else None

    def hand_over(self, slot: Slot, run: str, limits: Limits, *, stdio: Sequence[int], inputs_fd: int, owner: int,
                  budget: InputBudget) -> None:
        """Give `slot` the run. Raises (having stopped the unit) if it could
        not: then nothing of the run was started, and it starts cold."""
        assert slot.sock is not None and slot.run is None
        slot.cancel_timer()
        self._drop_reader(slot)
        try:
            send_run(self._systemd, slot, run, limits, stdio=stdio, inputs_fd=inputs_fd, owner=owner, budget=budget)
        except BaseException:
            self._slots.pop(slot.name, None)
            self._retire(slot, "its hand-over failed")
            raise
        self._drop_socket(slot)
        slot.run = run
        self._runs[run] = slot
        write_stage_file(slot.stage / "run", run)  # from here its ExecStopPost records the run's outcome
        self.stats.hits += 1
        self._arm_deadline(slot, limits.timeout_s)
        asyncio.get_running_loop().call_soon(self.fill)  # after the broker's reply: one idle unit fewer
        log.info("run %s handed to %s", run, slot.unit, extra={"run_id": run, "unit": slot.unit})

    def main_exited(self, unit: str, event: MainExited) -> None:
        """A unit's program has ended; its unit is still stopping (ExecStopPost records the
        outcome and collects what the run left, ≈30 ms). Passed on (`on_exit`) when the record
        can only say its exit code: the program exited by itself, nothing in the unit was
        OOM-killed, the deadline had not passed, and it left no files. Then a waiting client can
        be answered now; CPU and memory figures follow with the unit's end."""
        name = slot_of(unit)
        slot = self._slots.get(name) if name is not None else None
        if slot is None or slot.run is None or slot.exit_seen:
            return
        slot.exit_seen = True  # systemd says it again at each later step of the stop
        code, why_not = final_exit_code(slot, event)
        if code is not None:
            self._on_exit(slot.run, code)
        else:
            log.debug("run %s: answered at its unit's end: %s", slot.run, why_not, extra={"run_id": slot.run})

    def _drop_reader(self, slot: Slot) -> None:
        if slot.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(slot.sock.fileno())

    def _arm_deadline(self, slot: Slot, seconds: float) -> None:
        slot.cancel_timer()
        slot.timer = asyncio.get_running_loop().call_later(max(0.0, seconds), self._deadline, slot)

    def _deadline(self, slot: Slot) -> None:
        """The run's timeout_s is up: as RuntimeMaxSec= would, but from the hand-over."""
        slot.timer = None
        kill_at_deadline(self._systemd, slot)

    # -- what the broker asks --------------------------------------------------------------
    def unit_of(self, run: str) -> str | None:
        slot = self._runs.get(run)
        return slot.unit if slot is not None else None

    def running(self) -> Iterator[tuple[str, str]]:
        """(run id, unit) of every handed-over unit."""
        return ((run, slot.unit) for run, slot in self._runs.items())

    def ended(self, unit: str) -> tuple[str, Path] | None:
        """A warm unit is over: (its run, its staging dir) if it had one. The pool is filled again."""
        name = slot_of(unit)
        slot = self._slots.pop(name, None) if name is not None else None
        if slot is None:
            return None
        slot.cancel_timer()
        self._drop_socket(slot)
        if slot.run is not None:
            self._runs.pop(slot.run, None)
        elif slot.ready_at is None and slot.pool:
            self.stats.failed += 1
            failures = self._failures[slot.pool] = self._failures.get(slot.pool, 0) + 1
            if failures >= FAILURES_BEFORE_PAUSE:
                log.error("warm pool %s: %d units in a row ended before they were ready (see journalctl -u "
                          "'unitbox-warm-*'); starting none for %.0f s", slot.pool, failures, PAUSE_S)
                self._paused_until[slot.pool] = time.monotonic() + PAUSE_S
                asyncio.get_running_loop().call_later(PAUSE_S, self.fill)
        if not self._closed:
            asyncio.get_running_loop().call_soon(self.fill)
        return (slot.run, slot.stage) if slot.run is not None else None


def lifetime_s(config: Config, section: WarmSection) -> float:
    """A warm unit's RuntimeMaxSec= backstop: warm-up, idle age, the longest run."""
    return WARM_UP_BOUND_S + section.max_idle_s + config.maximum_limits.timeout_s + LIFETIME_SLACK_S


def _identity(runtime: Runtime) -> str:
    return os.path.realpath(runtime.path) if runtime.path else runtime.python


def _remove(stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
