#!/bin/bash
# Build (once, then cached) the Debian 12 VM image the package tests boot:
#   .cache/vm/base.img  ext4 root filesystem (raw; each test run boots a
#                       throw-away qcow2 overlay on top of it)
#   .cache/vm/vmlinuz, .cache/vm/initrd.img, .cache/vm/id_ed25519 (root's key)
# debootstrap's downloads are kept in .cache/vm/debs for the next rebuild.
# The image is rebuilt only when this script changes (its hash is the stamp).
# Needs root, debootstrap, e2fsprogs (mkfs.ext4 -d: no loop device, no mount).
# The image carries unitbox's dependencies from Debian (python3, python3-lxml,
# systemd, dbus) as a server would: the guest has no package lists, so
# `apt install ./unitbox_*.deb` resolves them offline.
set -euo pipefail
cd "$(dirname "$0")/../.."
VM=.cache/vm
STAMP=$VM/image.stamp
want=$(sha256sum tests/vm/image.sh | cut -c1-16)
if [[ -f $VM/base.img && -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
    echo "==> VM image is cached ($VM/base.img, recipe $want)"
    exit 0
fi

# The Debian mirror this machine's apt uses (deb822 .sources or one-line lists).
mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -m1 -E '/debian/?$' || true)
[[ -n $mirror ]] || mirror=$(grep -hsE '^deb .*/debian/? bookworm' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                             | awk '{print $2}' | head -n1 || true)
mirror=${mirror:-http://deb.debian.org/debian}

rootfs=$VM/rootfs
cleanup() {
    # debootstrap mounts proc/sys inside the target; never leave one behind.
    local m
    for m in $(findmnt -rn -o TARGET | grep -F "$(realpath -m "$rootfs")" | sort -r); do umount -l "$m" || true; done
    rm -rf "$rootfs"
}
trap cleanup EXIT
cleanup
mkdir -p "$VM/debs"
rm -f "$STAMP" "$VM/base.img"

echo "==> debootstrap bookworm from $mirror (≈1-2 min; packages cached in $VM/debs)"
start=$SECONDS
debootstrap --variant=minbase --cache-dir="$(realpath "$VM/debs")" \
    --include=systemd,systemd-sysv,dbus,libnss-systemd,udev,kmod,linux-image-amd64,python3,python3-lxml,openssh-server,curl,iproute2,procps \
    bookworm "$rootfs" "$mirror" 2>&1 | grep --line-buffered -E '^I: (Retrieving|Installing|Configuring|Base system)' \
    | awk -v every=40 '/^I: Base system/ {print "    " $0; fflush(); next} {n++; if (n % every == 0) {print "    ... " $0; fflush()}}'
[[ -x $rootfs/lib/systemd/systemd ]] || { echo "debootstrap failed" >&2; exit 1; }
echo "    debootstrap took $((SECONDS - start)) s"

echo "==> configuring the image (network, ssh key, fstab, no background apt)"
echo unitbox-vm > "$rootfs/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 unitbox-vm\n' > "$rootfs/etc/hosts"
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' > "$rootfs/etc/fstab"
sed -i 's/^root:[^:]*:/root::/' "$rootfs/etc/shadow"           # serial console login for debugging
mkdir -p "$rootfs/etc/systemd/network"
printf '[Match]\nName=en*\n\n[Network]\nDHCP=yes\n' > "$rootfs/etc/systemd/network/80-dhcp.network"
ln -sf /lib/systemd/system/systemd-networkd.service "$rootfs/etc/systemd/system/multi-user.target.wants/"
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do  # nothing takes the dpkg lock
    ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done
rm -f "$VM/id_ed25519" "$VM/id_ed25519.pub"
ssh-keygen -q -t ed25519 -N '' -C unitbox-vm-test -f "$VM/id_ed25519"
install -d -m 700 "$rootfs/root/.ssh"
install -m 600 "$VM/id_ed25519.pub" "$rootfs/root/.ssh/authorized_keys"
cp "$rootfs"/boot/vmlinuz-* "$VM/vmlinuz"
cp "$rootfs"/boot/initrd.img-* "$VM/initrd.img"
chmod 644 "$VM/vmlinuz" "$VM/initrd.img"

echo "==> mkfs.ext4 -d: $VM/base.img (3 GiB, sparse)"
mkfs.ext4 -q -F -L root -d "$rootfs" "$VM/base.img" 3G
echo "$want" > "$STAMP"
echo "==> VM image ready ($(du -sh --apparent-size "$VM/base.img" | cut -f1) apparent, $(du -sh "$VM/base.img" | cut -f1) on disk)"
