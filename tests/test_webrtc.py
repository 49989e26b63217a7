"""WebRTC signaling and the envelope over a data channel, with real aiortc peers on both ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
from skimage import data as skdata

from tests.conftest import ClientFactory
from tests.helpers import running_server
from tests.test_faces import FACE_BOX
from tests.webrtc_client import PhotoTrack, connect, peer


@pytest.fixture
async def server(make_client: ClientFactory) -> str:
    client = await make_client(mode="web")
    return str(client.make_url("")).rstrip("/")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def sessions(http: aiohttp.ClientSession, server: str) -> list[dict[str, Any]]:
    async with http.get(f"{server}/v1/webrtc/sessions") as response:
        assert response.status == 200
        return list((await response.json())["data"])


async def test_offer_answer_and_operations_over_the_data_channel(
    http: aiohttp.ClientSession, server: str
) -> None:
    async with peer(http, server) as p:
        hello = await p.result("session.hello")
        assert hello["transport"] == "webrtc"
        assert hello["session_id"] == p.session_id
        assert (await p.result("system.health"))["components"]["webrtc"]["state"] == "ok"
        conv = await p.result("conversations.create", {"title": "over webrtc"})
        assert (await p.result("conversations.get", {"id": conv["id"]}))["title"] == "over webrtc"

        (listed,) = await sessions(http, server)
        assert listed["session_id"] == p.session_id
        assert listed["state"] == "connected"
        assert listed["channels"] == ["tabagent"]
        assert listed["bytes_received"] > 0
        assert listed["bytes_sent"] > 0

        async with http.delete(f"{server}/v1/webrtc/sessions/{p.session_id}") as response:
            assert response.status == 200
            assert (await response.json())["closed"] is True
        assert await sessions(http, server) == []


async def test_large_messages_are_chunked_both_ways(
    http: aiohttp.ClientSession, server: str
) -> None:
    text = "Grüße, 世界! " * 15_000  # 180,000 characters
    async with peer(http, server) as p:
        conv = await p.result("conversations.create", {"title": "big"})
        # ~1.4 MB request: the client splits it at 64 KiB, the server reassembles it
        await p.result(
            "conversations.append",
            {"id": conv["id"], "messages": [{"role": "user", "content": text}] * 6},
        )
        before = p.chunks_received
        listed = await p.result("conversations.messages", {"id": conv["id"]})
        assert [m["content"] for m in listed["data"]] == [text] * 6
        assert p.chunks_received - before >= 6  # the answer did not fit one SCTP message


async def test_malformed_messages_get_errors_and_the_channel_stays_up(
    http: aiohttp.ClientSession, server: str
) -> None:
    async with peer(http, server) as p:
        p.channel.send("{not json")
        assert (await p.recv())["error"]["code"] == "invalid_json"
        p.channel.send(b"\x00\x01binary")
        assert (await p.recv())["error"]["code"] == "invalid_json"
        p.channel.send(
            '{"id": "c", "event": "chunk", "chunk": {"index": 3, "count": 4}, "data": ""}'
        )
        assert (await p.recv())["error"]["code"] == "invalid_envelope"
        reply = await p.call("conversations.list", {"limit": "many"})
        assert reply["error"]["code"] == "validation_error"
        assert (await p.call("no.such"))["error"]["code"] == "unknown_method"
        assert (await p.result("system.health"))["status"] in ("ok", "starting")


async def test_a_peer_that_vanishes_is_cleaned_up(http: aiohttp.ClientSession, server: str) -> None:
    gone = await connect(http, server)
    await gone.result("system.health")
    await gone.pc.close()  # the page is closed: no DELETE
    deadline = time.monotonic() + 30
    while await sessions(http, server):
        assert time.monotonic() < deadline, "the vanished peer's session is still listed"
        await asyncio.sleep(0.1)


async def test_signaling_bounds_and_errors(make_client: ClientFactory) -> None:
    client = await make_client(mode="web", webrtc_max_sessions=1)
    server = str(client.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server}/v1/webrtc/offer", json={"sdp": "v=0\r\nnonsense"}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "invalid_sdp"
        async with http.post(f"{server}/v1/webrtc/offer", json={"sdp": "x" * 100_001}) as r:
            assert r.status == 422
        async with http.post(
            f"{server}/v1/webrtc/sessions/nope/candidates", json={"candidate": ""}
        ) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "session_not_found"
        async with peer(http, server):
            with pytest.raises(AssertionError, match="too_many_sessions"):
                await connect(http, server)
        assert await sessions(http, server) == []  # the refused offer left nothing behind


async def test_each_mode_serves_its_own_routes(make_client: ClientFactory) -> None:
    webrtc_only = await make_client(mode="webrtc", memory=False)
    assert (await webrtc_only.get("/v1/webrtc/sessions")).status == 200
    assert (await webrtc_only.get("/v1/health")).status == 200
    assert (await webrtc_only.get("/v1/system")).status == 404
    page = await webrtc_only.get("/")  # the page that speaks WebRTC
    assert page.status == 200
    assert "text/html" in page.headers["Content-Type"]
    assert (await webrtc_only.get("/api-doc")).status == 404  # docs belong to the HTTP API
    http_only = await make_client(mode="http", memory=False)
    assert (await http_only.get("/v1/system")).status == 200
    refused = await http_only.post("/v1/webrtc/offer", json={"sdp": "v=0"})
    assert refused.status == 503  # not a 404 or 405: the page knows to fall back to HTTP
    body = await refused.json()
    assert body["error"]["code"] == "webrtc_disabled"
    assert "--mode web" in body["error"]["message"]


@pytest.fixture(scope="module")
def worker_server() -> Iterator[str]:
    """The installed server with its ML worker (SmolLM2, face detection)."""
    with running_server(("--mode", "web")) as srv:
        yield srv.base_url


@pytest.fixture(scope="module")
def astronaut() -> npt.NDArray[np.uint8]:
    image: npt.NDArray[np.uint8] = skdata.astronaut()  # a real photograph, 512 x 512
    return image


async def test_streamed_chat_and_cancel_over_the_data_channel(
    http: aiohttp.ClientSession, worker_server: str
) -> None:
    async with peer(http, worker_server) as p:
        params = {"messages": [{"role": "user", "content": "Name three colours."}],
                      "max_tokens": 24, "temperature": 0}  # fmt: skip
        p.send({"id": "chat", "method": "chat.complete", "params": params})
        events = [e async for e in p.events("chat", within=120)]
        deltas = [e for e in events if e["event"] == "delta"]
        assert len(deltas) >= 2
        assert events[-1]["event"] == "done"
        assert "".join(d["data"]["text"] for d in deltas).strip()

        long = {"messages": [{"role": "user", "content": "Write a very long epic poem."}],
                    "max_tokens": 3000}  # fmt: skip
        p.send({"id": "long", "method": "chat.complete", "params": long})
        stream = p.events("long")
        for _ in range(3):
            assert (await anext(stream))["event"] == "delta"
        p.send({"id": "stop", "method": "session.cancel", "params": {"id": "long"}})
        rest = [e async for e in stream]
        assert rest[-1]["error"]["code"] == "cancelled"
        assert len(rest) < 50
        reply = await asyncio.wait_for(
            p.result("chat.complete", {**params, "max_tokens": 3}), timeout=20
        )
        assert reply["finish_reason"] in ("length", "stop")


def assert_the_astronauts_face(event: dict[str, Any]) -> None:
    data = event["data"]
    assert (data["width"], data["height"]) == (512, 512)
    (face,) = data["faces"]
    for got, want in zip(face["box"], FACE_BOX, strict=True):
        assert got == pytest.approx(want, abs=0.05), face["box"]  # VP8 blurs it a little
    assert face["score"] > 0.7
    assert {k["name"] for k in face["keypoints"]} >= {"left_eye", "right_eye", "nose_tip"}


async def test_a_video_track_of_a_real_face_gets_detections_and_drops_frames_under_load(
    http: aiohttp.ClientSession, worker_server: str, astronaut: npt.NDArray[np.uint8]
) -> None:
    camera = PhotoTrack(astronaut)
    async with peer(http, worker_server, video=camera) as p:
        p.send({"id": "v", "method": "video.faces", "params": {"fps": 4}})
        stream = p.events("v", within=60)
        events = [await anext(stream) for _ in range(6)]
        assert [e["event"] for e in events] == ["faces"] * 6
        for event in events:
            assert_the_astronauts_face(event)
        frames = [e["data"]["frame"] for e in events]
        assert frames == sorted(set(frames))  # always a newer frame
        last = events[-1]["data"]
        assert last["analyzed"] == 6
        # 30 frames/s in, 4/s analysed: the rest were dropped, not queued
        assert last["dropped"] >= 2 * last["analyzed"]
        assert last["received"] >= last["analyzed"] + last["dropped"] - 1
        assert 0 < last["latency_ms"] < 5000
        (listed,) = await sessions(http, worker_server)
        assert listed["video_tracks"] == 1
        assert listed["video_frames"] >= last["received"]

        p.send({"id": "stop", "method": "session.cancel", "params": {"id": "v"}})
        rest = [e async for e in stream]
        assert rest[-1]["error"]["code"] == "cancelled"
        # the channel serves on, and a new request with another rate works
        p.send({"id": "v2", "method": "video.faces", "params": {"fps": 10, "max_side": 256}})
        second = p.events("v2", within=60)
        assert_the_astronauts_face(await anext(second))
        # the page stops its camera: the request ends with a summary
        (sender,) = p.pc.getSenders()
        await sender.stop()
        end = [e async for e in second][-1]
        assert end["event"] == "done"
        assert end["data"]["analyzed"] >= 1


async def test_an_unread_video_track_does_not_pile_up_frames(
    http: aiohttp.ClientSession, worker_server: str, astronaut: npt.NDArray[np.uint8]
) -> None:
    """aiortc queues decoded frames until someone reads them: the server reads every track."""
    camera = PhotoTrack(astronaut)
    async with peer(http, worker_server, video=camera):
        deadline = time.monotonic() + 30
        while camera.sent < 60:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        (listed,) = await sessions(http, worker_server)
        # nothing asked for detections, yet the frames were taken off aiortc's queue
        assert listed["video_frames"] >= 30


async def test_video_faces_needs_a_video_track_and_checks_its_parameters(
    http: aiohttp.ClientSession, worker_server: str
) -> None:
    async with peer(http, worker_server) as p:
        assert (await p.call("video.faces"))["error"]["code"] == "no_video_track"
        assert (await p.call("video.faces", {"fps": 100}))["error"]["param"] == "fps"
        assert (await p.call("video.faces", {"max_side": 8}))["error"]["param"] == "max_side"
        assert (await p.result("system.health"))["status"] == "ok"  # the channel stays up
