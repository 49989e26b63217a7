"""The served web page in real headless Chromium: it connects over WebRTC, streams a chat answer
from the embedded model, stops one, shows face boxes from a fake camera that films a real face
photograph, and falls back to HTTP SSE when WebRTC is not there. Offline, real server and worker."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from skimage import data as skdata

from tests.browser import Page, chromium, off_host
from tests.helpers import RunningServer, home_env, running_server

pytestmark = pytest.mark.timeout(300)


def write_y4m(path: Path, rgb: npt.NDArray[np.uint8], frames: int = 30) -> Path:
    """A still picture as a YUV4MPEG2 clip, which Chromium's fake camera plays in a loop."""
    height, width = rgb.shape[:2]
    i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).tobytes()  # Y plane, then U, then V
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F30:1 Ip A1:1\n".encode())
        for _ in range(frames):
            out.write(b"FRAME\n" + i420)
    return path


@pytest.fixture(scope="module")
def face_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_y4m(tmp_path_factory.mktemp("camera") / "astronaut.y4m", skdata.astronaut())


@contextlib.contextmanager
def serving(mode: str, home: Path) -> Iterator[RunningServer]:
    env = home_env(home)
    with running_server(("--mode", mode), env=env, log_dir=home) as srv:
        yield srv


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serving("web", tmp_path_factory.mktemp("home")) as srv:
        yield srv


def camera_flags(clip: Path) -> list[str]:
    return [
        "--use-fake-ui-for-media-stream",  # grant the camera without a prompt
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={clip}",
        # Chromium hides local addresses behind mDNS names unless the page may use the camera;
        # the sandbox answers no multicast, so say the real (loopback-reachable) addresses.
        "--disable-features=WebRtcHideLocalIpsWithMdns",
    ]


@contextlib.asynccontextmanager
async def opened(url: str, clip: Path) -> AsyncIterator[Page]:
    async with chromium(extra_args=camera_flags(clip)) as browser:
        page = await browser.new_page()
        await page.goto(url)
        await page.wait_for("typeof globalThis.tabagentPage === 'object'", what="page script")
        await page.evaluate("globalThis.tabagentPage.ready")
        yield page


def assert_stayed_local(page: Page, server: RunningServer) -> None:
    netloc = urlsplit(server.base_url).netloc
    assert off_host(page.requests, netloc) == [], page.report()
    assert page.failed == [], page.report()
    thrown = [e for e in page.errors if "favicon" not in e]
    assert thrown == [], page.report()


async def chat(page: Page, text: str) -> dict[str, Any]:
    run: dict[str, Any] = await page.evaluate(f"globalThis.tabagentPage.send({text!r})")
    return run


async def test_the_page_chats_over_webrtc_and_stops_an_answer(
    server: RunningServer, face_clip: Path
) -> None:
    async with opened(f"{server.base_url}/", face_clip) as page:
        assert await page.evaluate("globalThis.tabagentPage.transport") == "webrtc"
        assert await page.evaluate("document.getElementById('transport').textContent") == "webrtc"
        session = await page.evaluate("globalThis.tabagentPage.sessionId")
        models = await page.evaluate(
            "[...document.querySelectorAll('#model option')].map(o => o.value)"
        )
        assert "smollm2-135m-instruct" in models

        run = await chat(page, "Name three colours.")
        assert run["text"].strip()
        assert not run["stopped"]
        assert run["ttftMs"] > 0
        assert run["finishReason"] in ("stop", "length")
        shown = await page.evaluate("document.getElementById('messages').innerText")
        assert run["text"].strip()[:20] in shown
        assert await page.wait_for(
            "document.getElementById('ttft-ms').textContent", lambda v: any(c.isdigit() for c in v)
        )

        # a long answer, stopped from the page: the server cancels it, the page keeps the text
        await page.evaluate("document.getElementById('max-tokens').value = '2000'; undefined")
        for _ in range(3):  # a sampled answer may still end on its own before the click
            await page.evaluate(
                "globalThis.stopped = globalThis.tabagentPage.send('Write a very long epic poem.');"
                "undefined"  # do not wait for the answer here
            )
            await page.wait_for(
                "document.getElementById('stop').disabled === false", what="stop enabled"
            )
            await page.wait_for("globalThis.tabagentPage.busy", what="generating")
            await page.evaluate("document.getElementById('stop').click()")
            stopped = await page.evaluate("globalThis.stopped")
            if stopped["stopped"] or stopped["finishReason"] != "stop":
                break
        assert stopped["stopped"] is True, stopped
        assert len(stopped["text"]) < 4000  # far fewer than 2000 tokens arrived
        assert await page.evaluate("globalThis.tabagentPage.busy") is False

        # the server saw one WebRTC session: this page's
        listed = await page.evaluate(
            "fetch('/v1/webrtc/sessions').then(r => r.json()).then(b => b.data)"
        )
        assert [s["session_id"] for s in listed] == [session]
        assert_stayed_local(page, server)


