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

# Where a run sees its own files. Everything lives under the private /run
# tmpfs, so systemd never has to create mount points on the host's disk.
CODE_DIR = "/run/unitbox/code"
WORK_DIR = "/run/unitbox/work"
OUT_DIR = "/run/unitbox/out"  # the run's channel back: its entrypoint's value, its lint report
TMP_DIR = "/run/unitbox/tmp"  # bound onto /tmp on systemd < 256 (see BindPaths below)
VAR_TMP_DIR = "/run/unitbox/var-tmp"  # bound onto /var/tmp
LEGACY_UNIT_ROOT = "/run/systemd/unit-root"  # where systemd 252 assembles a unit's mount namespace
SYS_DIR = "/run/unitbox/sys"  # an empty tmpfs bound onto /sys on systemd < 256 (see BindReadOnlyPaths)
EMPTY_DIR = "/run/unitbox/empty"  # bound onto /sys/fs/cgroup there
SYS_KEPT = "/sys/devices/system/cpu"  # all of /sys a run sees: CPU counts (glibc's get_nprocs)
STAGE_ROOT = "/run/unitbox-runs"
"""On the host: each run's inputs are copied to STAGE_ROOT/<id> when its unit
starts (ExecStartPre), and mounted from there, so that no mount a run can
list in /proc/self/mountinfo names the state directory."""
SCRIPT_PATH = f"{CODE_DIR}/main.py"
ARGV_PATH = f"{CODE_DIR}/argv"
FILES_PATH = f"{CODE_DIR}/files"  # input files, copied into WORK_DIR before the program starts
ENTRY_PATH = f"{CODE_DIR}/entry"  # "<function> <result cap in bytes>" when an entrypoint is called

# A run's unit ends by SIGKILL (KillSignal=): at its timeout and when stopped.
# So TimeoutStopSec= bounds only the kill of leftovers and the privileged
# outcome recorder (ExecStopPost), which runs inside the run's CPU quota and
# must never be cut short on a loaded host: a run that did nothing wrong
# would end as `error`. START_BOUND_S bounds set-up to exec.
START_BOUND_S = 30.0
STOP_BOUND_S = 30.0

UNIT_PREFIX = "unitbox-run-"
UNIT_SUFFIX = ".service"

# Run by the interpreter with -c: sets sys.argv from the run's own argv file
# (arguments never go into the world-readable unit definition), copies the
# input files into the working directory (as the run's own user: they are
# its files), and runs the script as __main__, hiding this frame from the
# user's tracebacks. With an entrypoint the script is imported as module
# `main` instead, the function called, and its value written as JSON to
# OUT_DIR/result.json (or why not to OUT_DIR/error): never on stdout, so
# nothing the program prints can pass for its result. The size cap holds
# while encoding, so a huge value fails without being encoded whole.
BOOTSTRAP = (
    "import sys\n"
    f"p={SCRIPT_PATH!r}\n"
    f"a=open({ARGV_PATH!r},'rb').read()\n"
    "sys.argv=[p]+(a.decode('utf-8','surrogatepass').split('\\0') if a else [])\n"
    "def _hook(t,v,tb,_h=sys.excepthook):\n"
    " if tb is not None and tb.tb_frame.f_code.co_filename=='<string>':\n"
    "  tb=tb.tb_next;v=v.with_traceback(tb) if v is not None else v\n"
    " _h(t,v,tb)\n"
    "sys.excepthook=_hook\n"
    "import os\n"
    # Entry by entry: copytree onto '.' would try to chmod the working directory, which is root's.
    f"if os.path.isdir({FILES_PATH!r}):\n"
    " import shutil\n"
    f" for n in os.listdir({FILES_PATH!r}):\n"
    f"  s={FILES_PATH!r}+'/'+n;(shutil.copytree if os.path.isdir(s) else shutil.copyfile)(s,n)\n"
    f"e=open({ENTRY_PATH!r}).read().split() if os.path.exists({ENTRY_PATH!r}) else None\n"
    # A fresh module registered in sys.modules: pickle (hence multiprocessing)
    # finds the program's functions and classes there.
    "m=type(sys)('main' if e else '__main__');m.__file__=p;m.__builtins__=__builtins__;sys.modules[m.__name__]=m\n"
    "del a,_hook\n"
    "if sys.flags.no_site:import site;site.setquit();site.setcopyright();site.sethelper()\n"  # exit() under -S
    "exec(compile(open(p,'rb').read(),p,'exec'),m.__dict__)\n"
    "if e:\n"
    " import json\n"
    " n,c=e[0],int(e[1])\n"
    " def _end(t):\n"
    f"  open({OUT_DIR!r}+'/error','w').write(t);sys.stderr.write('unitbox: '+t+'\\n');sys.exit(1)\n"
    " f=m.__dict__.get(n)\n"
    " if not callable(f):_end(f'the script must define {n}()')\n"
    " try:v=f()\n"
    " except Exception as x:\n"
    f"  open({OUT_DIR!r}+'/error','w').write(f'{{n}}() raised {{type(x).__name__}}');raise\n"
    " b=bytearray()\n"
    " try:\n"
    "  for k in json.JSONEncoder(allow_nan=False).iterencode(v):\n"
    "   b+=k.encode()\n"
    "   if len(b)>c:_end(f'{n}() returned more than {c//1024} KiB of JSON: over the result_kb limit')\n"
    " except (TypeError,ValueError,RecursionError) as x:\n"
    "  _end(f'{n}() returned a {type(v).__name__} that is not JSON-serialisable: {x}'[:500])\n"
    f" open({OUT_DIR!r}+'/result.json','wb').write(b)\n"
)

