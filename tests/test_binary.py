"""Smoke tests of the single binary (``packaging/build.sh``; ``scripts/test.sh`` builds it first):
the frozen ``tabagent-server`` runs every mode, is its own ML worker and native host, carries the
default models, and leaves no process behind. Each test starts the binary as a user would, with
its own HOME."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
from skimage import data as skdata

from tabagent import __version__
from tests.helpers import RunningServer, home_env, http_get, post_json, running_server
from tests.native_host import native_host

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "dist" / "tabagent-server" / "tabagent-server"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def built() -> Path:
    if not BINARY.is_file():
        pytest.fail(
            f"{BINARY} is missing: build it with packaging/build.sh (scripts/test.sh does)",
            pytrace=False,
        )
    return BINARY


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BINARY), *args], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def processes_of_the_build() -> list[int]:
    """Live processes whose executable is the frozen binary (the server and its worker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = os.readlink(entry / "exe")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if exe == str(BINARY) and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("home")
    env = home_env(home)
    with running_server(
        ("--mode", "web"), env=env, log_dir=home, program=str(BINARY), timeout=60
    ) as srv:
        yield srv


def test_version_and_get_health() -> None:
    version = run("--version")
    assert version.returncode == 0, version.stderr
    assert __version__ in version.stdout
    health = run("--get", "/v1/health")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["components"]["ml_worker"]["state"] == "ok"
    missing = run("--get", "/v1/nothing-here")
    assert missing.returncode != 0


def test_web_mode_serves_docs_page_chat_embeddings_and_faces(server: RunningServer) -> None:
    base = server.base_url
    assert http_get(f"{base}/api-doc/swagger")[0] == 200
    assert http_get(f"{base}/api-doc/assets/swagger/js/swagger-ui-bundle.js")[0] == 200
    status, page = http_get(f"{base}/")
    assert status == 200
    assert b"tabagentPage" in page or b"app.js" in page

    status, reply = post_json(
        f"{base}/v1/chat/completions",
        {"model": "smollm2-135m-instruct", "max_tokens": 12, "temperature": 0,
         "messages": [{"role": "user", "content": "Name three colours."}]},
    )  # fmt: skip
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"].strip()

    status, vectors = post_json(f"{base}/v1/embeddings", {"input": ["a cat", "a dog"]})
    assert status == 200, vectors
    assert len(vectors["data"]) == 2
    assert len(vectors["data"][0]["embedding"]) == 384  # all-MiniLM-L6-v2

    ok, png = cv2.imencode(".png", cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))
    assert ok
    status, faces = post_json(
        f"{base}/v1/vision/faces", {"image": base64.b64encode(png.tobytes()).decode()}
    )
    assert status == 200, faces
    assert len(faces["faces"]) == 1

    status, hardware = http_get(f"{base}/v1/system/hardware")
    assert status == 200
    assert json.loads(hardware)["hardware"]["cpu"]["logical_cores"] == os.cpu_count()


async def test_native_messaging_round_trip_and_streamed_chat(tmp_path: Path) -> None:
    env = home_env(tmp_path)
    async with native_host(env, log_dir=tmp_path, program=str(BINARY)) as host:
        hello = await host.result("session.hello")
        assert hello["transport"] == "native"
        params = {"messages": [{"role": "user", "content": "Name three colours."}],
                  "max_tokens": 16, "temperature": 0}  # fmt: skip
        await host.send({"id": "chat", "method": "chat.complete", "params": params})
        events = [e async for e in host.events("chat", within=120)]
        assert sum(e["event"] == "delta" for e in events) >= 2
        assert events[-1]["event"] == "done"
        await host.close_stdin()
        assert await host.wait(30) == 0


def test_sigterm_leaves_no_process_behind(tmp_path: Path) -> None:
    env = home_env(tmp_path)
    before = set(processes_of_the_build())
    with running_server(
        ("--mode", "all"), env=env, log_dir=tmp_path, program=str(BINARY), timeout=60
    ) as srv:
        post_json(f"{srv.base_url}/v1/models/load", {"model": "smollm2-135m-instruct"})
        ours = set(processes_of_the_build()) - before
        assert len(ours) >= 2  # the server and the worker it spawned from the same binary
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
    deadline = time.monotonic() + 15
    while left := set(processes_of_the_build()) & ours:
        assert time.monotonic() < deadline, f"still running after SIGTERM: {left}"
        time.sleep(0.1)


def test_native_install_points_the_browser_at_the_binary(tmp_path: Path) -> None:
    env = {**os.environ, **home_env(tmp_path)}
    done = subprocess.run(
        [str(BINARY), "native", "install", "--browser", "chrome"],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = Path(env["XDG_CONFIG_HOME"])
    manifest = config / "google-chrome/NativeMessagingHosts/com.tabagent.host.json"
    assert json.loads(manifest.read_text())["path"] == str(BINARY)
