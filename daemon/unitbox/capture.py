"""Capturing a run's stdout or stderr: the unit writes into a pipe, the
daemon drains it from the event loop into the run's output file (splice(2):
the bytes never pass through Python), keeping at most `cap` bytes and
discarding (but still draining) the rest, so the program is never blocked
or killed for printing and the daemon's memory stays flat.
What is kept is charged to the disk budget (budget.py); once that is used
up, the rest is dropped the same way, and nothing is written after it.

The capture is finished when the unit is: once systemd reports the unit
inactive, every process that could write is dead, so reading until the pipe
is empty (EAGAIN) gets everything. End-of-file is not waited for, because
under systemd a copy of the write end may sit in the fd store (see engine)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

CHUNK = 1 << 16  # bytes per splice (or read): at most MAX_READS_PER_WAKEUP of them per wakeup
MAX_READS_PER_WAKEUP = 16  # then yield to the loop: one chatty run cannot starve the others
# After emptying the pipe, wait this long before watching it again. Measured
# (bench/per_run_cost.py): a program printing 1 MB line by line woke the loop
# 1,100-2,000 times, ≈20 ms of CPU; paused, a few dozen. The 1 MiB pipe holds
# what comes meanwhile: a writer would wait only above 500 MB/s.
PAUSE_S = 0.002
_SCRATCH = bytearray(CHUNK)  # what is beyond the cap is read into this and forgotten
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


def truncation_marker(path: Path) -> Path:
    """The empty file whose presence says output beyond the cap was dropped."""
    return path.parent / f".{path.name}.truncated"


def stored_output(path: Path) -> tuple[int, bool]:
    """(bytes kept, truncated) of one captured stream, read from the files
    themselves: true for live, finished and recovered runs alike."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = 0
    return size, truncation_marker(path).exists()


def make_pipe() -> tuple[int, int]:
    """A pipe for a unit's output: (read end for us, write end for systemd)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # a bigger buffer: fewer wakeups, more slack while we restart
        fcntl.fcntl(read_fd, F_SETPIPE_SZ, PIPE_SIZE)
    return read_fd, write_fd


class Allowance(Protocol):
    """The disk budget as one run's capture sees it (budget.RunAccount)."""

    def room(self) -> int: ...
    def charge(self, size: int) -> None: ...


class StreamCapture:
    def __init__(self, read_fd: int, path: Path, cap: int, allowance: Allowance | None = None) -> None:
        os.set_blocking(read_fd, False)
        self.fd = read_fd
        self.path = path
        self.cap = cap
        self.allowance = allowance
        self.on_kept: Callable[[], None] | None = None  # told after a wakeup that kept bytes (follow.py)
        self._marker = truncation_marker(path)
        # Not O_APPEND: splice(2) refuses a file opened for appending; we write at the end ourselves.
        self._out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.kept = os.lseek(self._out, 0, os.SEEK_END)  # non-zero when re-adopted after a restart
        self.truncated = self._marker.exists()
        self.closed = False
        self._splice = True
        self._ended = False  # end of file (or a read error): nothing more will come
        self._pause: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        kept = self.kept
        emptied = self._read(MAX_READS_PER_WAKEUP)
        if self.kept != kept and self.on_kept is not None:
            self.on_kept()
        if emptied and not self._ended:
            # Emptied: look again in PAUSE_S, not at the next write. A program
            # printing line by line then costs a few wakeups, not one per write.
            self._loop.remove_reader(self.fd)
            self._pause = self._loop.call_later(PAUSE_S, self._resume)

    def _resume(self) -> None:
        self._pause = None
        self._loop.add_reader(self.fd, self._readable)

    def _read(self, max_reads: int | None) -> bool:
        """Move what is there; True once the pipe is empty or at end of file.
        Kept bytes go pipe → file by splice(2), never through Python."""
        reads = 0
        allowed = -1  # the budget's room, asked once a wakeup: meanwhile only our charges change it
        while max_reads is None or reads < max_reads:
            reads += 1
            room = self.cap - self.kept
            if room > 0 and self.allowance is not None:
                if allowed < 0:
                    allowed = self.allowance.room()
                room = min(room, allowed)
            try:
                if room <= 0:
                    moved = os.readv(self.fd, [_SCRATCH])
                elif self._splice:
                    moved = os.splice(self.fd, self._out, min(room, CHUNK), flags=os.SPLICE_F_NONBLOCK)
                else:
                    moved = self._copy(min(room, CHUNK))
            except BlockingIOError:
                return True
            except OSError as exc:
                moved = self._failed(exc, keeping=room > 0)
            else:
                if room > 0:
                    self.kept += moved
                    allowed -= moved
                    if self.allowance is not None:
                        self.allowance.charge(moved)
                elif moved:
                    self._dropped()
            if not moved:
                self._ended = True
                self._loop.remove_reader(self.fd)
                return True
        return False

    def _copy(self, count: int) -> int:
        data = os.read(self.fd, count)
        view = memoryview(data)
        while view:
            view = view[os.write(self._out, view):]
        return len(data)

    def _dropped(self) -> None:
        """Bytes beyond what may be kept were read and thrown away."""
        if self.kept < self.cap:
            # The disk budget (or the free-space floor) is used up: nothing
            # after this is kept either, so the stored output has no hole.
            log.warning("disk budget reached: the rest of %s is dropped", self.path)
            self.cap = self.kept
        if not self.truncated:
            self.truncated = True
            with contextlib.suppress(OSError):
                self._marker.touch(0o600)

    def _failed(self, exc: OSError, *, keeping: bool) -> int:
        """A splice or read failed: what to count as moved (0 stops reading)."""
        if keeping and self._splice and exc.errno == errno.EINVAL:
            self._splice = False  # a filesystem that takes no splice: copy through Python
            return -1
        if keeping:
            log.exception("writing output to %s failed; the rest is dropped", self.path)
            self.cap = self.kept
            return -1
        log.exception("reading output into %s failed", self.path)
        return 0

    def drained(self) -> bool:
        """Takes what the pipe holds now (a wakeup's worth at most); True if that
        emptied it. Once no process that could write is left, that is all there
        is, even while a copy of the write end waits in systemd's fd store."""
        if self.closed or self._ended:
            return True
        kept = self.kept
        emptied = self._read(MAX_READS_PER_WAKEUP)
        if self.kept != kept and self.on_kept is not None:
            self.on_kept()
        return emptied

    def finish(self) -> None:
        """The unit is gone: take the rest of the pipe, then close."""
        if self.closed:
            return
        self._read(None)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._pause is not None:
            self._pause.cancel()
        self._loop.remove_reader(self.fd)
        os.close(self.fd)
        os.close(self._out)
