#!/bin/bash
# A throwaway real systemd for the test suite: systemd as PID 1 of fresh
# pid/mount/cgroup/uts/ipc namespaces, on an overlay of the machine's root,
# with its own tmpfs /tmp and /run (so systemd-tmpfiles never touches the
# machine's /tmp) and the cgroup controllers delegated read-write to a
# dedicated cgroup (so MemoryMax / CPUQuota / TasksMax are enforced).
#
#   testhost.sh start NAME DIR...  # boots; prints the host's PID 1 (outside view)
#   testhost.sh stop NAME          # kills it, unmounts, removes its cgroups
#   testhost.sh gc                 # stops hosts whose owner process is gone
#   nsenter -t "$(cat /run/unitbox-testhost/NAME.pid)" -a systemctl is-system-running
#
# The owner is $UNITBOX_TESTHOST_OWNER, else the caller's PID ($PPID).
# DIRs (the checkout, …) are bind-mounted live at the same path inside: the
# overlay's lower layer is a snapshot. Works on cgroup-v1/hybrid machines (each
# v1 controller mounted read-write at the namespace root) and on pure cgroup v2
# (a delegated cgroup2 subtree: under systemd, the scope
# unitbox-testhost-NAME.scope with Delegate=yes). Root only. Touches nothing
# but what it made: its scratch dir $SCRATCH/NAME (made by `start` with a
# marker file in it; `stop` and `gc` remove no dir without that marker), its
# pid and owner files and its own cgroups (unitbox-testhost-NAME), so a host
# can share the machine with any folder, cgroup or other host.
set -euo pipefail
cmd=${1:?start|stop|gc|_launch|_stage2}
# Overridable so the unit tests can drive stop/gc on a private tree, unprivileged.
RUNDIR=${UNITBOX_TESTHOST_RUNDIR:-/run/unitbox-testhost}
SCRATCH=${UNITBOX_TESTHOST_SCRATCH:-/var/tmp/unitbox-testhost}
MARKER=.unitbox-testhost   # in $SCRATCH/NAME: `start` made this dir
V1="cpu cpuacct cpuset blkio pids devices freezer"
log() { printf 'testhost: %s\n' "$*" >&2; }

valid_name() { [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$ ]]; }  # a path part and a hostname
check_name() { valid_name "$1" || { log "bad host name '$1' ([A-Za-z0-9][A-Za-z0-9_.-]*, at most 63)"; exit 2; }; }

made_here() { [ -f "$SCRATCH/$1/$MARKER" ] && [ ! -L "$SCRATCH/$1" ]; }

