"""The aiohttp application: routes (each also with a trailing slash), the
playground page (unless turned off), the error and auth middlewares, and the
engine's startup/shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from unitbox.api import events, files, handlers, output, playground
from unitbox.api.auth import auth_middleware
from unitbox.api.errors import Handler, error_middleware
from unitbox.api.openapi import build_openapi
from unitbox.api.relay import relay_middleware, relay_session
from unitbox.api.state import ENGINE, OPENAPI
from unitbox.engine import Engine

# A run of another node of the cluster: answered by that node (api/relay.py). The
# others (status, listing, wait) come from the shared store here.
RELAYED: set[Handler] = {output.output, events.events, handlers.cancel, files.list_files, files.get_file,
                         files.code}
# Those that wait for a node to take a run from the shared queue (the others answer at once).
PLACED_FIRST: set[Handler] = {events.events}

ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/run-json", handlers.run_json),
    ("POST", "/run-file", handlers.run_file),
    ("GET", "/status/{id}", handlers.status),
    ("GET", "/output/{id}", output.output),
    ("GET", "/runs/{id}/events", events.events),
    ("POST", "/runs/{id}/cancel", handlers.cancel),
    ("DELETE", "/runs/{id}", handlers.cancel),
    ("GET", "/runs", handlers.list_runs),
    ("GET", "/runs/{id}/files", files.list_files),
    ("GET", "/runs/{id}/files/{path:.+}", files.get_file),
    ("GET", "/runs/{id}/code", files.code),
    ("GET", "/runtimes", handlers.runtimes),
    ("GET", "/limits", handlers.limits),
    ("GET", "/nodes", handlers.nodes),
    ("GET", "/healthz", handlers.healthz),
    ("GET", "/metrics", handlers.metrics),
    ("GET", "/openapi.json", handlers.openapi),
]


def create_app(engine: Engine, *, manage_engine: bool = True, shutdown_grace_s: float = 0.0) -> web.Application:
    """`manage_engine`: start the engine with the app and stop it on cleanup."""
    config = engine.config
    middlewares: list[Middleware] = [error_middleware, auth_middleware(config.tokens),
                                     relay_middleware(RELAYED, PLACED_FIRST)]
    app = web.Application(middlewares=middlewares, client_max_size=config.max_request_kb * 1024)
    app[ENGINE] = engine
    app[OPENAPI] = build_openapi()
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
        app.router.add_route(method, path + "/", handler)
    if config.playground:
        playground.add_routes(app)
    app.cleanup_ctx.append(relay_session)

    if manage_engine:
        async def engine_lifetime(_: web.Application) -> AsyncIterator[None]:
            await engine.start()
            yield
            await engine.stop(shutdown_grace_s)
        app.cleanup_ctx.append(engine_lifetime)
    return app
