"""Ending a run at its first OOM kill, on every cgroup layout.

`OOMPolicy=kill` (profile.py) asks systemd to end a unit once the kernel
OOM-kills one of its processes. On the unified hierarchy (cgroup v2) it does
(memory.oom.group). On a hybrid or legacy host (cgroup v1 memory controller)
it does nothing: only the process the kernel chose dies, so a program that
forks children past `memory_mb` in a loop gets OOM kill after OOM kill (163
in 5 s, ~775 kernel log lines) until its timeout, and may even end
`succeeded`.

So the daemon counts OOM kills itself: one timer for all runs in flight reads
each one's `oom_kill` counter (v1: `memory.oom_control`, v2: `memory.events`)
every POLL_S, and at the first kill asks for the unit to be stopped (SIGKILL
to every process of the run). The outcome recorder then reads the same
counter, and the run ends `oom_killed` (outcome.classify). Reading cgroupfs
needs no write access, so this works under the daemon's
ProtectControlGroups=yes; v1's eventfd notification (cgroup.event_control)
would need a write, hence polling: a few small reads per live run a second."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from unitbox.profile import unit_name

log = logging.getLogger(__name__)

POLL_S = 0.1
CGROUP_ROOT = Path("/sys/fs/cgroup")


def slice_path(slice_name: str) -> str:
    """systemd's cgroup path of a slice: "a-b.slice" → "/a.slice/a-b.slice"."""
    stem = slice_name.removesuffix(".slice")
    if stem in ("", "-"):
        return ""
    parts = stem.split("-")
    return "".join("/" + "-".join(parts[:i]) + ".slice" for i in range(1, len(parts) + 1))


def counter_file(root: Path, slice_name: str) -> Callable[[str], Path] | None:
    """Where a unit's OOM kill counter is, by unit name, on this host; None if nowhere."""
    base = slice_path(slice_name)
    if (root / "memory" / "memory.oom_control").exists():  # v1 memory controller (legacy or hybrid)
        return lambda unit: root / "memory" / base.lstrip("/") / unit / "memory.oom_control"
    with contextlib.suppress(OSError):
        if "memory" in (root / "cgroup.controllers").read_text().split():  # unified hierarchy
            return lambda unit: root / base.lstrip("/") / unit / "memory.events"
    return None


def read_oom_kills(path: Path) -> int:
    """The `oom_kill` line of memory.oom_control or memory.events (0 if absent or unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # not created yet, or already gone
        return 0
    try:
        text = os.read(fd, 4096).decode("ascii", "replace")
    except OSError:
        return 0
    finally:
        os.close(fd)
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


class OomWatch:
    """Watches the runs it is given; calls `on_oom(run_id)` once per run, at its first OOM kill."""

    def __init__(self, slice_name: str, on_oom: Callable[[str], None], *, root: Path = CGROUP_ROOT,
                 interval_s: float = POLL_S) -> None:
        self._on_oom = on_oom
        self._interval_s = interval_s
        self._file = counter_file(root, slice_name)
        self._runs: dict[str, Path] = {}
        self._timer: asyncio.TimerHandle | None = None
        if self._file is None:
            log.warning("no memory cgroup found under %s: a run is ended at an OOM kill only by systemd", root)

    def watch(self, run_id: str, unit: str | None = None) -> None:
        """`unit`: the warm unit the run was handed to, if not its own (it
        may be learnt after the run's first watch: it then replaces it)."""
        if self._file is None or (run_id in self._runs and unit is None):
            return
        self._runs[run_id] = self._file(unit or unit_name(run_id))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval_s, self._tick)

    def forget(self, run_id: str) -> None:
        self._runs.pop(run_id, None)

    def close(self) -> None:
        self._runs.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = None
        for run_id, path in list(self._runs.items()):
            if (kills := read_oom_kills(path)) == 0:
                continue
            self._runs.pop(run_id, None)
            log.warning("run %s: %d OOM kill(s) in its memory cgroup; stopping the whole run", run_id, kills,
                        extra={"run_id": run_id})
            try:
                self._on_oom(run_id)
            except Exception:
                log.exception("run %s: stopping it after an OOM kill failed", run_id)
        if self._runs:
            self._timer = asyncio.get_running_loop().call_later(self._interval_s, self._tick)