is_v2() { [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; }
# systemd owns a booted machine's cgroup2 tree: a host's cgroup there is a scope it delegates.
systemd_booted() { [ -d /run/systemd/system ] && command -v systemd-run >/dev/null; }
scope() { echo "unitbox-testhost-$1.scope"; }
own_cgroup() { awk -F: '$1=="0"{print $3}' /proc/self/cgroup; }
# The controllers the runs' limits need (MemoryMax, CPUQuota, TasksMax).
V2_CONTROLLERS="cpu memory pids"

cg_dirs() {  # every cgroup dir host $1 owns, one per hierarchy
  local name=$1 c memcg own
  if is_v2; then
    if systemd_booted; then   # empty once the scope is gone: systemd removed its cgroup
      own=$(systemctl show -P ControlGroup "$(scope "$name")" 2>/dev/null || true)
      [ -n "$own" ] && echo "/sys/fs/cgroup$own"
      return 0
    fi
    own=$(own_cgroup)
    echo "/sys/fs/cgroup${own%/}/unitbox-testhost-$name"; return
  fi
  memcg=$(awk -F: '$2=="memory"{print $3}' /proc/self/cgroup)
  for c in $V1 systemd unified; do [ -d /sys/fs/cgroup/$c ] && echo "/sys/fs/cgroup/$c/unitbox-testhost-$name"; done
  echo "/sys/fs/cgroup/memory${memcg%/}/unitbox-testhost-$name"
}

stop_host() {
  local name=$1 pid base=$SCRATCH/$1 d
  pid=$(cat "$RUNDIR/$name.pid" 2>/dev/null || true)
  # a stale pid file may name a reused pid: kill it only while it is in the host's cgroup
  if [[ $pid =~ ^[0-9]+$ ]] && grep -qE "/unitbox-testhost-${name//./\\.}(\.scope)?(/|$)" "/proc/$pid/cgroup" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true    # ends the whole pid namespace
    for _ in $(seq 100); do [ -e "/proc/$pid" ] || break; sleep 0.05; done
  fi
  # anything still in the host's own cgroups is ours (e.g. a half-booted host)
  for d in $(cg_dirs "$name"); do
    [ -d "$d" ] && find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
  done
  if made_here "$name"; then
    if mountpoint -q "$base/root" 2>/dev/null; then
      umount "$base/root" 2>/dev/null || umount -l "$base/root" 2>/dev/null || true
    fi
    if mountpoint -q "$base/root" 2>/dev/null; then log "$base/root is still mounted: left in place"
    else rm -rf --one-file-system "$base"; fi
  elif [ -e "$base" ] || [ -L "$base" ]; then
    log "left $base alone: no $MARKER in it, so this script did not make it"
  fi
  rm -f "$RUNDIR/$name.pid" "$RUNDIR/$name.owner"
  if is_v2 && systemd_booted; then   # empty by now: systemd ends it and removes its cgroup tree
    systemctl stop "$(scope "$name")" 2>/dev/null || true
  fi
  for d in $(cg_dirs "$name"); do
    [ -d "$d" ] || continue
    for _ in $(seq 50); do   # a cgroup can only go once its last process has
      find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
      [ -d "$d" ] || break; sleep 0.05
    done
  done
}

case $cmd in
start)
  NAME=${2:?name}; shift 2
  check_name "$NAME"
  BASE=$SCRATCH/$NAME
  mkdir -p -m 0755 "$SCRATCH"
  # a planted symlink or someone else's dir would make BASE point elsewhere
  if [ -L "$SCRATCH" ] || [ "$(stat -c %u "$SCRATCH")" != "$(id -u)" ]; then
    log "$SCRATCH is a symlink or not owned by $(id -un): refusing"; exit 3
  fi
  # mkdir without -p claims the name: it fails on anything already there
  mkdir -m 0700 "$BASE" 2>/dev/null || { log "$BASE exists: host $NAME is taken (testhost.sh stop $NAME)"; exit 3; }
  echo "$NAME" > "$BASE/$MARKER"
  mkdir -p "$RUNDIR" "$BASE/upper" "$BASE/work" "$BASE/root"
  echo "${UNITBOX_TESTHOST_OWNER:-$PPID}" > "$RUNDIR/$NAME.owner"
  mount -t overlay overlay -o "lowerdir=/,upperdir=$BASE/upper,workdir=$BASE/work" "$BASE/root"
  binds=()
  for d in "$@"; do binds+=("$(realpath "$d")"); done
  (
    if is_v2 && systemd_booted; then
      exec systemd-run --quiet --scope --collect --unit="$(scope "$NAME")" -p Delegate=yes -p TasksMax=infinity \
        --description="unitbox test host $NAME" "$0" _launch "$NAME" "${binds[@]}"
    fi
    exec "$0" _launch "$NAME" "${binds[@]}"
  ) </dev/null >"$BASE/console.log" 2>&1 &
  launcher=$!
  pid=
  for _ in $(seq 200); do   # wait for the namespace's PID 1 to become systemd
    for c in $(pgrep -P $launcher 2>/dev/null || true); do
      [ "$(readlink /proc/$c/exe 2>/dev/null)" = /usr/lib/systemd/systemd ] && pid=$c
    done
    [ -n "$pid" ] && break
    sleep 0.05
  done
  if [ -z "$pid" ]; then log "$NAME did not boot"; cat "$BASE/console.log" >&2; stop_host "$NAME"; exit 1; fi
  echo "$pid" > "$RUNDIR/$NAME.pid"
  state=
  for _ in $(seq 300); do
    state=$(nsenter -t "$pid" -a systemctl is-system-running 2>/dev/null || true)
    case $state in running|degraded) break ;; esac
    sleep 0.05
  done
  case $state in running|degraded) ;; *) log "$NAME: systemd state '$state'"; cat "$BASE/console.log" >&2; stop_host "$NAME"; exit 1 ;; esac
  echo "$pid"
  ;;
