"""Typed application state (aiohttp AppKeys)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from unitbox.engine import Engine

ENGINE = web.AppKey("engine", Engine)
OPENAPI = web.AppKey("openapi", dict[str, Any])
