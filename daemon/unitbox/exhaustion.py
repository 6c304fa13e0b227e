"""Resource exhaustion, recognised in one place. Running out of file
descriptors, memory or disk is the server's momentary state, not a bug and
not the client's fault: the request may succeed in a moment, so it is
answered 503 + Retry-After (errors.Unavailable), never 500. The error
middleware maps whatever reaches it through here; the engine already turns
its own OSErrors into Unavailable."""

from __future__ import annotations

import errno
import os

from unitbox.errors import Unavailable

EXHAUSTION_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC, errno.EDQUOT})
RETRY_AFTER_S = 2


def is_exhaustion(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in EXHAUSTION_ERRNOS
    # threading.Thread.start (asyncio.to_thread's pool growing) when the kernel
    # refuses a thread: RuntimeError, with the errno lost.
    return isinstance(exc, RuntimeError) and str(exc) == "can't start new thread"


def unavailable(exc: BaseException) -> Unavailable:
    """The 503 for an exhaustion error (is_exhaustion(exc) must hold)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        what = os.strerror(exc.errno)
    else:
        what = "out of memory" if isinstance(exc, MemoryError) else str(exc)
    return Unavailable(f"the server is out of resources ({what}); try again shortly", RETRY_AFTER_S)