# Privileged ExecStartPre (outside the run's namespaces): stages the run's
# inputs and a fresh machine-id (a random v4 UUID, as systemd-machine-id-setup
# makes one) on the host's /run, to be bound read-only into the run; and
# mounts the run's box: one tmpfs of disk_mb holding its working directory
# and its channel back (OUT_DIR), made on the host so that its files outlive
# the run's mount namespace until ExecStopPost has collected them.
START_PRE_SCRIPT = r"""set -e
umask 077
mkdir -p "$1/box"
umask 022
cp -R "$2/in" "$1/in"
mount -t tmpfs -o "size=$3M,mode=755,nosuid,nodev" tmpfs "$1/box"
mkdir -m 1777 "$1/box/work" "$1/box/out"
IFS=- read -r a b c d e < /proc/sys/kernel/random/uuid
printf '%s%s%s%s%s\n' "$a" "$b" "$c" "$d" "$e" > "$1/machine-id"
read -r up _ < /proc/uptime
echo "$up" > "$1/started"
"""

# The static check (`lint`): ruff, sandboxed like the program, with its own
# small limits on top of the run's (CPU seconds, address space, report size).
LINT_SELECT = "E4,E7,E9,F,B"  # pycodestyle errors, pyflakes, bugbear: bugs, not style
LINT_CPU_S = 10
LINT_MEMORY_KB = 1 << 20
LINT_REPORT_BLOCKS = 2048  # ulimit -f: 1 MiB in dash's 512-byte blocks (collect.LINT_BYTES)
LINT_SCRIPT = (f"ulimit -t {LINT_CPU_S}; ulimit -v {LINT_MEMORY_KB}; ulimit -f {LINT_REPORT_BLOCKS}; "
               f'exec "$1" check --isolated --no-cache --exit-zero --quiet --output-format json '
               f'--select {LINT_SELECT} -- {SCRIPT_PATH} > {OUT_DIR}/lint.json')
# After a lint that precedes the program: the report leaves the box before
# the program starts, so the program cannot rewrite it.
LINT_TAKE_SCRIPT = r"""mv -f -- "$1/box/out/lint.json" "$2/lint.json" 2>/dev/null || true"""

