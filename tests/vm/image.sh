#!/bin/bash
# Build (once, then cached) the VM image of one Debian release the package
# tests boot:   image.sh [bookworm|trixie]   (default: $UNITBOX_VM_DIST, else bookworm)
#   .cache/vm/DIST/base.img  ext4 root filesystem (raw; each test run boots a
#                            throw-away qcow2 overlay on top of it)
#   .cache/vm/DIST/vmlinuz, initrd.img, id_ed25519 (root's key)
# debootstrap's downloads are kept in .cache/debs/DIST for the next rebuild.
# An image is rebuilt only when its recipe changes (this script and
# packaging/bootstrap.sh; their hash is the stamp).
# Needs root, debootstrap, e2fsprogs (mkfs.ext4 -d: no loop device, no mount).
# The image carries unitbox's dependencies from Debian (python3, python3-lxml,
# systemd, dbus) as a server would: the guest has no package lists, so
# `apt install ./unitbox_*.deb` resolves them offline.
set -euo pipefail
cd "$(dirname "$0")/../.."
. packaging/bootstrap.sh
DIST=${1:-${UNITBOX_VM_DIST:-bookworm}}
VM=.cache/vm/$DIST
STAMP=$VM/image.stamp
want=$(cat tests/vm/image.sh packaging/bootstrap.sh | sha256sum | cut -c1-16)
if [[ -f $VM/base.img && -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
    echo "==> $DIST VM image is cached ($VM/base.img, recipe $want)"
    exit 0
fi

rootfs=$VM/rootfs
trap "umount_under '$rootfs'; rm -rf '$rootfs'" EXIT
umount_under "$rootfs"
rm -rf "$rootfs" "$STAMP" "$VM/base.img"
mkdir -p "$VM"
# Debian 13 is also the development machine of test_the_development_tier.py (make test-fast).
extra=; [[ $DIST == trixie ]] && extra=,make
debootstrap_root "$DIST" "$rootfs" \
    systemd,systemd-sysv,dbus,libnss-systemd,udev,kmod,linux-image-amd64,python3,python3-lxml,openssh-server,curl,iproute2,procps$extra

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
ssh-keygen -q -t ed25519 -N '' -C "unitbox-vm-test-$DIST" -f "$VM/id_ed25519"
install -d -m 700 "$rootfs/root/.ssh"
install -m 600 "$VM/id_ed25519.pub" "$rootfs/root/.ssh/authorized_keys"
cp "$rootfs"/boot/vmlinuz-* "$VM/vmlinuz"
cp "$rootfs"/boot/initrd.img-* "$VM/initrd.img"
chmod 644 "$VM/vmlinuz" "$VM/initrd.img"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb

echo "==> mkfs.ext4 -d: $VM/base.img (3 GiB, sparse)"
mkfs.ext4 -q -F -L root -d "$rootfs" "$VM/base.img" 3G
echo "$want" > "$STAMP"
echo "==> $DIST VM image ready ($(du -sh --apparent-size "$VM/base.img" | cut -f1) apparent, $(du -sh "$VM/base.img" | cut -f1) on disk)"
