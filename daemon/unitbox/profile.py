"""The unit profile: a pure function from a run to the properties of its
transient service, in systemd's own unit-file vocabulary (the adapter turns
them into D-Bus values). Every setting is explained in docs/sandbox.md
(tests/unit/test_docs.py checks that each one is there); read it as one
screen of policy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any

from unitbox.limits import Limits
from unitbox.unit_scripts import (
    BOOTSTRAP,
    BOX_BINDS,
    CODE_DIR,
    LINT_SCRIPT,
    LINT_TAKE_SCRIPT,
    LINTER_PATH,
    ON_HOST,
    START_PRE_SCRIPT,
    STOP_POST_SCRIPT,
    WARM_STOP_POST_SCRIPT,
    WARM_STUB,
    WORK_DIR,
)

SYS_KEPT = "/sys/devices/system/cpu"  # all of /sys a run sees: CPU counts (glibc's get_nprocs)
STAGE_ROOT = "/run/unitbox-runs"
"""On the host: each run's inputs are copied to STAGE_ROOT/<id> when its unit
starts (ExecStartPre), and mounted from there, so that no mount a run can
list in /proc/self/mountinfo names the state directory."""
# A run's unit ends by SIGKILL (KillSignal=): at its timeout and when stopped.
# So TimeoutStopSec= bounds only the kill of leftovers and the privileged
# outcome recorder (ExecStopPost), which runs inside the run's CPU quota and
# must never be cut short on a loaded host: a run that did nothing wrong
# would end as `error`. START_BOUND_S bounds set-up to exec.
START_BOUND_S = 30.0
STOP_BOUND_S = 30.0
# `tasks` is held per run by LimitNPROC= (the run's dynamic UID is its own);
# TasksMax= is that plus room for the privileged steps. On cgroup v2 systemd
# 257 spawns ExecStopPost= straight into the unit's cgroup (CLONE_INTO_CGROUP),
# where a fork bomb's killed but not yet reaped tasks still count: with
# TasksMax= = tasks the outcome recorder failed to spawn (EAGAIN) and the run
# ended without an outcome.
STEP_TASKS = 8

UNIT_PREFIX = "unitbox-run-"
UNIT_SUFFIX = ".service"
WARM_PREFIX = "unitbox-warm-"


DENIED_SYSCALLS = "~@privileged @resources @keyring @debug @mount @obsolete @cpu-emulation"
# In @system-service but not needed by Python: io_uring creates sockets of any
# family past RestrictAddressFamilies= (IORING_OP_SOCKET) and is a large,
# CVE-prone surface; userfaultfd widens kernel race windows for exploits;
# kcmp orders kernel pointers; process_vm_* are ptrace's memory access.
DENIED_CALLS = "~io_uring_setup io_uring_enter io_uring_register userfaultfd kcmp process_vm_readv process_vm_writev"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "RAYON_NUM_THREADS")
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Runtime:
    """What interpreter a run uses: the host's, or a read-only environment."""

    name: str
    python: str
    path: str | None = None
    target: str | None = None
    """Where runs see `path` (default: the same place)."""
    stdlib_only: bool = False
    """Run with -S: no site-packages at all (the `default` runtime)."""


def unit_name(run_id: str) -> str:
    return f"{UNIT_PREFIX}{run_id}{UNIT_SUFFIX}"


def run_id_of(unit: str) -> str | None:
    if unit.startswith(UNIT_PREFIX) and unit.endswith(UNIT_SUFFIX):
        return unit[len(UNIT_PREFIX):-len(UNIT_SUFFIX)]
    return None