_launch)   # enters the host's cgroups, then becomes unshare, whose child becomes PID 1
  NAME=${2:?name}; shift 2
  if is_v2; then
    # cgroup2 lets only leaves hold processes, and systemd inside enables the
    # controllers below its own root: that root ("payload") must hold nothing
    # but the namespace's processes. This launcher, which stays outside the pid
    # namespace as unshare, waits in the leaf "supervisor"; _stage2 moves PID 1
    # into "payload" and only then makes the cgroup namespace.
    if systemd_booted; then top=/sys/fs/cgroup$(own_cgroup)   # the delegated scope
    else
      top=/sys/fs/cgroup$(own_cgroup); top=${top%/}/unitbox-testhost-$NAME
      mkdir -p "$top"
      for c in $V2_CONTROLLERS; do echo "+$c" > "${top%/*}/cgroup.subtree_control" 2>/dev/null || true; done
    fi
    mkdir -p "$top/supervisor" "$top/payload"
    echo $$ > "$top/supervisor/cgroup.procs"
    for c in $V2_CONTROLLERS; do
      if ! echo "+$c" > "$top/cgroup.subtree_control" 2>/dev/null; then
        log "$top: no $c controller to delegate: the runs' limits will not hold in this host"
      fi
    done
    exec setsid unshare --pid --mount --uts --ipc --fork --propagation private "$0" _stage2 "$NAME" "$@"
  fi
  for d in $(cg_dirs "$NAME"); do
    mkdir -p "$d"
    case $d in */cpuset/*) cat "${d%/*}/cpuset.cpus" > "$d/cpuset.cpus"; cat "${d%/*}/cpuset.mems" > "$d/cpuset.mems" ;; esac
    echo $$ > "$d/cgroup.procs"
  done
  exec setsid unshare --cgroup --pid --mount --uts --ipc --fork --propagation private "$0" _stage2 "$NAME" "$@"
  ;;
_stage2)   # PID 1 of the new namespaces; becomes systemd
  NAME=${2:?name}; shift 2
  if is_v2 && [ "$(own_cgroup)" != / ]; then   # not yet in its cgroup namespace (see _launch)
    own=$(own_cgroup)
    echo 0 > "/sys/fs/cgroup${own%/supervisor}/payload/cgroup.procs"
    exec unshare --cgroup "$0" _stage2 "$NAME" "$@"
  fi
  R=$SCRATCH/$NAME/root
  mount -t proc proc $R/proc
  mount -t sysfs -o ro,nosuid,nodev,noexec sysfs $R/sys
  if is_v2; then
    mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 $R/sys/fs/cgroup
  else
    mount -t tmpfs -o mode=755,nosuid,nodev,noexec tmpfs $R/sys/fs/cgroup
    for c in $V1 memory; do mkdir -p $R/sys/fs/cgroup/$c; mount -t cgroup -o nosuid,nodev,noexec,$c cgroup $R/sys/fs/cgroup/$c; done
    mkdir -p $R/sys/fs/cgroup/systemd; mount -t cgroup -o nosuid,nodev,noexec,none,name=systemd cgroup $R/sys/fs/cgroup/systemd
    mkdir -p $R/sys/fs/cgroup/unified; mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 $R/sys/fs/cgroup/unified
  fi
  mount -t tmpfs -o mode=755,nosuid tmpfs $R/dev
  for n in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do IFS=: read -r f a b <<<"$n"; mknod -m 666 $R/dev/$f c $a $b; done
  mkdir -p $R/dev/pts $R/dev/shm; mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts $R/dev/pts; ln -s pts/ptmx $R/dev/ptmx
  mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $R/dev/shm
  ln -s /proc/self/fd $R/dev/fd
  mount -t tmpfs -o mode=755,nosuid,nodev tmpfs $R/run
  mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $R/tmp
  for d in "$@"; do mkdir -p "$R$d"; mount --bind "$d" "$R$d"; done
  hostname "$NAME"
  cd $R; mkdir -p .oldroot; pivot_root . .oldroot; umount -l /.oldroot
  # As systemd does at boot on a real machine (it skips it in a container): mounts made
  # later on the host reach the units' namespaces. Peers of this namespace's mounts only.
  mount --make-rshared /
  exec env -i container=unitbox-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --unit=basic.target --log-target=journal-or-kmsg
  ;;
stop)
  check_name "${2:?name}"
  stop_host "$2"
  ;;
gc)   # hosts this script made for a test run that is gone (its owner died)
  for f in "$RUNDIR"/*.owner; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .owner); owner=$(cat "$f")
    valid_name "$name" && made_here "$name" || continue
    if ! kill -0 "$owner" 2>/dev/null; then log "removing stale $name"; stop_host "$name"; fi
  done
  ;;
*) echo "usage: $0 start NAME DIR... | stop NAME | gc" >&2; exit 2 ;;
esac