async def test_the_camera_panel_shows_faces_detected_by_the_server(
    server: RunningServer, face_clip: Path
) -> None:
    async with opened(f"{server.base_url}/", face_clip) as page:
        await page.evaluate("globalThis.tabagentPage.startCamera(5)")
        last = await page.wait_for(
            "globalThis.tabagentPage.faces.events >= 3 && globalThis.tabagentPage.faces.last",
            within=60,
            what="face detections",
        )
        (face,) = last["faces"]
        assert face["score"] > 0.6
        x, y, w, h = face["box"]
        assert 0 <= x < x + w <= 1
        assert 0 <= y < y + h <= 1
        assert 0.1 < w < 0.5  # the astronaut's face, not the whole frame
        stats = await page.evaluate("document.getElementById('faces-stats').textContent")
        assert "1" in stats
        painted = await page.evaluate(
            "(() => { const c = document.getElementById('overlay');"
            " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; })()"
        )
        assert painted > 0  # the box is drawn over the video

        await page.evaluate("globalThis.tabagentPage.stopCamera()")
        count = await page.evaluate("globalThis.tabagentPage.faces.events")
        session = await page.evaluate("globalThis.tabagentPage.sessionId")
        listed = await page.evaluate(
            "fetch('/v1/webrtc/sessions').then(r => r.json()).then(b => b.data)"
        )
        (ours,) = [s for s in listed if s["session_id"] == session]
        assert ours["video_frames"] > count  # frames came in faster than they were analysed
        assert_stayed_local(page, server)


async def test_the_page_falls_back_to_http_sse_where_webrtc_is_not_served(
    tmp_path: Path, face_clip: Path
) -> None:
    with serving("http", tmp_path) as server:
        async with opened(f"{server.base_url}/", face_clip) as page:
            assert await page.evaluate("globalThis.tabagentPage.transport") == "sse"
            status = await page.evaluate("document.getElementById('status').textContent")
            assert "HTTP" in status
            run = await chat(page, "Say hello.")
            assert run["text"].strip()
            assert run["ttftMs"] > 0
            assert await page.evaluate("document.getElementById('camera-start').disabled")
            offers = [url for url in page.requests if url.endswith("/v1/webrtc/offer")]
            assert len(offers) == 1  # tried once, told webrtc_disabled, not retried
            assert any(url.endswith("/v1/chat/completions") for url in page.requests)
            assert off_host(page.requests, urlsplit(server.base_url).netloc) == []


async def test_the_page_can_be_told_to_use_http_sse(server: RunningServer, face_clip: Path) -> None:
    async with opened(f"{server.base_url}/?transport=sse", face_clip) as page:
        assert await page.evaluate("globalThis.tabagentPage.transport") == "sse"
        run = await chat(page, "Say hello.")
        assert run["text"].strip()
        assert run["ttftMs"] > 0
        assert await page.evaluate("document.getElementById('camera-start').disabled") is True
        assert not any("/v1/webrtc/" in url for url in page.requests)
        assert any(url.endswith("/v1/chat/completions") for url in page.requests)
        assert_stayed_local(page, server)


def test_the_page_and_the_extension_carry_the_same_chunks_js() -> None:
    """One chunking scheme, one file: the extension is loaded unpacked and cannot import from
    the server, so it carries a copy, which must not drift."""
    root = Path(__file__).resolve().parent.parent
    page = (root / "tabagent/web/lib/chunks.js").read_bytes()
    assert (root / "extension/lib/chunks.js").read_bytes() == page


async def test_split_message_keeps_every_chunk_under_the_limit_and_reassembles(
    server: RunningServer, face_clip: Path
) -> None:
    async with opened(f"{server.base_url}/?transport=sse", face_clip) as page:
        result = await page.evaluate(
            """(async () => {
              const { splitMessage, ChunkAssembler } = await import('/lib/chunks.js');
              const text = JSON.stringify({ id: 'big', method: 'x', params: {
                s: 'Grüße "quoted" \\\\ back\\nslash 世界 😀 \\u0001 '.repeat(20000) } });
              const parts = splitMessage(text, 'big', 65536);
              const sizes = parts.map(p => new TextEncoder().encode(p).length);
              const assembler = new ChunkAssembler();
              let whole = null;
              for (const p of parts) whole = assembler.push(JSON.parse(p)) ?? whole;
              return { count: parts.length, max: Math.max(...sizes),
                       same: JSON.stringify(whole) === text,
                       small: splitMessage('{"id":1}', 1, 65536) };
            })()"""
        )
    assert result["count"] > 10
    assert result["max"] <= 65536
    assert result["same"] is True
    assert result["small"] == ['{"id":1}']
