"""The daemon's file-descriptor budget, computed from the configuration at
startup. Everything the daemon holds is a descriptor: every open connection
(so every held `wait` request), each running run's pipes and output files,
the store, the bus, the journal, the listeners. With the kernel's default
soft limit of 1024, a flood of idle connections or a full queue of waiting
requests used to exhaust them (EMFILE: submissions failed, accept() failed).

So the soft RLIMIT_NOFILE is raised to what the configuration needs (never
beyond the hard limit, which only privilege can raise); if even the hard
limit cannot hold it, the daemon refuses to start, naming the keys.
units/unitbox.service sets LimitNOFILE= to a value that holds the defaults
with room to spare: the unit's SystemCallFilter= (~@resources) forbids
setrlimit(), so under it the limit must already be there."""

from __future__ import annotations

import logging
import resource

from unitbox.api.guard import MAX_REFUSING
from unitbox.config import Config
from unitbox.errors import ConfigError

log = logging.getLogger(__name__)

FDS_PER_RUN = 6
"""A running run holds 4 (the read end of its stdout and stderr pipes, and
the output file each is drained into); launching it briefly takes 3 more
(its stdin, the pipes' write ends), but launches go one at a time."""
OVERHEAD_FDS = 256
"""The store (database, WAL, shm), the bus, the journal, the listeners,
stdio, the event loop's own, worker threads' short-lived files (a run's
inputs being written), runtime discovery, a `GET /runtimes` subprocess."""


def required_fds(config: Config) -> int:
    return config.max_connections + MAX_REFUSING + FDS_PER_RUN * config.max_concurrent + OVERHEAD_FDS


def ensure_fd_budget(config: Config) -> int:
    """Raise the soft RLIMIT_NOFILE to the budget if it is below; return the
    limit in force. ConfigError if the budget cannot be had."""
    need = required_fds(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    keys = (f"max_connections ({config.max_connections}) + {MAX_REFUSING} refused ones lingering "
            f"+ {FDS_PER_RUN} * max_concurrent ({config.max_concurrent}) + {OVERHEAD_FDS}")
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ConfigError(f"the configuration needs {need} file descriptors ({keys}), but the hard limit "
                          f"is {hard}: lower max_connections or max_concurrent, or raise LimitNOFILE= "
                          "in unitbox.service (ulimit -n)")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    except (ValueError, OSError) as exc:  # EPERM under a syscall filter that forbids setrlimit
        raise ConfigError(f"the configuration needs {need} file descriptors ({keys}), the soft limit is "
                          f"{soft} and raising it failed ({exc}): raise LimitNOFILE= in unitbox.service "
                          "(ulimit -n), or lower max_connections or max_concurrent") from None
    log.info("raised the open-file limit from %d to %d (%s)", soft, need, keys)
    return need
