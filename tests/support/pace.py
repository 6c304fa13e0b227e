"""How much slower than the project's 2-core machines the machine under test
is. The development tier in the Debian 13 VM sets UNITBOX_TEST_TIME_SCALE
when qemu emulates the CPU (TCG: a Python start costs seconds of CPU there).
Bounds on speed scale with it; bounds on protection (a deadline's lower
bound, a CPU quota's share) never do."""

from __future__ import annotations

import os

TIME_SCALE = float(os.environ.get("UNITBOX_TEST_TIME_SCALE") or 1)


def scaled(seconds: float) -> float:
    """A bound on how long something may take, on this machine."""
    return seconds * TIME_SCALE
