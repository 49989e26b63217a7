"""The installed command as Chrome starts it, speaking frames over real pipes: in-process, as a
relay to a running server, and two browser profiles at once."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path

import pytest

from tabagent.config import resolve
from tabagent.discovery import RUN_FILE, find
from tabagent.native_messaging.codec import MAX_OUTGOING, dumps, frame
from tabagent.storage.lock import DatabaseLock
from tests.helpers import http_get, running_server
from tests.native_host import native_host, start_host

NO_ML = {"TABAGENT_ML_WORKER": "false"}


async def test_hello_and_health_in_process() -> None:
    async with native_host(NO_ML) as host:
        hello = await host.result("session.hello")
        assert hello["protocol"] == 1
        assert hello["mode"] == "in-process"
        health = await host.result("system.health")
        assert health["status"] == "ok"
        assert health["components"]["memory"]["state"] == "ok"
        await host.close_stdin()
        assert await host.wait() == 0  # EOF on stdin: a clean exit
    # stdout carried frames and nothing else: every byte is accounted for by a frame
    assert all(len(f) == 4 + struct.unpack("=I", f[:4])[0] for f in host.raw_frames)
    assert "serving native messaging" in host.stderr()


async def test_bad_frames_get_stable_error_codes_and_the_host_keeps_serving() -> None:
    async with native_host(NO_ML) as host:
        cases = [
            (frame(b"{not json"), None, "invalid_json"),
            (frame(b'\xff{"id": 1}'), None, "invalid_utf8"),
            (frame(b"[1, 2]"), None, "invalid_envelope"),
            (frame(dumps({"id": "a", "params": {}}).encode()), "a", "invalid_envelope"),
            (frame(dumps({"id": "b", "method": "no.such"}).encode()), "b", "unknown_method"),
            (
                frame(dumps({"id": "c", "method": "conversations.list",
                             "params": {"limit": -1}}).encode()),
                "c", "validation_error",
            ),
            (frame(dumps({"id": "d", "method": "conversations.get",
                          "params": {"id": "conv_none"}}).encode()), "d", "conversation_not_found"),
            (frame(dumps({"id": "x" * 500, "method": "system.health"}).encode()), None,
             "invalid_envelope"),
        ]  # fmt: skip
        for wire, expected_id, code in cases:
            await host.send_raw(wire)
            reply = await host.recv()
            assert reply["event"] == "error", reply
            assert (reply["id"], reply["error"]["code"]) == (expected_id, code), reply
            assert reply["error"]["message"]
        # after all that, the stream is still in sync
        assert (await host.result("system.health"))["status"] == "ok"


async def test_message_over_the_limit_is_refused_and_the_next_one_served() -> None:
    async with native_host({**NO_ML, "TABAGENT_MAX_BODY_BYTES": "4096"}) as host:
        big = {"id": "big", "method": "conversations.create", "params": {"title": "x" * 10_000}}
        await host.send(big)
        reply = await host.recv()
        assert reply["id"] is None
        assert reply["error"]["code"] == "message_too_large"
        assert (await host.result("system.health"))["status"] == "ok"


async def test_a_body_limit_above_what_chrome_sends_is_capped_not_fatal() -> None:
    async with native_host({**NO_ML, "TABAGENT_MAX_BODY_BYTES": str(512 << 20)}) as host:
        assert (await host.result("system.health"))["status"] == "ok"


async def test_absurd_length_header_ends_the_host_cleanly() -> None:
    async with native_host(NO_ML) as host:
        await host.result("session.hello")
        await host.send_raw(struct.pack("=I", 0xFFFF_FFFF) + b"junk")
        reply = await host.recv()
        assert reply["error"]["code"] == "frame_too_large"
        assert await host.wait() == 0  # it did not wait for four gigabytes


async def test_answers_larger_than_one_mib_arrive_in_chunks() -> None:
    text = "Grüße, 世界! " * 15_000  # 180,000 characters (the per-message bound is 200,000)
    async with native_host(NO_ML) as host:
        conv = await host.result("conversations.create", {"title": "big"})
        await host.result(
            "conversations.append",
            {"id": conv["id"], "messages": [{"role": "user", "content": text}] * 6},
        )
        frames_before = len(host.raw_frames)
        listed = await host.result("conversations.messages", {"id": conv["id"]})
        assert [m["content"] for m in listed["data"]] == [text] * 6  # ~1.4 MB of UTF-8
        frames = host.raw_frames[frames_before:]
        assert len(frames) >= 2  # it did not fit one frame
        assert all(len(f) - 4 <= MAX_OUTGOING for f in frames)
        assert json.loads(frames[0][4:])["event"] == "chunk"


async def test_requests_run_concurrently_and_duplicate_ids_are_refused() -> None:
    async with native_host(NO_ML) as host:
        await host.result("session.hello")
        for n in range(20):
            await host.send(
                {"id": n, "method": "conversations.create", "params": {"title": str(n)}}
            )
        await host.send({"id": "same", "method": "system.health"})
        await host.send({"id": "same", "method": "system.health"})
        replies = [await host.recv() for _ in range(22)]
        titles = sorted(int(r["data"]["title"]) for r in replies if isinstance(r["id"], int))
        assert titles == list(range(20))
        same = [r for r in replies if r["id"] == "same"]
        assert sorted(r["event"] for r in same) == ["done", "error"]
        assert next(r for r in same if r["event"] == "error")["error"]["code"] == "duplicate_id"


async def test_streamed_chat_on_the_default_model_and_cancel_mid_stream() -> None:
    async with native_host() as host:  # the real ML worker and SmolLM2
        params = {"messages": [{"role": "user", "content": "Name three colours."}],
                  "max_tokens": 24, "temperature": 0}  # fmt: skip
        await host.send({"id": "chat", "method": "chat.complete", "params": params})
        events = [e async for e in host.events("chat", within=120)]
        deltas = [e for e in events if e["event"] == "delta"]
        assert len(deltas) >= 2  # one message per delta
        assert events[-1]["event"] == "done"
        assert events[-1]["data"]["usage"]["completion_tokens"] >= len(deltas)
        assert "".join(d["data"]["text"] for d in deltas).strip()

        long = {"messages": [{"role": "user", "content": "Write a very long epic poem."}],
                "max_tokens": 3000}  # fmt: skip
        await host.send({"id": "long", "method": "chat.complete", "params": long})
        stream = host.events("long")
        for _ in range(3):
            assert (await anext(stream))["event"] == "delta"
        await host.send({"id": "stop", "method": "session.cancel", "params": {"id": "long"}})
        rest = [e async for e in stream]
        assert rest[-1]["event"] == "error"
        assert rest[-1]["error"]["code"] == "cancelled"
        assert len(rest) < 50  # stopped within a few tokens, not 3,000
        assert (await anext(host.events("stop")))["data"] == {"cancelled": True}
        # the slot is free: a new chat is answered at once
        reply = await asyncio.wait_for(
            host.result("chat.complete", {**params, "max_tokens": 3}), timeout=20
        )
        assert reply["finish_reason"] in ("length", "stop")


async def test_relays_to_a_running_server_instead_of_opening_the_databases() -> None:
    with running_server(("--mode", "web"), env=NO_ML) as server:
        published = find(resolve({})[0].run_dir)
        assert published is not None
        assert published.url == server.base_url
        async with native_host(NO_ML) as host:
            hello = await host.result("session.hello")
            assert hello["mode"] == "proxy"
            assert hello["pid"] == server.proc.pid
            conv = await host.result("conversations.create", {"title": "via the extension"})
            # the server's own database has it: the host relayed, it did not open a second copy
            status, body = http_get(f"{server.base_url}/v1/conversations/{conv['id']}")
            assert status == 200
            assert json.loads(body)["title"] == "via the extension"
            reply = await host.call("no.such")
            assert reply["error"]["code"] == "unknown_method"  # answered by the server
            await host.send_raw(frame(b"{oops"))
            assert (await host.recv())["error"]["code"] == "invalid_json"  # by the host itself
            await host.close_stdin()
            assert await host.wait() == 0
        assert "proxying" in host.stderr()


async def test_two_browser_profiles_at_once_share_one_server() -> None:
    async with native_host(NO_ML) as first:
        assert (await first.result("session.hello"))["mode"] == "in-process"
        await first.result("system.health")  # up: published in the run directory
        async with native_host(NO_ML) as second:
            assert (await second.result("session.hello"))["mode"] == "proxy"
            conv = await second.result("conversations.create", {"title": "from profile two"})
            seen = await first.result("conversations.get", {"id": conv["id"]})
            assert seen["title"] == "from profile two"
            # the first browser closes: the second host says so and exits (the extension
            # reconnects, and the new host serves in-process)
            await first.close_stdin()
            assert await first.wait() == 0
            gone = await second.recv()
            assert gone["id"] is None
            assert gone["error"]["code"] == "server_gone"
            assert await second.wait() == 1


async def test_a_stale_run_file_is_ignored() -> None:
    run_dir = resolve({})[0].run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_FILE).write_text(
        json.dumps(
            {"url": "http://127.0.0.1:9", "token": "t", "pid": 1, "version": "0", "mode": "x"}
        )
    )
    async with native_host(NO_ML) as host:
        assert (await host.result("session.hello"))["mode"] == "in-process"


async def test_databases_held_elsewhere_are_reported_to_the_browser() -> None:
    """Another process holds the databases but published no server: every request says why,
    the hello still answers (so the extension can show it), and the host exits non-zero."""
    lock = DatabaseLock(resolve({})[0].db_path)
    assert lock.acquire()
    try:
        async with native_host(NO_ML) as host:
            hello = await host.result("session.hello")
            reply = await host.call("system.health")
            assert reply["error"]["code"] == "startup_failed"
            assert "in use" in reply["error"]["message"]
            assert "error" in hello or not hello["ready"]
            await host.close_stdin()
            assert await host.wait() == 1
    finally:
        lock.release()


async def test_frames_from_a_regular_file_are_served_too(tmp_path: Path) -> None:
    """Not every stdin is a pipe (Windows, a file): the threaded reader serves it the same."""
    script = tmp_path / "frames.bin"
    script.write_bytes(
        frame(dumps({"id": 1, "method": "session.hello"}).encode())
        + frame(b"nonsense")
        + frame(dumps({"id": 2, "method": "system.health"}).encode())
    )
    with script.open("rb") as stdin:
        host = await start_host(NO_ML, stdin=stdin)
        replies = [await host.recv() for _ in range(3)]
        assert await host.wait() == 0
    by_id = {json.dumps(r["id"]): r for r in replies}
    assert by_id["1"]["event"] == "done"
    assert by_id["null"]["error"]["code"] == "invalid_json"
    assert by_id["2"]["event"] == "done"


async def test_models_embeddings_and_memory_through_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operations the extension needs besides chat, through the same registry as HTTP:
    pull (progress events, from a local server speaking the Hub's protocol), list, load,
    embeddings, memory search."""
    from ml_service.backends.llama import smollm2_path
    from tests.fakehub import FakeHub

    gguf = await asyncio.to_thread(Path(smollm2_path()).read_bytes)
    async with FakeHub() as hub:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        hub.add_repo(
            "test-org/SmolLM2-135M-Instruct-GGUF", {"SmolLM2-135M-Instruct.Q4_1.gguf": gguf}
        )
        ref = "test-org/SmolLM2-135M-Instruct-GGUF:Q4_1"
        env = {"HF_ENDPOINT": hub.endpoint, "TABAGENT_MODEL_CACHE_PATH": str(tmp_path / "cache")}
        async with native_host(env) as host:
            await host.send({"id": "pull", "method": "models.pull", "params": {"model": ref}})
            events = [e async for e in host.events("pull", within=120)]
            assert events[0]["event"] == "progress"
            assert events[-1]["event"] == "done"
            assert events[-1]["data"]["model"]["id"] == ref
            assert events[-2]["data"]["total"] == len(gguf)

            listed = await host.result("models.list")
            kinds = {m["id"]: m["kind"] for m in listed["data"]}
            assert kinds[ref] == "chat"
            assert kinds["all-minilm-l6-v2"] == "embedding"
            await host.result("models.load", {"model": ref})
            assert next(m for m in (await host.result("models.list"))["data"] if m["id"] == ref)[
                "loaded"
            ]

            vectors = await host.result("embeddings.create", {"input": ["otters", "beavers"]})
            assert len(vectors["data"]) == 2
            assert len(vectors["data"][0]["embedding"]) == 384

            conv = await host.result("conversations.create", {"title": "pets"})
            await host.result(
                "conversations.append",
                {"id": conv["id"], "messages": [{"role": "user", "content": "My otter is Rex"}]},
            )
            found = await host.result("memory.search", {"query": "what is my otter called"})
            assert any("Rex" in hit["text"] for hit in found["data"]), found

            bad = await host.call("models.pull", {"model": "../etc/passwd"})
            assert bad["error"]["code"] == "bad_model_ref"


async def test_a_server_started_beside_the_browser_host_says_who_holds_the_databases() -> None:
    from tests.helpers import SERVER_BIN, free_port

    async with native_host(NO_ML) as host:
        hello = await host.result("session.hello")
        await host.result("system.health")  # ready: the databases are open
        proc = await asyncio.create_subprocess_exec(
            SERVER_BIN, "--mode", "http", "--port", str(free_port()),
            env={**os.environ, **NO_ML},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1
        message = stderr.decode()
        assert "in use" in message
        assert f"browser host, pid {hello['pid']}" in message
        assert "side panel" in message
