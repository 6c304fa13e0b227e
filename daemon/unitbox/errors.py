"""The one exception hierarchy of unitbox. Each class carries the HTTP status
and machine code it maps to; the API's error middleware is the only place
that turns them into responses. A user's program failing is never one of
these: it is a run state."""

from __future__ import annotations

from typing import Any, ClassVar


class UnitboxError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}


class BadRequest(UnitboxError):
    status = 400
    code = "bad_request"


class Unauthorized(UnitboxError):
    status = 401
    code = "unauthorized"


class Forbidden(UnitboxError):
    """A token that may not do this (an admin's endpoint)."""

    status = 403
    code = "forbidden"


class NotFound(UnitboxError):
    status = 404
    code = "not_found"


class RequestTimeout(UnitboxError):
    """The client did not send its request body in time (body_timeout_s)."""

    status = 408
    code = "request_timeout"


class PayloadTooLarge(UnitboxError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(UnitboxError):
    status = 415
    code = "unsupported_media_type"


class InvalidInput(UnitboxError):
    status = 422
    code = "invalid_input"


class InvalidLimits(InvalidInput):
    code = "invalid_limits"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"limits.{field} {problem}",
                         details=[{"field": f"limits.{field}", "message": problem}])
        self.field = field


class UnknownRuntime(InvalidInput):
    code = "unknown_runtime"


class Busy(UnitboxError):
    """The queue is full: try again later."""

    status = 503
    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class Unavailable(UnitboxError):
    """The service cannot take this request now (store full, systemd gone)."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class SystemdError(UnitboxError):
    """systemd refused or failed a call; the run becomes state `error`."""

    status = 503
    code = "systemd_error"


class ConfigError(Exception):
    """A bad configuration value, named by its key; fatal at startup."""
