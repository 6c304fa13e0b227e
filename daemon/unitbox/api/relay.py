"""Requests about a run of another node (cluster.py), relayed to that node:
its output, events, files, code, and cancel. The answer comes back as that
node gave it, streamed (an events stream stays live), so a client never
needs to know where a run executes. Status, listings and waits are not
relayed: the shared store answers them here.

The caller's own headers go along (its token included: every node has the
same tokens), so the node that runs it checks the caller as for a request of
its own; a request relayed once is never relayed again. A node that cannot
be reached is a 503 naming it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from unitbox.api.auth import caller_of
from unitbox.api.state import ENGINE, RELAY_SESSION
from unitbox.errors import Unavailable

log = logging.getLogger(__name__)

RELAYED_BY = "X-Unitbox-Relayed-By"  # the node that relayed it: answered where it arrives, whatever it finds
CONNECT_TIMEOUT_S = 5.0
# Hop-by-hop headers (RFC 9110 7.6.1), and those the two connections set for themselves.
_NOT_PASSED = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "host", "content-length"}


def relay_middleware(relayed: set[Handler], placed_first: set[Handler]) -> aiohttp.typedefs.Middleware:
    """Relays the requests for `relayed` handlers whose run is on another
    node. For `placed_first` ones (a live stream, the code), a run that no
    node has taken yet is waited for until one has (up to `wait_max_s`)."""
    @web.middleware
    async def relay(request: web.Request, handler: Handler) -> web.StreamResponse:
        run_id = request.match_info.get("id")
        if run_id is None or request.match_info.handler not in relayed or RELAYED_BY in request.headers:
            return await handler(request)
        engine = request.app[ENGINE]
        wait = engine.config.wait_max_s if request.match_info.handler in placed_first else 0.0
        home = await engine.home_of(run_id, caller_of(request), placed_within_s=wait)  # another's run: 404
        if home is None:
            return await handler(request)
        return await forward(request, *home, by=engine.cluster.name)
    return relay


async def forward(request: web.Request, node: str, url: str, *, by: str, method: str | None = None,
                  path_qs: str | None = None) -> web.StreamResponse:
    """`request` (or `method` `path_qs` with its headers) to the node at `url`; its answer, streamed."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_PASSED}
    headers[RELAYED_BY] = by
    body = await request.read() if request.body_exists and method is None else None
    session = request.app[RELAY_SESSION]
    try:
        upstream = await session.request(method or request.method, url + (path_qs or request.rel_url.path_qs),
                                         headers=headers, data=body, allow_redirects=False)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise Unavailable(f"run {request.match_info['id']} is on node {node!r} ({url}), which cannot be "
                          f"reached: {exc or type(exc).__name__}") from exc
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in _NOT_PASSED:
                response.headers.add(key, value)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        upstream.release()


async def relay_session(app: web.Application) -> AsyncIterator[None]:
    """The connections to the other nodes: no overall timeout (an events
    stream lasts as long as its run), bodies passed on as they come."""
    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        app[RELAY_SESSION] = session
        yield
