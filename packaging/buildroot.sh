#!/bin/bash
# The clean Debian root each package is built in, one per release, so the
# private venv, pystemd's build against libsystemd and the Depends: all come
# from the release the package is for:
#   buildroot.sh ensure DIST        build .cache/buildroot-DIST (debootstrap;
#                                   rebuilt only when this recipe changes)
#   buildroot.sh run DIST DIR CMD…  run CMD as root in that root, in DIR (a
#                                   directory of the checkout, bind-mounted at
#                                   /build), with no network and a private /tmp
#                                   and /proc; the root itself is left as made
# DIST: bookworm (Debian 12) or trixie (Debian 13). Needs root and debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."
. packaging/bootstrap.sh
# What dpkg-buildpackage (build-essential, debhelper, Build-Depends:) and
# lintian need; kept in step with packaging/debian/control.
# perl-openssl-defaults: lintian's perl needs perl-openssl-abi-3, a virtual
# package debootstrap cannot resolve by itself.
PACKAGES=perl-openssl-defaults,build-essential,debhelper,dpkg-dev,fakeroot,lintian,python3,python3-venv,python3-dev,python3-lxml,libsystemd-dev,pkg-config,gcc

ensure() {
    local dist=$1 root=.cache/buildroot-$1 want
    want=$(cat packaging/buildroot.sh packaging/bootstrap.sh | sha256sum | cut -c1-16)
    if [[ -x $root/usr/bin/dpkg-buildpackage && $(cat "$root.stamp" 2>/dev/null) == "$want" ]]; then
        echo "==> build root for $dist is cached ($root, recipe $want)"
        return
    fi
    trap "umount_under '$root'" EXIT
    umount_under "$root"
    rm -rf "$root" "$root.stamp"
    debootstrap_root "$dist" "$root" "$PACKAGES"
    rm -rf "$root"/var/cache/apt/archives/*.deb
    mkdir -p "$root/build"
    echo "$want" > "$root.stamp"
    echo "==> build root for $dist ready ($root, $(du -sh "$root" | cut -f1)): $(chroot "$root" sh -c \
        'echo python $(python3 -c "import sys; print(sys.version.split()[0])"), $(dpkg-query -W -f="\${Package} \${Version}, " libsystemd0 debhelper lintian)')"
}

run() {
    local dist=$1 dir=$2 root=.cache/buildroot-$1; shift 2
    [[ -x $root/usr/bin/dpkg-buildpackage ]] || { echo "no build root for $dist: buildroot.sh ensure $dist" >&2; exit 1; }
    # A mount namespace of its own: every mount below ends with the command.
    unshare --mount --net --pid --fork --propagation private -- /bin/bash -euc '
        root=$1 dir=$2; shift 2
        mount -t proc proc "$root/proc"
        mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
        mount --bind "$dir" "$root/build"
        exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
            /bin/sh -c "cd /build && exec \"\$@\"" sh "$@"
    ' bash "$(realpath "$root")" "$(realpath "$dir")" "$@"
}

case ${1:-} in
    ensure) ensure "${2:?DIST}" ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 ensure DIST | run DIST DIR CMD..." >&2; exit 2 ;;
esac
