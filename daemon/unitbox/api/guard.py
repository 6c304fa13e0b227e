"""The HTTP side's first line against hostile clients: a cap on open
connections (in total and per client) and a deadline for a connection's
first request head.

Why here, and why like this: aiohttp accepts every connection and gives it a
RequestHandler, which waits for a request head with no deadline of its own
(its keep-alive timer, which we also set, is an implementation detail that
varies between versions), and the token is only checked once a whole request
has arrived. So ~1,000 clients that send half a header and stop used to hold
~1,000 file descriptors for good. The least fragile seam is the protocol
factory the listening sockets use: `loop.create_server()` is public asyncio
API, and `GuardedSite` (a `web.SockSite` that passes a wrapped factory)
touches nothing of aiohttp's internals. Each accepted connection gets a
`GuardedConnection`, a plain asyncio protocol that

- refuses the connection in `connection_made` when a cap is reached: a
  minimal static 503 + Retry-After, a FIN, then the socket closes after the
  client's own close or LINGER_S (so the client reads the 503 rather than a
  reset); at most MAX_REFUSING such sockets linger, beyond that they are
  reset at once;
- otherwise hands the connection to aiohttp's handler, forwarding every
  callback, and closes it if no complete request head (a blank line after a
  request line) has arrived within `header_timeout_s`.

Later heads on a kept-alive connection, and idle keep-alive connections, are
bounded by aiohttp's `keepalive_timeout` (serve.py sets it to the same
value); request bodies by `body_timeout_s` in the handlers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import socket
import struct
from collections import Counter
from collections.abc import Callable

from aiohttp import web

log = logging.getLogger(__name__)

LINGER_S = 2.0
MAX_REFUSING = 256
"""Refused sockets lingering so their 503 is read: they too cost a descriptor (fdbudget.py counts them)."""
RETRY_AFTER_S = 2
IPV6_CLIENT_PREFIX = 64
"""An IPv6 client usually holds a whole /64: counting single addresses would not cap it."""


def _refusal(message: str) -> bytes:
    body = json.dumps({"error": {"code": "too_many_connections", "message": message}}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


OVER_TOTAL = _refusal("the server has too many open connections; try again shortly")
OVER_PER_CLIENT = _refusal("this client has too many open connections; close some or try again shortly")


def client_key(transport: asyncio.BaseTransport) -> str:
    """Who a connection counts against: its IP address (IPv6: its /64), or
    on a unix socket the peer's uid."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        try:
            address = ipaddress.ip_address(peer[0].split("%", 1)[0])
        except ValueError:
            return peer[0]
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.ip_network(f"{address}/{IPV6_CLIENT_PREFIX}", strict=False))
        return str(address)
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                   struct.calcsize("3i")))
            return f"uid:{uid}"
    return "unknown"


class ConnectionGuard:
    """The counts behind the caps, shared by every listening socket."""

    def __init__(self, *, max_connections: int, max_per_client: int, header_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.header_timeout_s = header_timeout_s
        self.open = 0
        self.per_client: Counter[str] = Counter()
        self.refusing: set[asyncio.Transport] = set()
        self.refused_total = 0
        self.head_timeouts_total = 0

    def wrap(self, factory: Callable[[], asyncio.BaseProtocol]) -> Callable[[], asyncio.Protocol]:
        return functools.partial(GuardedConnection, self, factory)

    def admit(self, key: str) -> bytes | None:
        """Count a new connection in, or say why not (the refusal to send)."""
        if self.open >= self.max_connections:
            return OVER_TOTAL
        if self.per_client[key] >= self.max_per_client:
            return OVER_PER_CLIENT
        self.open += 1
        self.per_client[key] += 1
        return None

    def release(self, key: str) -> None:
        self.open -= 1
        self.per_client[key] -= 1
        if self.per_client[key] <= 0:
            del self.per_client[key]

    def close(self) -> None:
        """At shutdown: drop the refused sockets still lingering."""
        for transport in list(self.refusing):
            transport.abort()


class GuardedConnection(asyncio.Protocol):
    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._key: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, so a head's end split across reads is found

    # -- accept or refuse ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        key = client_key(transport)
        refusal = self._guard.admit(key)
        if refusal is not None:
            self._refuse(transport, refusal)
            return
        self._key = key
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard.header_timeout_s, self._head_overdue)
        inner = self._factory()
        assert isinstance(inner, asyncio.Protocol)
        self._inner = inner
        inner.connection_made(transport)

    def _refuse(self, transport: asyncio.Transport, refusal: bytes) -> None:
        guard = self._guard
        guard.refused_total += 1
        if len(guard.refusing) >= MAX_REFUSING:
            transport.abort()
            return
        guard.refusing.add(transport)
        transport.write(refusal)
        with contextlib.suppress(OSError):
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(LINGER_S, transport.abort)

    def _head_overdue(self) -> None:
        self._timer = None
        self._guard.head_timeouts_total += 1
        if self._transport is not None:
            self._transport.abort()  # nothing was answered: there is nothing to flush

    def _saw_head_end(self, data: bytes) -> bool:
        if not self._tail:
            data = data.lstrip(b"\r\n")  # blank lines before a request line are allowed, and no head
            if not data:
                return False
        seen = self._tail + data
        if b"\n\r\n" in seen or b"\n\n" in seen:
            return True
        self._tail = seen[-2:]
        return False

    # -- forwarded to aiohttp's handler ----------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return  # a refused connection: its request is read and dropped
        if self._timer is not None and self._saw_head_end(data):
            self._timer.cancel()
            self._timer = None
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._guard.refusing.discard(self._transport)
        if self._key is not None:
            self._guard.release(self._key)
            self._key = None
        if self._inner is not None:
            self._inner.connection_lost(exc)
        self._transport = None


class GuardedSite(web.SockSite):
    """A listening socket (bound by us, or passed by systemd) served through
    the guard. SockSite.start would hand aiohttp's bare factory to
    create_server; this hands the wrapped one."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, guard: ConnectionGuard, *,
                 backlog: int = 128) -> None:
        super().__init__(runner, sock, backlog=backlog)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner (which stops it at cleanup)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.wrap(server), sock=self._sock, backlog=self._backlog)
