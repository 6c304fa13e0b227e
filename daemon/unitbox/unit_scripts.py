"""The programs a run's unit executes besides the program itself: the
sandbox bootstrap (the interpreter's -c), the privileged set-up and outcome
recorder around it (ExecStartPre/ExecStopPost, run on the host), and the
linter's command line. profile.py puts them into the unit; each is text
systemd runs, so each is a constant here, tested on a real systemd."""

from __future__ import annotations

# Where a run sees its own files (profile.py mounts them there).
CODE_DIR = "/run/unitbox/code"
WORK_DIR = "/run/unitbox/work"
OUT_DIR = "/run/unitbox/out"  # the run's channel back: its entrypoint's value, its lint report
LINTER_PATH = "/run/unitbox/ruff"  # the host's ruff, bound read-only: wherever it lives, runs see it here
SCRIPT_PATH = f"{CODE_DIR}/main.py"
ARGV_PATH = f"{CODE_DIR}/argv"
FILES_PATH = f"{CODE_DIR}/files"  # input files, copied into WORK_DIR before the program starts
ENTRY_PATH = f"{CODE_DIR}/entry"  # "<function> <result cap in bytes>" when an entrypoint is called

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

# A warm unit's program (broker/warm.py): started ahead of any run with the
# pool's floor limits, its stdin an AF_UNIX SEQPACKET socket to the broker.
# This prefix is trusted code, the only code the unit runs until a program is
# handed over: it imports the pool's preloads (its arguments), says `ready`,
# and waits for one frame: the run's rlimits and thread variables (JSON) and,
# by SCM_RIGHTS, its stdin, stdout and stderr. It puts those on 0-2 (fd 0, the
# socket, goes: nothing the program runs can speak to the broker), lowers the
# rlimits, and falls through into BOOTSTRAP, so the program runs exactly as a
# cold run's does. Anything else (EOF: the broker is gone, or a frame that is
# not exactly that) ends the unit before a program exists.
WARM_STUB = (
    "import sys\n"
    "for n in sys.argv[1:]:__import__(n)\n"
    # The preloads' objects live as long as the unit: out of the collector's sight, the
    # program's exit does not walk them all (≈80 ms for numpy + pandas, measured).
    "import array,gc,json,os,resource,socket\n"
    "gc.freeze()\n"
    "s=socket.socket(fileno=0)\n"
    "s.send(b'ready')\n"
    "m,a,f,_=s.recvmsg(4096,socket.CMSG_SPACE(12))\n"
    "d=array.array('i')\n"
    "for l,t,x in a:\n"
    " if l==socket.SOL_SOCKET and t==socket.SCM_RIGHTS:d.frombytes(x[:len(x)-len(x)%4])\n"
    "if not m or len(d)!=3 or f&(socket.MSG_CTRUNC|socket.MSG_TRUNC):os._exit(0 if not m else 70)\n"
    "c=json.loads(m)\n"
    "s.detach()\n"
    "for i,x in enumerate(d):os.dup2(x,i);os.close(x)\n"
    "for k,v in (('NPROC',c['nproc']),('FSIZE',c['fsize'])):resource.setrlimit(getattr(resource,'RLIMIT_'+k),(v,v))\n"
    "os.environ.update(c['env'])\n"
    # Made at start-up over the socket: a stdin as a cold run has it (seekable, a file).
    "sys.stdin=sys.__stdin__=open(0,encoding=sys.stdin.encoding,errors=sys.stdin.errors,closefd=False)\n"
)

