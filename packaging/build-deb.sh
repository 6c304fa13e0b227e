#!/bin/bash
# Build one .deb inside the clean root of its release (packaging/buildroot.sh)
# and lintian it there with that release's lintian:
#   build-deb.sh DIST SUFFIX SOURCE OUT
# SOURCE: a tree with daemon/, units/, packaging/ (its debian/ is the
# packaging), … — the checkout, or an older commit's `git archive`.
# SUFFIX (deb12, deb13 or empty) is appended to debian/changelog's version:
# unitbox_0.2.0~deb12 is built for, and installs only on, Debian 12.
# Offline: the wheelhouse (make wheelhouse) is copied in; the root has no network.
set -euo pipefail
cd "$(dirname "$0")/.."
dist=${1:?DIST} suffix=${2?SUFFIX} source=${3:?SOURCE} out=${4:?OUT}
upstream=$(sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' "$source/packaging/debian/changelog")
version=$upstream${suffix:+~$suffix}
arch=$(dpkg --print-architecture)
stage=.cache/deb-build/$dist-$version
tree=$stage/unitbox-$upstream

echo "==> staging unitbox $version for $dist in $tree"
rm -rf "$stage" && mkdir -p "$tree"
(cd "$source" && tar -c --exclude=__pycache__ --exclude='*.egg-info' --exclude=packaging/debian \
    daemon units packaging pyproject.toml README.md SECURITY.md docs) | tar -x -C "$tree"
cp -r "$source/packaging/debian" "$tree/debian"
cp -r .cache/wheelhouse "$tree/wheelhouse"
# The release in the package's version and changelog entry.
sed -i "1s/^unitbox ([^)]*) [a-z-]*;/unitbox ($version) $dist;/" "$tree/debian/changelog"

echo "==> dpkg-buildpackage -b in the $dist root, with no network: the venv, pystemd built against its libsystemd"
bash packaging/buildroot.sh run "$dist" "$stage" sh -c "cd unitbox-$upstream && dpkg-buildpackage -b -us -uc" \
    > "$stage/build.log" 2>&1 \
    || { tail -n 40 "$stage/build.log"; echo "dpkg-buildpackage failed: $stage/build.log" >&2; exit 1; }
deb=unitbox_${version}_$arch.deb
mkdir -p "$(dirname "$out")" && cp "$stage/$deb" "$out"
echo "==> built $out ($(du -h "$out" | cut -f1)); Depends: $(dpkg-deb -f "$out" Depends)"

echo "==> lintian $deb (lintian of $dist)"
set +e
bash packaging/buildroot.sh run "$dist" "$stage" lintian --fail-on error --tag-display-limit 0 "$deb" 2>&1 \
    | grep -v "root privileges" | sed 's/^/    /'
rc=${PIPESTATUS[0]}
set -e
if [[ $rc -eq 0 ]]; then echo "    lintian: no errors"; else echo "    lintian failed ($rc)" >&2; rm -f "$out"; exit "$rc"; fi
