"""api/guard.py on real sockets (TCP and unix) with a real aiohttp runner:
caps refuse early with a readable 503, a missing request head is cut at its
deadline, and everything else reaches the app untouched."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from unitbox.api.guard import ConnectionGuard, GuardedSite, client_key

GET = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"


async def hello(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(text=f"hello {len(body)}")


class Served:
    def __init__(self, guard: ConnectionGuard, tcp: tuple[str, int], unix: str) -> None:
        self.guard, self.tcp, self.unix = guard, tcp, unix
        self.writers: list[asyncio.StreamWriter] = []  # closed at the end of the test

    async def connect(self, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(*self.tcp, local_addr=(source, 0))
        self.writers.append(writer)
        return reader, writer

    async def connect_unix(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_unix_connection(self.unix)
        self.writers.append(writer)
        return reader, writer


@pytest.fixture
async def served(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    total, per_client, head_s = getattr(request, "param", (6, 3, 0.3))
    app = web.Application()
    app.router.add_route("*", "/hello", hello)
    runner = web.AppRunner(app, keepalive_timeout=head_s)
    await runner.setup()
    guard = ConnectionGuard(max_connections=total, max_per_client=per_client, header_timeout_s=head_s)
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "sock"))
    for sock in (tcp, unix):
        await GuardedSite(runner, sock, guard).start()
    served = Served(guard, tcp.getsockname(), str(tmp_path / "sock"))
    yield served
    for writer in served.writers:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    await runner.cleanup()
    guard.close()


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes = GET) -> bytes:
    writer.write(request)
    await writer.drain()
    return await asyncio.wait_for(reader.read(65536), 5)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    began = asyncio.get_running_loop().time()
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), seconds) == b""
    return asyncio.get_running_loop().time() - began


async def test_requests_pass_through_on_tcp_and_unix_sockets(served: Served) -> None:
    reply = await ask(*await served.connect(), b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"hello 3")
    reply = await ask(*await served.connect_unix())
    assert reply.startswith(b"HTTP/1.1 200 ")


async def test_a_head_split_across_reads_is_not_cut(served: Served) -> None:
    reader, writer = await served.connect()
    for piece in (b"\r\nGET /hello HTTP/1.1\r\n", b"Host: x\r", b"\n", b"\r\n"):
        writer.write(piece)
        await asyncio.sleep(0.05)
    reply = await asyncio.wait_for(reader.read(65536), 5)
    assert reply.startswith(b"HTTP/1.1 200 ")


async def test_a_connection_without_a_complete_head_is_cut_at_the_deadline(served: Served) -> None:
    reader, writer = await served.connect()
    writer.write(b"POST /hello HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    assert 0.25 < await closed_within(reader, 3) < 1.5
    silent, _ = await served.connect()  # nothing at all, or blank lines only
    assert await closed_within(silent, 3) < 1.5
    assert served.guard.head_timeouts_total == 2
    await asyncio.sleep(0.05)
    assert served.guard.open == 0


async def test_a_kept_alive_connection_sending_half_a_second_head_is_cut(served: Served) -> None:
    reader, writer = await served.connect()
    assert (await ask(reader, writer)).startswith(b"HTTP/1.1 200 ")
    writer.write(b"GET /hello HTTP/1.1\r\n")
    assert await closed_within(reader, 3) < 1.5


async def test_over_the_per_client_cap_a_connection_gets_a_readable_503(served: Served) -> None:
    held = [await served.connect() for _ in range(3)]
    reply = await ask(*await served.connect())
    assert reply.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 2" in reply
    assert b"too many open connections" in reply
    # Another client is not affected, and the cap frees as connections close.
    assert (await ask(*await served.connect("127.0.0.2"))).startswith(b"HTTP/1.1 200 ")
    held[0][1].close()
    await asyncio.sleep(0.1)
    assert (await ask(*await served.connect())).startswith(b"HTTP/1.1 200 ")
    assert served.guard.refused_total == 1


async def test_over_the_total_cap_every_client_is_refused(served: Served) -> None:
    held = [await served.connect(f"127.0.0.{n}") for n in (1, 1, 2, 2, 3, 3)]
    assert served.guard.open == 6
    for source in ("127.0.0.4", "127.0.0.1"):
        assert (await ask(*await served.connect(source))).startswith(b"HTTP/1.1 503 ")
    unix_reply = await ask(*await served.connect_unix())
    assert unix_reply.startswith(b"HTTP/1.1 503 ")
    for _, writer in held:
        writer.close()


def test_clients_are_counted_by_address_ipv6_prefix_and_unix_uid() -> None:
    class Transport(asyncio.Transport):
        def __init__(self, peer: object, sock: socket.socket | None = None) -> None:
            super().__init__()
            self.extra = {"peername": peer, "socket": sock}

        def get_extra_info(self, name: str, default: object = None) -> object:
            return self.extra.get(name, default)

    assert client_key(Transport(("10.0.0.7", 5000))) == "10.0.0.7"
    assert client_key(Transport(("::ffff:10.0.0.7", 5000, 0, 0))) == "10.0.0.7"
    assert client_key(Transport(("2001:db8:1:2:aaaa::1", 5000, 0, 0))) == \
        client_key(Transport(("2001:db8:1:2:bbbb::9", 6000, 0, 0))) == "2001:db8:1:2::/64"
    left, right = socket.socketpair()
    with left, right:
        assert client_key(Transport("", left)) == "uid:0" or client_key(Transport("", left)).startswith("uid:")


def test_serve_binds_every_configured_address_and_passed_sockets_as_they_are(tmp_path: Path) -> None:
    from unitbox.config import load_config
    from unitbox.notify import InheritedFds
    from unitbox.serve import _listening_sockets

    path = tmp_path / "api.sock"
    path.write_text("stale")  # a leftover socket file is replaced
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    config = load_config(Path("/dev/null"), environ={}, cli={"listen": [f"localhost:{port}", f"unix:{path}"]})
    sockets = _listening_sockets(config, InheritedFds(sockets=[], stored={}))
    try:
        families = sorted(sock.family.name for sock in sockets)
        assert "AF_UNIX" in families and ("AF_INET" in families or "AF_INET6" in families)
        assert any(sock.getsockname() == str(path) for sock in sockets if sock.family == socket.AF_UNIX)
        passed = _listening_sockets(config, InheritedFds(sockets=[sockets[0].fileno()], stored={}))
        assert [sock.fileno() for sock in passed] == [sockets[0].fileno()]
        passed[0].detach()
    finally:
        for sock in sockets:
            sock.close()