# Privileged ExecStartPre (outside the run's namespaces), in the staging
# directory on the host's /run that the broker made (and filled with the
# run's inputs, broker/staging.py): writes a fresh machine-id (a random v4
# UUID, as systemd-machine-id-setup makes one), to be bound read-only into
# the run; mounts the run's box: one tmpfs of disk_mb holding every place it
# may write (its working directory, its channel back OUT_DIR, /tmp, /var/tmp,
# /dev/shm: BOX_BINDS), made on the host so that its files outlive the run's
# mount namespace until ExecStopPost has collected them (inodes capped as
# systemd caps its own tmpfs: empty files cost no blocks); and makes the
# empty skeleton bound read-only at /sys. It never touches the daemon's state.
# Every place a run may write: (directory of the box, where the run sees it).
BOX_BINDS = (("work", WORK_DIR), ("out", OUT_DIR), ("tmp", "/tmp"), ("var-tmp", "/var/tmp"), ("shm", "/dev/shm"))
START_PRE_SCRIPT = r"""set -e
umask 077
mkdir -p "$1/box"
umask 022
mkdir -p "$1/sys/devices/system/cpu" "$1/sys/fs/cgroup"
mount -t tmpfs -o "size=$2M,nr_inodes=400k,mode=755,nosuid,nodev" tmpfs "$1/box"
mkdir -m 1777 """ + " ".join(f'"$1/box/{name}"' for name, _ in BOX_BINDS) + r"""
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
               f'exec {LINTER_PATH} check --isolated --no-cache --exit-zero --quiet --output-format json '
               f'--select {LINT_SELECT} -- {SCRIPT_PATH} > {OUT_DIR}/lint.json')
# After a lint that precedes the program: the report leaves the box before
# the program starts, so the program cannot rewrite it.
# Copied, not moved: the copy is root's and readable by the daemon (the
# linter's file is the run's user's, 0600); a symlink is never followed.
LINT_TAKE_SCRIPT = r"""f="$1/box/out/lint.json"
if [ -f "$f" ] && [ ! -L "$f" ]; then umask 022; cat -- "$f" > "$2/lint.json" || true; fi
rm -f -- "$f"
"""

# Command lines carry the `:` prefix: systemd must not expand `$…` in them.
# Privileged ExecStopPost (runs after the run's processes are gone, while its
# cgroup still exists): records the outcome durably in the run's ends
# directory (made by the broker, root's: never a path the daemon could
# swap; readable by the daemon through ends/' group), so
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
umask 022
started= cpu0=0
[ -r "$1/started" ] && read -r started < "$1/started"
[ -r "$1/cpu0" ] && read -r cpu0 < "$1/cpu0"
[ -e "$1/timed-out" ] && SERVICE_RESULT=timeout
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
cpu=${cpu:-$acct}
[ -n "$cpu" ] && cpu=$((cpu - cpu0))
out=$(printf 'service_result=%s\nexit_code=%s\nexit_status=%s\ncpu_ns=%s\nmemory_peak=%s\noom_kill=%s\n' \
  "${SERVICE_RESULT:-}" "${EXIT_CODE:-}" "${EXIT_STATUS:-}" "$cpu" "$peak" "$oom"
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

# A warm unit's ExecStopPost: its second argument is `ends/`, not the run's
# own directory, which is known only once a run is handed over (the broker
# then writes the run's id to the staging directory, where only root
# writes). A unit that never had a run records nothing; it only cleans up.
# The broker also leaves `started` (the hand-over), `cpu0` (the cgroup's
# CPU usage then: warm-up is not the run's) and, at the run's deadline,
# `timed-out` (it kills the unit itself: RuntimeMaxSec= cannot change on a
# running unit), which STOP_POST_SCRIPT reads.
WARM_STOP_POST_SCRIPT = r"""stage=$1 ends=$2
shift 2
if [ ! -r "$stage/run" ]; then
  umount "$stage/box" 2>/dev/null || umount -l "$stage/box" 2>/dev/null || true
  rm -rf -- "$stage" "$stage.result"
  exit 0
fi
read -r id < "$stage/run"
set -- "$stage" "$ends/$id" "$@"
""" + STOP_POST_SCRIPT

# A privileged (`+`) command still gets the unit's bind mounts and tmpfs
# (its empty /sys, the tmpfs over the state dir's parent): these scripts run
# in PID 1's mount namespace instead, where the run dir and cgroupfs are.
ON_HOST = ["+:/usr/bin/nsenter", "--mount=/proc/1/ns/mnt", "--", "/bin/sh", "-c"]
