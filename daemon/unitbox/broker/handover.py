"""One warm unit (a `Slot`) and what happens to it once a run is handed
over (the pool's bookkeeping is broker/warm.py): the run sent to its stub,
its deadline, and whether its program's end is all its record will say.

`send_run` makes a ready unit the run's: the inputs copied into its
already-mounted staging directory, the hand-over's time, CPU baseline and
deadline written where ExecStopPost reads them (broker/warmstage.py), the
run's limits applied with SetUnitProperties (answered once applied), and
one frame to the stub: the run's rlimits and thread variables, and by
SCM_RIGHTS its stdin, stdout and stderr."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from unitbox.broker.staging import InputBudget, copy_inputs
from unitbox.broker.warmstage import cgroup_cpu_ns, cgroup_oom_kills, uptime, write_stage_file
from unitbox.limits import Limits
from unitbox.profile import STEP_TASKS, THREAD_VARIABLES, UNIT_SUFFIX, WARM_PREFIX, environment, warm_unit_name
from unitbox.systemd import MainExited, UnitManager

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(eq=False, slots=True)
class Slot:
    """One warm unit, from its start to its end."""

    name: str
    pool: str  # the runtime's name
    stage: Path
    sock: socket.socket | None  # the broker's end; None once handed over (or adopted)
    identity: str = ""  # the runtime's real path when started: a rebuild makes the unit stale
    unhidden: tuple[str, ...] = ()  # paths to hide that did not exist at its start (so are not hidden in it)
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    warm_bytes: int = 0  # its cgroup's memory when ready
    cgroup: str = ""
    run: str | None = None
    exit_seen: bool = False  # its program's end was reported (MainExited)
    timer: asyncio.TimerHandle | None = None  # warm-up bound or idle age; then the run's deadline

    @property
    def unit(self) -> str:
        return warm_unit_name(self.name)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def slot_of(unit: str) -> str | None:
    if unit.startswith(WARM_PREFIX) and unit.endswith(UNIT_SUFFIX):
        return unit[len(WARM_PREFIX):-len(UNIT_SUFFIX)]
    return None


def send_run(systemd: UnitManager, slot: Slot, run: str, limits: Limits, *, stdio: Sequence[int], inputs_fd: int,
             owner: int, budget: InputBudget) -> None:
    """Everything a ready unit needs to run `run`; raises if any step fails (the caller stops the unit)."""
    assert slot.sock is not None
    copy_inputs(slot.stage / "in", inputs_fd, owner, budget)
    now = uptime()
    write_stage_file(slot.stage / "started", now)
    write_stage_file(slot.stage / "cpu0", str(cgroup_cpu_ns(slot.cgroup) or 0))
    write_stage_file(slot.stage / "deadline", f"{float(now) + limits.timeout_s:.2f}")
    systemd.set_unit_properties(slot.unit, {
        "Description": f"unitbox run {run} (warm unit {slot.name})",
        "CPUQuota": limits.cpu_percent, "MemoryMax": limits.memory_mb * MiB,
        "TasksMax": limits.tasks + STEP_TASKS})
    env = dict(v.split("=", 1) for v in environment(limits) if v.split("=", 1)[0] in THREAD_VARIABLES)
    frame = json.dumps({"nproc": limits.tasks, "fsize": limits.disk_mb * MiB, "env": env}).encode()
    slot.sock.setblocking(True)
    socket.send_fds(slot.sock, [frame], list(stdio))


def kill_at_deadline(systemd: UnitManager, slot: Slot) -> None:
    """The run's timeout_s is up: as RuntimeMaxSec= would, but from the hand-over.
    `timed-out` tells ExecStopPost why the unit was killed."""
    with contextlib.suppress(OSError):
        write_stage_file(slot.stage / "timed-out", "")
    try:
        systemd.kill_unit(slot.unit, 9)
    except Exception as exc:
        log.warning("warm unit %s: killing run %s at its deadline: %s", slot.unit, slot.run,
                    getattr(exc, "message", exc))


def final_exit_code(slot: Slot, event: MainExited) -> tuple[int | None, str]:
    """The program's exit code if its record can say nothing else: it exited by
    itself, before its deadline, nothing in its unit was OOM-killed, and it left
    no files for ExecStopPost to collect. (None, why) if only the unit's end can tell."""
    if event.exit_code != "exited" or event.result not in ("success", "exit-code"):
        return None, f"it ended {event.exit_code or 'unseen'} {event.exit_status}, result {event.result}"
    if os.path.exists(slot.stage / "timed-out"):
        return None, "its deadline passed"
    if (oom_kills := cgroup_oom_kills(slot.cgroup)) != 0:
        return None, "its cgroup's OOM kills cannot be read" if oom_kills is None else "a process was OOM-killed"
    if left_files(slot.stage / "box"):
        return None, "it left files to collect (or its box cannot be seen)"
    return int(event.exit_status), ""


def left_files(box: Path) -> bool:
    """Whether the run's box holds what ExecStopPost would collect (unit_scripts.STOP_POST_SCRIPT
    looks in the same places); True if it cannot be seen."""
    try:
        for place in ("work", "out"):
            with os.scandir(box / place) as entries:
                if any(entries):
                    return True
    except OSError:
        return True
    return False
