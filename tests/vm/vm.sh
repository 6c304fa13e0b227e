#!/bin/bash
# The Debian VM of the package tests (image: tests/vm/image.sh), of the
# release $UNITBOX_VM_DIST (bookworm, the default, or trixie).
#   vm.sh accel          kvm where a real KVM is usable, else tcg
#   vm.sh start          boot a throw-away qcow2 overlay of the image under
#                        qemu; root's ssh on 127.0.0.1:<port> (qemu user
#                        networking, loopback only); waits for ssh
#   vm.sh ssh CMD...     run a command in the guest as root
#   vm.sh put FILE DEST  copy a file into the guest (over ssh's stdin)
#   vm.sh stop           kill that qemu (by its pid) and delete the overlay
#   vm.sh check-clean    fail if a VM of ours is still running
# One VM at a time per checkout; its files are in .cache/vm/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIST=${UNITBOX_VM_DIST:-bookworm}
VM=.cache/vm/$DIST
RUN=.cache/vm/run
KEY=$VM/id_ed25519

accel() {
    if [[ -n ${UNITBOX_VM_ACCEL:-} ]]; then echo "$UNITBOX_VM_ACCEL"; return; fi
    # A paravirtual /dev/kvm (kvm_pvm) hangs a stock Debian kernel at boot:
    # only the hardware flavours count.
    if [[ -w /dev/kvm ]] && [[ -d /sys/module/kvm_intel || -d /sys/module/kvm_amd ]]; then echo kvm; else echo tcg; fi
}

running() { [[ -f $RUN/qemu.pid ]] && kill -0 "$(cat "$RUN/qemu.pid")" 2>/dev/null; }

guest() {
    ssh -i "$KEY" -p "$(cat "$RUN/port")" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o LogLevel=ERROR -o BatchMode=yes -o ConnectTimeout=10 -o ServerAliveInterval=15 root@127.0.0.1 "$@"
}

stop() {
    if running; then
        local pid; pid=$(cat "$RUN/qemu.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -rf "$RUN"
}

start() {
    [[ -f $VM/base.img ]] || { echo "no $DIST VM image: run make vm-image" >&2; exit 1; }
    stop
    mkdir -p "$RUN"
    qemu-img create -q -f qcow2 -b "$(realpath "$VM/base.img")" -F raw "$RUN/overlay.qcow2"
    local port mode cpu
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    echo "$port" > "$RUN/port"
    mode=$(accel)
    cpu=max; [[ $mode == kvm ]] && cpu=host
    echo "==> booting the $DIST VM (qemu -accel $mode, 2 CPUs, 2 GiB; ssh on 127.0.0.1:$port; console: $RUN/console.log)"
    qemu-system-x86_64 -accel "$mode" -cpu "$cpu" -smp 2 -m 2048 -nodefaults -no-reboot \
        -kernel "$VM/vmlinuz" -initrd "$VM/initrd.img" \
        -append "root=/dev/vda rw console=ttyS0 systemd.show_status=0 quiet mitigations=off" \
        -drive "file=$RUN/overlay.qcow2,if=virtio,format=qcow2,cache=unsafe" \
        -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=n0 \
        -device virtio-rng-pci -display none -serial "file:$RUN/console.log" \
        -daemonize -pidfile "$RUN/qemu.pid"
    local t0=$SECONDS
    until guest true 2>/dev/null; do
        if ! running; then echo "qemu exited; console:" >&2; tail -n 30 "$RUN/console.log" >&2; exit 1; fi
        if (( SECONDS - t0 > 300 )); then echo "no ssh after 300 s; console:" >&2; tail -n 30 "$RUN/console.log" >&2; stop; exit 1; fi
        sleep 2
    done
    echo "    ssh answered after $((SECONDS - t0)) s: $(guest 'uname -r; systemctl --version | head -n1' | tr '\n' ' ')"
}

case ${1:-} in
    accel) accel ;;
    start) start ;;
    stop) stop ;;
    ssh) shift; guest "$@" ;;
    put) guest "cat > '$3'" < "$2" ;;
    check-clean)
        if running; then echo "a VM is still running (pid $(cat "$RUN/qemu.pid"))" >&2; exit 1; fi
        echo "==> no VM left running" ;;
    *) echo "usage: $0 accel|start|stop|ssh CMD|put FILE DEST|check-clean" >&2; exit 2 ;;
esac
