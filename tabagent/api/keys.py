"""Typed keys for what the aiohttp application holds."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tabagent.state import AppState

STATE = web.AppKey("state", AppState)
OPENAPI = web.AppKey("openapi", dict[str, Any])
CORS_ORIGIN = web.RequestKey("cors_origin", str)