# Command lines carry the `:` prefix: systemd must not expand `$…` in them.
# Privileged ExecStopPost (runs after the run's processes are gone, while its
# cgroup still exists): records the outcome durably in the run's directory, so
# a daemon that was down when the run ended still learns the truth, and takes
# the CPU / memory-peak / OOM figures that cgroup-v1 hosts forget at once. The
# run's start (ExecStartPre's end) and end (this script's start) are taken
# from /proc/uptime (shell builtins only, 10 ms steps): the run's own clock,
# true even when nobody heard systemd's signals. Then, if the box holds
# anything, the collector (collect.py) takes it into the run's directory —
# after the figures, so its own CPU and memory are not the run's, and never
# in the way of the outcome: if it fails (a box that filled the run's memory
# leaves it none), the outcome is still written. Then the box is unmounted.
STOP_POST_SCRIPT = r"""read -r exited _ < /proc/uptime
started=
[ -r "$1/started" ] && read -r started < "$1/started"
cpu= peak= oom= acct=
while IFS=: read -r _ c p; do
  case ,$c, in
  ,,) for b in /sys/fs/cgroup$p /sys/fs/cgroup/unified$p; do  # pure v2, or hybrid's unified tree
        [ -r "$b/cpu.stat" ] || continue
        while read -r k v; do [ "$k" = usage_usec ] && cpu=${v}000; done < "$b/cpu.stat"
        [ -r "$b/memory.peak" ] && read -r peak < "$b/memory.peak"
        [ -r "$b/memory.events" ] && while read -r k v; do [ "$k" = oom_kill ] && oom=$v; done < "$b/memory.events"
        break
      done ;;
  *,cpuacct,*) b=/sys/fs/cgroup/$c$p; [ "$p" != / ] && [ -r "$b/cpuacct.usage" ] && read -r acct < "$b/cpuacct.usage" ;;
  *,memory,*) b=/sys/fs/cgroup/$c$p
      [ -r "$b/memory.max_usage_in_bytes" ] && read -r peak < "$b/memory.max_usage_in_bytes"
      [ -r "$b/memory.oom_control" ] &&
        while read -r k v; do [ "$k" = oom_kill ] && oom=$v; done < "$b/memory.oom_control" ;;
  esac
done < /proc/self/cgroup
read -r now _ < /proc/uptime
out=$(printf 'service_result=%s\nexit_code=%s\nexit_status=%s\ncpu_ns=%s\nmemory_peak=%s\noom_kill=%s\n' \
  "${SERVICE_RESULT:-}" "${EXIT_CODE:-}" "${EXIT_STATUS:-}" "${cpu:-$acct}" "$peak" "$oom"
  printf 'started_uptime=%s\nexited_uptime=%s\nwritten_uptime=%s\nend=1' "$started" "$exited" "$now")
stage=$1 run=$2
shift 2
for f in "$stage"/box/work/* "$stage"/box/work/.[!.]* "$stage"/box/work/..?* "$stage"/box/out/*; do
  if [ -e "$f" ] || [ -L "$f" ]; then "$@" "$stage/box" "$run" || true; break; fi
done
umount "$stage/box" 2>/dev/null || umount -l "$stage/box" 2>/dev/null || true
rm -rf -- "$stage"
# The state disk full: the outcome goes to /run instead, where the broker finds it (fallback_result).
printf '%s\n' "$out" > "$run/result" 2>/dev/null || printf '%s\n' "$out" > "$stage.result"
"""

# A privileged (`+`) command still gets the unit's bind mounts and tmpfs
# (its empty /sys, the tmpfs over the state dir's parent): these scripts run
# in PID 1's mount namespace instead, where the run dir and cgroupfs are.
ON_HOST = ["+:/usr/bin/nsenter", "--mount=/proc/1/ns/mnt", "--", "/bin/sh", "-c"]

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


