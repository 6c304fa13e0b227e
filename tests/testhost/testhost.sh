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
# DIRs (the checkout, …) are bind-mounted live at the same path inside: the
# overlay's lower layer is a snapshot. Works on cgroup-v1/hybrid machines (each
# v1 controller mounted read-write at the namespace root) and on pure cgroup v2
# (a delegated cgroup2 subtree). Root only. Touches nothing outside its scratch
# dir (/var/tmp/NAME), its pid file and its own cgroups.
set -euo pipefail
cmd=${1:?start|stop|gc|_stage2}
RUNDIR=/run/unitbox-testhost
V1="cpu cpuacct cpuset blkio pids devices freezer"
log() { printf 'testhost: %s\n' "$*" >&2; }

is_v2() { [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; }

cg_dirs() {  # every cgroup dir host $1 owns, one per hierarchy
  local name=$1 c memcg own
  if is_v2; then
    own=$(awk -F: '$1=="0"{print $3}' /proc/self/cgroup)
    echo "/sys/fs/cgroup${own%/}/$name"; return
  fi
  memcg=$(awk -F: '$2=="memory"{print $3}' /proc/self/cgroup)
  for c in $V1 systemd unified; do [ -d /sys/fs/cgroup/$c ] && echo "/sys/fs/cgroup/$c/$name"; done
  echo "/sys/fs/cgroup/memory${memcg%/}/$name"
}

stop_host() {
  local name=$1 pid base=/var/tmp/$1 d
  pid=$(cat "$RUNDIR/$name.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && [ -e "/proc/$pid" ]; then
    kill -KILL "$pid" 2>/dev/null || true    # ends the whole pid namespace
    for _ in $(seq 100); do [ -e "/proc/$pid" ] || break; sleep 0.05; done
  fi
  # anything still in the host's own cgroups is ours (e.g. a half-booted host)
  for d in $(cg_dirs "$name"); do
    [ -d "$d" ] && find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
  done
  if mountpoint -q "$base/root" 2>/dev/null; then
    umount "$base/root" 2>/dev/null || umount -l "$base/root" 2>/dev/null || true
  fi
  rm -rf "$base" "$RUNDIR/$name.pid" "$RUNDIR/$name.owner"
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
  BASE=/var/tmp/$NAME
  mkdir -p "$RUNDIR" "$BASE/upper" "$BASE/work" "$BASE/root"
  echo "${UNITBOX_TESTHOST_OWNER:-$PPID}" > "$RUNDIR/$NAME.owner"
  mount -t overlay overlay -o "lowerdir=/,upperdir=$BASE/upper,workdir=$BASE/work" "$BASE/root"
  binds=()
  for d in "$@"; do binds+=("$(realpath "$d")"); done
  (
    for d in $(cg_dirs "$NAME"); do
      mkdir -p "$d"
      case $d in */cpuset/*) cat "${d%/*}/cpuset.cpus" > "$d/cpuset.cpus"; cat "${d%/*}/cpuset.mems" > "$d/cpuset.mems" ;; esac
      echo $BASHPID > "$d/cgroup.procs"
    done
    exec setsid unshare --cgroup --pid --mount --uts --ipc --fork --propagation private \
      "$0" _stage2 "$NAME" "${binds[@]}" </dev/null >"$BASE/console.log" 2>&1
  ) &
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
_stage2)   # PID 1 of the new namespaces; becomes systemd
  NAME=${2:?name}; shift 2
  R=/var/tmp/$NAME/root
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
  exec env -i container=unitbox-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --unit=basic.target --log-target=journal-or-kmsg
  ;;
stop)
  stop_host "${2:?name}"
  ;;
gc)   # hosts left by an interrupted test run whose owner is gone
  for f in "$RUNDIR"/*.owner; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .owner); owner=$(cat "$f")
    if ! kill -0 "$owner" 2>/dev/null; then log "removing stale $name"; stop_host "$name"; fi
  done
  ;;
*) echo "usage: $0 start NAME DIR... | stop NAME | gc" >&2; exit 2 ;;
esac
