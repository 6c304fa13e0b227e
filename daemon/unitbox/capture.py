"""Capturing a run's stdout or stderr: the unit writes into a pipe, the
daemon drains it from the event loop into the run's output file, keeping at
most `cap` bytes and discarding (but still draining) the rest, so the program
is never blocked or killed for printing and the daemon's memory stays flat."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 1 << 16
MAX_READS_PER_WAKEUP = 16  # then yield to the loop: one chatty run cannot starve the others
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


def make_pipe() -> tuple[int, int]:
    """A pipe for a unit's output: (read end for us, write end for systemd)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # a bigger buffer means fewer wakeups
        fcntl.fcntl(read_fd, F_SETPIPE_SZ, PIPE_SIZE)
    os.set_blocking(read_fd, False)
    return read_fd, write_fd


class StreamCapture:
    def __init__(self, read_fd: int, path: Path, cap: int) -> None:
        self.fd = read_fd
        self.path = path
        self.cap = cap
        self._out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.kept = os.fstat(self._out).st_size  # non-zero when re-adopted after a restart
        self.truncated = self.kept >= cap and cap > 0 and self._probe_truncated()
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(self.fd, self._on_readable)

    def _probe_truncated(self) -> bool:
        return (self.path.parent / f".{self.path.name}.truncated").exists()

    def _mark_truncated(self) -> None:
        if not self.truncated:
            self.truncated = True
            with contextlib.suppress(OSError):
                (self.path.parent / f".{self.path.name}.truncated").touch(0o600)

    def _on_readable(self) -> None:
        for _ in range(MAX_READS_PER_WAKEUP):
            try:
                data = os.read(self.fd, CHUNK)
            except BlockingIOError:
                return
            except OSError:
                log.exception("reading output into %s failed", self.path)
                data = b""
            if not data:
                self.close()
                return
            room = self.cap - self.kept
            if room > 0:
                keep = data[:room]
                try:
                    os.write(self._out, keep)
                except OSError:
                    log.exception("writing output to %s failed; the rest is dropped", self.path)
                    self.cap = self.kept
                else:
                    self.kept += len(keep)
            if len(data) > max(room, 0):
                self._mark_truncated()

    def close(self) -> None:
        if self.done.done():
            return
        self._loop.remove_reader(self.fd)
        os.close(self.fd)
        os.close(self._out)
        self.done.set_result(None)
