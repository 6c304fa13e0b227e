"""The one place where exceptions become HTTP responses:
`{"error": {"code", "message"[, "details"]}}` with the contract's status."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from unitbox.errors import UnitboxError
from unitbox.exhaustion import is_exhaustion, unavailable

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
    413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_input",
}


def error_response(status: int, code: str, message: str, *, details: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return web.json_response({"error": body}, status=status, headers=headers)


def validation_details(exc: ValidationError, prefix: str = "") -> list[dict[str, Any]]:
    details = []
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        details.append({"field": prefix + field if field else prefix.rstrip(".") or "(body)", "message": message})
    return details


def validation_response(exc: ValidationError) -> web.Response:
    details = validation_details(exc)
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
    return error_response(422, "invalid_input", summary, details=details)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except UnitboxError as exc:
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc.message)
        return error_response(exc.status, exc.code, exc.message, details=exc.details, headers=exc.headers)
    except ValidationError as exc:
        return validation_response(exc)
    except json.JSONDecodeError as exc:
        return error_response(400, "malformed_json", f"the body is not valid JSON: {exc}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After", "WWW-Authenticate")}
        message = exc.text if exc.text and exc.text != exc.reason and not exc.text.startswith(str(exc.status)) \
            else _default_message(exc.status, request)
        return error_response(exc.status, _HTTP_CODES.get(exc.status, "http_error"), message, headers=headers)
    except Exception as exc:
        if is_exhaustion(exc):  # EMFILE, ENOMEM, ENOSPC… anywhere: the server's state, not a bug
            busy = unavailable(exc)
            log.warning("%s %s: %s", request.method, request.path, busy.message)
            return error_response(busy.status, busy.code, busy.message, headers=busy.headers)
        # A bug, never bad input: log it, answer without a traceback, keep serving.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; see the daemon's log")


def _default_message(status: int, request: web.Request) -> str:
    return {
        404: f"no such path: {request.path}",
        405: f"{request.method} is not allowed on {request.path}",
        413: "the request body is larger than the server accepts",
    }.get(status, "request failed")
