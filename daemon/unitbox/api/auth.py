"""Who is asking: the bearer token of each request, turned into a Caller
(tokens.py) that the handlers pass to every RunService call about runs.

The middleware is always installed, so a request that reaches a handler of
runs always has its caller: without tokens configured that is EVERYONE
(every run, as before tokens had owners); with tokens, a request without a
valid one is a 401, except for the public liveness check and the playground
page's static files, which get no caller at all (caller_of fails closed there)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from unitbox.api.errors import Handler
from unitbox.api.playground import is_public
from unitbox.errors import Unauthorized
from unitbox.tokens import EVERYONE, Caller, TokenSection, TokenTable

PUBLIC_PATHS = frozenset({"/healthz", "/healthz/"})
CALLER = web.RequestKey("caller", Caller)


def auth_middleware(tokens: dict[str, TokenSection]) -> Middleware:
    table = TokenTable(tokens) if tokens else None

    @web.middleware
    async def identify(request: web.Request, handler: Handler) -> web.StreamResponse:
        if table is None:
            request[CALLER] = EVERYONE
        # A public path has no caller: it must not touch runs.
        elif request.path not in PUBLIC_PATHS and not is_public(request.path):
            request[CALLER] = _bearer(table, request)
        return await handler(request)

    return identify


def _bearer(table: TokenTable, request: web.Request) -> Caller:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    caller = table.identify(given.strip().encode()) if scheme.lower() == "bearer" else None
    if caller is None:
        raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required",
                           headers={"WWW-Authenticate": 'Bearer realm="unitbox"'})
    return caller


def caller_of(request: web.Request) -> Caller:
    """The request's caller; a KeyError (a 500) if the middleware did not run, never everyone's runs."""
    caller: Caller = request[CALLER]
    return caller