def thread_cap(limits: Limits) -> int:
    """Threads a numeric library may start: within the CPU quota and leaving
    most of the `tasks` budget to the program itself."""
    return max(1, min(math.ceil(limits.cpu_percent / 100), limits.tasks // 4))


def environment(limits: Limits) -> list[str]:
    threads = str(thread_cap(limits))
    return [
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "LANG=C.UTF-8",
        "PYTHONUNBUFFERED=1",
        "PYTHONDONTWRITEBYTECODE=1",
        f"HOME={WORK_DIR}",
        "TMPDIR=/tmp",
        "MPLBACKEND=Agg",
        "MPLCONFIGDIR=/tmp/matplotlib",
        *(f"{name}={threads}" for name in THREAD_VARIABLES),
    ]


def stage_dir(run_id: str) -> str:
    return f"{STAGE_ROOT}/{run_id}"


def fallback_result(run_id: str) -> str:
    """Where ExecStopPost records the outcome when the run's directory cannot take it (a full disk)."""
    return f"{stage_dir(run_id)}.result"


def hide_state_dir(state_dir: PurePosixPath) -> tuple[list[str], list[str]]:
    """(TemporaryFileSystem=, InaccessiblePaths=) entries hiding the state dir
    without naming it: an empty tmpfs over its parent (/var/lib by default),
    since InaccessiblePaths= on the state dir itself shows its path in
    /proc/self/mountinfo. Under /run it is hidden already; right under /,
    /usr or /etc only InaccessiblePaths= can hide it (its name then shows)."""
    parent = state_dir.parent
    if parent.is_relative_to("/run"):
        return [], []
    if str(parent) in ("/", "/usr", "/etc"):
        return [], [f"-{state_dir}"]
    return [f"{parent}:mode=755"], []


class LintMode(StrEnum):
    OFF = "off"
    BEFORE = "before"  # lint, then run the program
    ONLY = "only"  # lint instead of running it


@dataclass(frozen=True, slots=True)
class Collector:
    """What ExecStopPost runs to take the box's files into the run dir (collect.py)."""

    python: str
    script: str
    caps: tuple[int, ...]  # collect.Caps, in order

    def command(self) -> list[str]:
        return [self.python, "-I", "-S", self.script, *map(str, self.caps)]


def build_profile(run_id: str, limits: Limits, *, ends_dir: PurePosixPath, state_dir: PurePosixPath,
                  slice_name: str, runtime: Runtime, collector: Collector, lint: LintMode = LintMode.OFF,
                  linter: str | None = None, native_private_cgroups: bool = False,
                  secret_paths: tuple[str, ...] = ()) -> dict[str, Any]:
    """Properties of `unitbox-run-<run_id>.service`. `ends_dir` is where its
    privileged steps write what it left (the outcome, its files: the broker's
    `<state_dir>/ends/<id>`); its inputs, staged by the broker on /run, are
    mounted read-only at CODE_DIR. `collector`: what ExecStopPost runs to
    take the run's files.
    `lint`, `linter` (ruff's path): a static check before the program, or
    instead of it. `native_private_cgroups`: systemd >= 257, whose
    ProtectControlGroups=private shows a run its own cgroup only.
    `secret_paths`: more host paths runs must not see (e.g. a config file
    given with --config outside /etc/unitbox)."""
    stage = stage_dir(run_id)
    # `-`: ExecStartPre= (privileged, but given the unit's bind mounts) starts
    # before the staged files and the box exist; the run itself only starts
    # if it made them (a `set -e` script). /sys: an empty skeleton holding
    # only the CPU topology and an empty /sys/fs/cgroup.
    read_only = [f"-{stage}/in:{CODE_DIR}", f"-{stage}/machine-id:/etc/machine-id",
                 f"-{stage}/sys:/sys", f"{SYS_KEPT}:{SYS_KEPT}"]
    if runtime.path is not None:
        read_only.append(f"{runtime.path}:{runtime.target or runtime.path}")
    state_tmpfs, state_inaccessible = hide_state_dir(state_dir)
    # The box: the working directory, the channel back, /tmp, /var/tmp and
    # /dev/shm. A bind mount wins over the private /tmp that DynamicUser=
    # implies (PrivateTmp=yes, below), on every systemd version; a
    # TemporaryFileSystem= there loses to it (docs/sandbox.md).
    writable = [f"-{stage}/box/{name}:{target}" for name, target in BOX_BINDS]
    program = [":" + runtime.python, "-I", *(["-S"] if runtime.stdlib_only else []), "-u", "-c", BOOTSTRAP]
    start_pre = [[*ON_HOST, START_PRE_SCRIPT, "unitbox-start-pre", stage, str(limits.disk_mb)]]
    if lint is not LintMode.OFF:
        if linter is None:
            raise ValueError("lint asked for without a linter")
        # Bound in: the host path may be one runs cannot see (a venv under /tmp, /root, /home).
        read_only.append(f"{linter}:{LINTER_PATH}")
        check = [":/bin/sh", "-c", LINT_SCRIPT, "unitbox-lint"]
        if lint is LintMode.ONLY:
            program = check
        else:  # a failed lint must not stop the program: `-`
            start_pre += [["-" + check[0], *check[1:]],
                          [*ON_HOST, LINT_TAKE_SCRIPT, "unitbox-lint-take", stage, str(ends_dir)]]
    return {
        "Description": f"unitbox run {run_id}",
        "Slice": slice_name,
        # lifecycle
        "Type": "exec",
        "ExecStart": program,
        "ExecStartPre": start_pre,
        "ExecStopPost": [*ON_HOST, STOP_POST_SCRIPT, "unitbox-stop-post", stage, str(ends_dir),
                         *collector.command()],
        "KillMode": "control-group",
        "KillSignal": "SIGKILL",  # cancel sends SIGTERM itself first (engine.CANCEL_GRACE_S)
        "OOMPolicy": "kill",
        "CollectMode": "inactive-or-failed",  # the outcome is already on disk (ExecStopPost)
        "LogExtraFields": [f"UNITBOX_RUN_ID={run_id}"],
        # `-`: the privileged ExecStartPre runs before the box (bound here) exists.
        "WorkingDirectory": f"-{WORK_DIR}",
        "Environment": environment(limits),
        # identity
        "DynamicUser": True,
        "PrivateUsers": True,
        # network
        "PrivateNetwork": True,
        "IPAddressDeny": ["any"],
        "RestrictAddressFamilies": ["AF_UNIX"],
        # filesystem
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateDevices": True,
        "PrivateIPC": True,
        # Named, not implied: from 257 DynamicUser= implies a "disconnected"
        # private /tmp whose bind wins over ours; PrivateTmp=yes loses to it.
        "PrivateTmp": True,
        "TemporaryFileSystem": [
            "/run:mode=755",  # hides the D-Bus socket and /run/systemd/transient
            *state_tmpfs,
        ],
        "BindPaths": writable,
        "BindReadOnlyPaths": read_only,
        "InaccessiblePaths": [*state_inaccessible, "-/etc/unitbox", *(f"-{p}" for p in secret_paths)],
        # kernel
        "ProtectKernelTunables": True,
        "ProtectKernelModules": True,
        "ProtectKernelLogs": True,
        **({"ProtectControlGroupsEx": "private"} if native_private_cgroups else {"ProtectControlGroups": True}),
        "ProtectClock": True,
        "ProtectHostname": True,
        "ProtectProc": "invisible",
        "ProcSubset": "pid",
        # privileges
        "NoNewPrivileges": True,
        "CapabilityBoundingSet": [],
        "AmbientCapabilities": [],
        "RestrictSUIDSGID": True,
        "RestrictNamespaces": True,
        "LockPersonality": True,
        "RestrictRealtime": True,
        "KeyringMode": "private",
        "UMask": 0o077,
        # syscalls
        "SystemCallArchitectures": ["native"],
        "SystemCallFilter": ["@system-service", DENIED_SYSCALLS, DENIED_CALLS],
        "SystemCallErrorNumber": "EPERM",
        # resources
        "CPUAccounting": True,
        "MemoryAccounting": True,
        "TasksAccounting": True,
        "CPUQuota": limits.cpu_percent,
        "MemoryMax": limits.memory_mb * MiB,
        "MemorySwapMax": 0,
        "TasksMax": limits.tasks + STEP_TASKS,
        "RuntimeMaxSec": limits.timeout_s,
        "TimeoutStartSec": START_BOUND_S,
        "TimeoutStopSec": STOP_BOUND_S,
        "LimitFSIZE": limits.disk_mb * MiB,
        "LimitNOFILE": 1024,
        "LimitCORE": 0,
        "LimitNPROC": limits.tasks,
    }


def warm_unit_name(slot: str) -> str:
    return f"{WARM_PREFIX}{slot}{UNIT_SUFFIX}"


def build_warm_profile(slot: str, floor: Limits, *, ends_root: PurePosixPath, lifetime_s: float,
                       preload: tuple[str, ...], max_tasks: int, **common: Any) -> dict[str, Any]:
    """Properties of `unitbox-warm-<slot>.service`, a pool unit (broker/warm.py):
    the run profile above, unchanged in everything that isolates, built for
    the staging directory `warm-<slot>` at the pool's `floor` limits, with
    these differences, each because the run is not known yet:
    - ExecStart= is the waiting stub followed by the bootstrap, its stdin
      the broker's socket (given at start), stdout and stderr the journal
      (warm-up's own diagnostics; the run's pipes come with the hand-over);
    - ExecStopPost= finds the run's ends directory from the id the broker
      wrote at hand-over (`ends_root`/<id>);
    - RuntimeMaxSec= is only a backstop for the unit's whole life
      (`lifetime_s`: idle age plus the longest run): a run's own deadline is
      the broker's timer, since RuntimeMaxSec= cannot change on a running
      unit (systemd 252);
    - LimitNPROC= is `max_tasks`, the maxima's: the stub lowers it to the run's `tasks`
      (setrlimit); CPUQuota=, MemoryMax= and TasksMax= are set to the run's
      by SetUnitProperties before the hand-over."""
    profile = build_profile(f"warm-{slot}", floor, ends_dir=ends_root, **common)
    python, *flags = profile["ExecStart"][:-2]  # [":python", "-I", ("-S"), "-u"] + ["-c", BOOTSTRAP]
    profile.update({
        "Description": f"unitbox warm unit {slot} (idle)",
        "ExecStart": [python, *flags, "-c", WARM_STUB + BOOTSTRAP, *preload],
        "ExecStopPost": [*ON_HOST, WARM_STOP_POST_SCRIPT, *profile["ExecStopPost"][len(ON_HOST) + 1:]],
        "LogExtraFields": [f"UNITBOX_WARM_SLOT={slot}"],
        "RuntimeMaxSec": lifetime_s,
        "LimitNPROC": max_tasks,
    })
    return profile
