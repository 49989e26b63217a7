"""Every test runs with its own HOME and XDG folders: nothing touches the user's real data."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tabagent.app import build_app
from tabagent.config import Settings, resolve

_ISOLATED_VARS = ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in _ISOLATED_VARS:
        monkeypatch.setenv(var, str(home / var.lower()))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in list(os.environ):
        if name.startswith("TABAGENT_"):
            monkeypatch.delenv(name)
    return home


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
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient[web.Request, web.Application]:
    return await make_client()
