#!/bin/bash
# After the tests: no test host of THIS run (names ubx-$UBX_TEST_RUN-*) may
# be left mounted, running or in a cgroup. Other hosts on the machine (a
# `make run`, someone else's test run) are none of its business.
set -u
tag=${UBX_TEST_RUN:?set UBX_TEST_RUN to the tag the test run used}
bad=0
if grep -E " /var/tmp/unitbox-testhost/ubx-$tag-[^ ]*/root " /proc/mounts; then echo "leftover test host mounts (above)"; bad=1; fi
if ls /run/unitbox-testhost/ubx-"$tag"-*.pid >/dev/null 2>&1; then echo "leftover test host pid files:"; ls /run/unitbox-testhost/ubx-"$tag"-*; bad=1; fi
if ls -d /var/tmp/unitbox-testhost/ubx-"$tag"-* >/dev/null 2>&1; then echo "leftover scratch dirs:"; ls -d /var/tmp/unitbox-testhost/ubx-"$tag"-*; bad=1; fi
if ls -d /tmp/ubx-pg-"$tag"-* >/dev/null 2>&1; then echo "leftover PostgreSQL test servers:"; ls -d /tmp/ubx-pg-"$tag"-*; bad=1; fi
if pgrep -f -- "-D /tmp/ubx-pg-$tag-" >/dev/null; then echo "leftover PostgreSQL server processes:"; pgrep -af -- "-D /tmp/ubx-pg-$tag-"; bad=1; fi
left=$(find /sys/fs/cgroup -maxdepth 6 -type d -name "unitbox-testhost-ubx-$tag-*" 2>/dev/null)
if [ -n "$left" ]; then echo "leftover test host cgroups:"; echo "$left"; bad=1; fi
[ $bad = 0 ] && echo "clean: no test host of run $tag left (mounts, scratch dirs, cgroups, processes, PostgreSQL servers)"
exit $bad