def build_profile(run_id: str, limits: Limits, *, run_dir: PurePosixPath, state_dir: PurePosixPath,
                  slice_name: str, runtime: Runtime, collector: Collector, lint: LintMode = LintMode.OFF,
                  linter: str | None = None, native_private_tmpfs: bool = False,
                  native_private_cgroups: bool = False, secret_paths: tuple[str, ...] = ()) -> dict[str, Any]:
    """Properties of `unitbox-run-<run_id>.service`. `run_dir` is the run's
    directory on the host (its `in/`, staged on /run, is mounted read-only at
    CODE_DIR). `collector`: what ExecStopPost runs to take the run's files.
    `lint`, `linter` (ruff's path): a static check before the program, or
    instead of it. `native_private_tmpfs`: systemd >= 256, where
    TemporaryFileSystem=/tmp and /var/tmp alone replace DynamicUser's implied
    PrivateTmp= (and the legacy unit root is gone: /sys stays the host's,
    read-only). `native_private_cgroups`: systemd >= 257, whose
    ProtectControlGroups=private shows a run its own cgroup only.
    `secret_paths`: more host paths runs must not see (e.g. a config file
    given with --config outside /etc/unitbox)."""
    disk = f"mode=1777,size={limits.disk_mb}M"
    legacy = not native_private_tmpfs
    stage = stage_dir(run_id)
    # `-`: ExecStartPre= (privileged, but given the unit's bind mounts) starts
    # before the staged files exist; the run itself only starts if it made them.
    read_only = [f"-{stage}/in:{CODE_DIR}", f"-{stage}/machine-id:/etc/machine-id"]
    if legacy:  # /sys: an empty tmpfs holding only the CPU topology; an empty /sys/fs/cgroup
        read_only += [f"{LEGACY_UNIT_ROOT}{SYS_DIR}:/sys", f"{LEGACY_UNIT_ROOT}{EMPTY_DIR}:/sys/fs/cgroup",
                      f"{SYS_KEPT}:{SYS_KEPT}"]
    if runtime.path is not None:
        read_only.append(f"{runtime.path}:{runtime.target or runtime.path}")
    state_tmpfs, state_inaccessible = hide_state_dir(state_dir)
    # The box (ExecStartPre mounts it): the working directory and the channel back.
    writable = [f"-{stage}/box/work:{WORK_DIR}", f"-{stage}/box/out:{OUT_DIR}"]
    if legacy:
        # systemd < 256: DynamicUser= implies PrivateTmp=, whose /tmp and
        # /var/tmp (directories on the host's /tmp and /var/tmp: uncapped, on
        # its disk) win over TemporaryFileSystem= at the same path (systemd
        # PR #32724 changed that in 256). A bind mount wins over both, and its
        # source resolves while the namespace is assembled under the unit root
        # (/run/systemd/unit-root on 252), where the capped tmpfs is mounted.
        writable += [f"-{LEGACY_UNIT_ROOT}{TMP_DIR}:/tmp", f"-{LEGACY_UNIT_ROOT}{VAR_TMP_DIR}:/var/tmp"]
    program = [":" + runtime.python, "-I", *(["-S"] if runtime.stdlib_only else []), "-u", "-c", BOOTSTRAP]
    start_pre = [[*ON_HOST, START_PRE_SCRIPT, "unitbox-start-pre", stage, str(run_dir), str(limits.disk_mb)]]
    if lint is not LintMode.OFF:
        if linter is None:
            raise ValueError("lint asked for without a linter")
        check = [":/bin/sh", "-c", LINT_SCRIPT, "unitbox-lint", linter]
        if lint is LintMode.ONLY:
            program = check
        else:  # a failed lint must not stop the program: `-`
            start_pre += [["-" + check[0], *check[1:]],
                          [*ON_HOST, LINT_TAKE_SCRIPT, "unitbox-lint-take", stage, str(run_dir)]]
    return {
        "Description": f"unitbox run {run_id}",
        "Slice": slice_name,
        # lifecycle
        "Type": "exec",
        "ExecStart": program,
        "ExecStartPre": start_pre,
        "ExecStopPost": [*ON_HOST, STOP_POST_SCRIPT, "unitbox-stop-post", stage, str(run_dir),
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
        "TemporaryFileSystem": [
            "/run:mode=755",  # hides the D-Bus socket and /run/systemd/transient
            f"/tmp:{disk}",
            f"/var/tmp:{disk}",
            f"/dev/shm:{disk}",  # PrivateDevices shares the host's /dev/shm otherwise
            *([f"{TMP_DIR}:{disk}", f"{VAR_TMP_DIR}:{disk}", f"{SYS_DIR}:mode=555", f"{EMPTY_DIR}:mode=555"]
              if legacy else []),
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
        "TasksMax": limits.tasks,
        "RuntimeMaxSec": limits.timeout_s,
        "TimeoutStartSec": START_BOUND_S,
        "TimeoutStopSec": STOP_BOUND_S,
        "LimitFSIZE": limits.disk_mb * MiB,
        "LimitNOFILE": 1024,
        "LimitCORE": 0,
    }
