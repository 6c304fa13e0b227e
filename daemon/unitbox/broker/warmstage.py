"""What a warm unit's broker knows of it besides the pool's bookkeeping
(broker/warm.py): the files of its staging directory, which only root
writes (the run's id, the hand-over's time and CPU baseline, its deadline,
`timed-out`, the owning state directory), read back by its ExecStopPost
(unit_scripts.WARM_STOP_POST_SCRIPT) and by a broker that starts later;
and its cgroup's counters, read as ExecStopPost reads them."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path


def uptime() -> str:
    """/proc/uptime's first field, as the unit's shell steps read it: CLOCK_BOOTTIME, read
    directly (the packaged broker's ProcSubset=pid has no /proc/uptime)."""
    return f"{time.clock_gettime(time.CLOCK_BOOTTIME):.2f}"


def _cgroup_file(cgroup: str, *candidates: str) -> str | None:
    for name in candidates:
        with contextlib.suppress(OSError), open(f"/sys/fs/cgroup{name.format(cg=cgroup)}") as f:
            return f.read()
    return None


def cgroup_cpu_ns(cgroup: str) -> int | None:
    """The cgroup's CPU usage, from the same file ExecStopPost reads (unit_scripts.STOP_POST_SCRIPT)."""
    text = _cgroup_file(cgroup, "{cg}/cpu.stat", "/unified{cg}/cpu.stat")
    if text is not None:
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) * 1000
    text = _cgroup_file(cgroup, "/cpu,cpuacct{cg}/cpuacct.usage", "/cpuacct{cg}/cpuacct.usage")
    return int(text) if text else None


def cgroup_memory(cgroup: str) -> int:
    text = _cgroup_file(cgroup, "{cg}/memory.current", "/memory{cg}/memory.usage_in_bytes")
    return int(text) if text else 0


def cgroup_oom_kills(cgroup: str) -> int | None:
    """Processes of the cgroup the kernel OOM-killed so far; None if unreadable."""
    text = _cgroup_file(cgroup, "{cg}/memory.events", "/memory{cg}/memory.oom_control")
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return None


def read_stage_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def write_stage_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def seconds_left(deadline_file: Path) -> float:
    deadline = read_stage_file(deadline_file)
    try:
        return float(deadline) - float(uptime()) if deadline else 0.0
    except ValueError:
        return 0.0
