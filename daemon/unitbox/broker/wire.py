"""The broker's wire: one JSON object per SOCK_SEQPACKET message (the kernel
keeps the boundaries, so there is no framing to get wrong), file descriptors
riding along as SCM_RIGHTS. Both ends run it on an asyncio loop: reads under
`add_reader`, writes straight to the socket and queued (fds duplicated, so
the caller may close its own at once) only when the socket is full."""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

from unitbox.systemd import UnitEnd, UnitInfo

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20
MAX_FDS = 8
BUFFER = 4 << 20
Message = dict[str, Any]


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """(daemon end, broker end); both close-on-exec (the broker's end is passed explicitly)."""
    ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    for end in ends:
        for option, forced in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):  # SO_*BUFFORCE as root
            try:
                end.setsockopt(socket.SOL_SOCKET, forced, BUFFER)
            except OSError:
                end.setsockopt(socket.SOL_SOCKET, option, BUFFER)
    return ends


def encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


class Channel:
    """One end of the wire. `on_message(message, fds)` owns the fds it is
    given (it must close them); `on_closed(reason)` is called once, when the
    other end hangs up or the socket fails."""

    def __init__(self, sock: socket.socket, on_message: Callable[[Message, list[int]], None],
                 on_closed: Callable[[str], None]) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._on_message = on_message
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self._queue: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self.closed = False
        self._loop.add_reader(sock.fileno(), self._readable)

    def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        if self.closed:
            raise ConnectionResetError("the broker connection is closed")
        data = encode(message)
        if not self._queue:
            try:
                self._sendmsg(data, fds)
                return
            except BlockingIOError:
                self._loop.add_writer(self._sock.fileno(), self._writable)
            except OSError as exc:
                self._close(f"sending failed: {exc}")
                raise ConnectionResetError(str(exc)) from exc
        self._queue.append((data, [os.dup(fd) for fd in fds]))

    def _sendmsg(self, data: bytes, fds: Sequence[int]) -> None:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self._sock.sendmsg([data], rights)

    def _writable(self) -> None:
        while self._queue:
            data, fds = self._queue[0]
            try:
                self._sendmsg(data, fds)
            except BlockingIOError:
                return
            except OSError as exc:
                self._close(f"sending failed: {exc}")
                return
            self._queue.popleft()
            _close_all(fds)
        self._loop.remove_writer(self._sock.fileno())

    def _readable(self) -> None:
        while not self.closed:
            try:
                data, fds, _flags, _address = socket.recv_fds(self._sock, MAX_MESSAGE, MAX_FDS,
                                                              socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            except OSError as exc:
                self._close(f"receiving failed: {exc}")
                return
            if not data:
                _close_all(fds)
                self._close("the other end hung up")
                return
            try:
                message = json.loads(data)
            except ValueError:
                _close_all(fds)
                log.error("dropping a malformed broker message (%d bytes)", len(data))
                continue
            try:
                self._on_message(message, list(fds))
            except Exception:
                log.exception("error while handling a broker message")

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._loop.remove_writer(self._sock.fileno())
        for _data, fds in self._queue:
            _close_all(fds)
        self._queue.clear()
        self._sock.close()
        self._on_closed(reason)

    def close(self) -> None:
        self._close("closed")


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- the facts that cross the wire -------------------------------------------------------------
def end_to_wire(end: UnitEnd) -> list[Any]:
    return [end.result, end.exit_code, end.exit_status, end.started_at, end.exited_at]


def end_from_wire(value: list[Any]) -> UnitEnd:
    result, exit_code, exit_status, started_at, exited_at = value
    return UnitEnd(str(result), str(exit_code), str(exit_status), started_at, exited_at)


def info_to_wire(info: UnitInfo) -> list[Any]:
    return [info.name, info.active_state, info.sub_state, info.has_job]


def info_from_wire(value: list[Any]) -> UnitInfo:
    name, active_state, sub_state, has_job = value
    return UnitInfo(str(name), str(active_state), str(sub_state), bool(has_job))
