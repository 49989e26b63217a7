"""Every test runs with its own HOME and XDG folders: nothing touches the user's real data."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tabagent.app import build_app
from tabagent.config import Settings, resolve
from tests.helpers import Server, isolate


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return isolate(monkeypatch, tmp_path / "home")


@pytest.fixture
def settings(isolated_home: Path) -> Settings:
    """Settings of a server without the ML worker (tests of inference start their own)."""
    return resolve({"ml_worker": False})[0]


ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def make_client(aiohttp_client: ClientFactory, settings: Settings) -> ClientFactory:
    """A real aiohttp server on an ephemeral port for ``build_app(settings, **overrides)``."""

    async def make(**overrides: object) -> TestClient[web.Request, web.Application]:
        if overrides:  # validated, like any other source of settings
            merged = Settings.model_validate({**settings.model_dump(), **overrides})
        app = build_app(merged if overrides else settings)
        return await aiohttp_client(Server(app))

    return make


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient[web.Request, web.Application]:
    return await make_client()
