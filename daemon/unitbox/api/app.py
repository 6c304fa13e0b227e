"""The aiohttp application: routes (each also with a trailing slash), the
error and auth middlewares, and the engine's startup/shutdown."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from unitbox.api import handlers, output
from unitbox.api.errors import Handler, error_middleware
from unitbox.api.openapi import build_openapi
from unitbox.api.state import ENGINE, OPENAPI
from unitbox.engine import Engine
from unitbox.errors import Unauthorized

PUBLIC_PATHS = frozenset({"/healthz", "/healthz/"})

ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/run-json", handlers.run_json),
    ("POST", "/run-file", handlers.run_file),
    ("GET", "/status/{id}", handlers.status),
    ("GET", "/output/{id}", output.output),
    ("POST", "/runs/{id}/cancel", handlers.cancel),
    ("DELETE", "/runs/{id}", handlers.cancel),
    ("GET", "/runs", handlers.list_runs),
    ("GET", "/runtimes", handlers.runtimes),
    ("GET", "/healthz", handlers.healthz),
    ("GET", "/metrics", handlers.metrics),
    ("GET", "/openapi.json", handlers.openapi),
]


def _auth_middleware(tokens: list[str]) -> Middleware:
    expected = [t.encode() for t in tokens]

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            token = given.strip().encode()
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(token, t) for t in expected):
                raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required",
                                   headers={"WWW-Authenticate": 'Bearer realm="unitbox"'})
        return await handler(request)

    return require_token


def create_app(engine: Engine, *, manage_engine: bool = True, shutdown_grace_s: float = 0.0) -> web.Application:
    """`manage_engine`: start the engine with the app and stop it on cleanup."""
    config = engine.config
    middlewares: list[Middleware] = [error_middleware]
    if config.tokens:
        middlewares.append(_auth_middleware(config.tokens))
    app = web.Application(middlewares=middlewares, client_max_size=config.max_request_kb * 1024)
    app[ENGINE] = engine
    app[OPENAPI] = build_openapi()
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
        app.router.add_route(method, path + "/", handler)

    if manage_engine:
        async def engine_lifetime(_: web.Application) -> AsyncIterator[None]:
            await engine.start()
            yield
            await engine.stop(shutdown_grace_s)
        app.cleanup_ctx.append(engine_lifetime)
    return app
