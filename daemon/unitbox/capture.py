"""Capturing a run's stdout or stderr: the unit writes into a pipe, the
daemon drains it from the event loop into the run's output file, keeping at
most `cap` bytes and discarding (but still draining) the rest, so the program
is never blocked or killed for printing and the daemon's memory stays flat.
What is kept is charged to the disk budget (budget.py); once that is used
up, the rest is dropped the same way, and nothing is written after it.

The capture is finished when the unit is: once systemd reports the unit
inactive, every process that could write is dead, so reading until the pipe
is empty (EAGAIN) gets everything. End-of-file is not waited for, because
under systemd a copy of the write end may sit in the fd store (see engine)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

CHUNK = 1 << 16
MAX_READS_PER_WAKEUP = 16  # then yield to the loop: one chatty run cannot starve the others
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
        self._marker = truncation_marker(path)
        self._out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.kept = os.fstat(self._out).st_size  # non-zero when re-adopted after a restart
        self.truncated = self._marker.exists()
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._read, MAX_READS_PER_WAKEUP)

    def _read(self, max_reads: int | None) -> bool:
        """Read what is there; True once the pipe is empty or at end of file."""
        reads = 0
        while max_reads is None or reads < max_reads:
            reads += 1
            try:
                data = os.read(self.fd, CHUNK)
            except BlockingIOError:
                return True
            except OSError:
                log.exception("reading output into %s failed", self.path)
                data = b""
            if not data:
                self._loop.remove_reader(self.fd)
                return True
            self._keep(data)
        return False

    def _keep(self, data: bytes) -> None:
        room = self.cap - self.kept
        if room > 0 and self.allowance is not None and (allowed := self.allowance.room()) < min(room, len(data)):
            # The disk budget (or the free-space floor) is reached: keep what
            # fits and nothing after it, so the stored output has no hole.
            log.warning("disk budget reached: the rest of %s is dropped", self.path)
            room = allowed
            self.cap = self.kept + allowed
        if room > 0:
            try:
                written = os.write(self._out, data[:room])
            except OSError:
                log.exception("writing output to %s failed; the rest is dropped", self.path)
                self.cap = self.kept
            else:
                self.kept += written
                if self.allowance is not None:
                    self.allowance.charge(written)
        if len(data) > max(room, 0) and not self.truncated:
            self.truncated = True
            with contextlib.suppress(OSError):
                self._marker.touch(0o600)

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
        self._loop.remove_reader(self.fd)
        os.close(self.fd)
        os.close(self._out)
