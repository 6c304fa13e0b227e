#!/bin/bash
# After the tests: no test host may be left mounted, running or in a cgroup.
set -u
bad=0
if grep -E ' /var/tmp/ubx-[^ ]*/root ' /proc/mounts; then echo "leftover test host mounts (above)"; bad=1; fi
if ls /run/unitbox-testhost/*.pid >/dev/null 2>&1; then echo "leftover test host pid files:"; ls /run/unitbox-testhost/; bad=1; fi
left=$(find /sys/fs/cgroup -maxdepth 6 -type d -name 'ubx-*' 2>/dev/null)
if [ -n "$left" ]; then echo "leftover test host cgroups:"; echo "$left"; bad=1; fi
[ $bad = 0 ] && echo "clean: no test host mounts, cgroups or processes left"
exit $bad
