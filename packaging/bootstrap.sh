# Sourced by packaging/buildroot.sh and tests/vm/image.sh: a Debian root of a
# given release made by debootstrap, its downloads kept for the next rebuild.

# The Debian mirror this machine's apt uses (deb822 .sources or one-line lists).
debian_mirror() {
    local mirror
    mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -m1 -E '/debian/?$' || true)
    [[ -n $mirror ]] || mirror=$(grep -hsE '^deb .*/debian/? ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                                 | awk '{print $2}' | head -n1 || true)
    echo "${mirror:-http://deb.debian.org/debian}"
}

# Unmount whatever is still mounted under a root (debootstrap mounts proc and
# sys inside its target), deepest first.
umount_under() {
    local m
    for m in $(findmnt -rn -o TARGET | grep -F "$(realpath -m "$1")" | sort -r); do umount -l "$m" || true; done
}

# debootstrap_root DIST ROOT PACKAGES: a minbase root with PACKAGES, quietly
# (one progress line in 40); .debs cached in .cache/debs/DIST.
debootstrap_root() {
    local dist=$1 root=$2 packages=$3 mirror start cache
    mirror=$(debian_mirror)
    cache=.cache/debs/$dist
    mkdir -p "$cache"
    echo "==> debootstrap $dist into $root from $mirror (packages cached in $cache)"
    start=$SECONDS
    debootstrap --variant=minbase --cache-dir="$(realpath "$cache")" --include="$packages" \
        "$dist" "$root" "$mirror" 2>&1 | grep --line-buffered -E '^(I: (Retrieving|Installing|Configuring|Base system)|E: )' \
        | awk -v every=40 '/^(I: Base system|E: )/ {print "    " $0; fflush(); next} {n++; if (n % every == 0) {print "    ... " $0; fflush()}}'
    # debootstrap removes its own work dir only when it succeeded
    [[ -x $root/usr/bin/dpkg && ! -d $root/debootstrap ]] || { echo "debootstrap $dist failed" >&2; return 1; }
    echo "    debootstrap $dist took $((SECONDS - start)) s"
}
