"""Memory through the real server: chat that remembers, conversation and memory routes,
backup over HTTP and restore with the CLI. Real worker, real SmolLM2 and MiniLM."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tabagent.config import Settings
from tests.conftest import ClientFactory
from tests.helpers import SERVER_BIN, RunningServer, http_get, post_json, running_server

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer concisely."}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def env(home: Path) -> dict[str, str]:
    return {
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_STATE_HOME": str(home / "state"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_RUNTIME_DIR": str(home),
        "TABAGENT_N_CTX": "1024",  # small, so a long conversation must be summarised
    }


@pytest.fixture(scope="module")
def server(env: dict[str, str], home: Path) -> Iterator[RunningServer]:
    with running_server(("--mode", "http"), env=env, log_dir=home) as srv:
        yield srv


@pytest.fixture
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def chat(client: openai.OpenAI, conversation: str, *messages: dict[str, str], **kw: Any) -> Any:
    return client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[SYSTEM, *messages],  # type: ignore[list-item]
        temperature=0,
        max_tokens=kw.pop("max_tokens", 40),
        extra_body={"conversation_id": conversation},
        **kw,
    )


def get_json(url: str) -> tuple[int, Any]:
    status, body = http_get(url)
    return status, json.loads(body)


def test_chat_remembers_a_fact_from_an_earlier_conversation(
    client: openai.OpenAI, server: RunningServer
) -> None:
    first = chat(client, "conv_pets", {"role": "user", "content": "My dog's name is Rex."})
    stored = first.model_extra["tabagent"]["memory"]["stored_message_ids"]
    assert len(stored) == 2  # the user's turn and the answer

    reply = chat(client, "conv_later", {"role": "user", "content": "What is my dog's name?"})
    used = reply.model_extra["tabagent"]["memory"]["memories"]
    assert any("Rex" in m["text"] for m in used), used
    assert "Rex" in (reply.choices[0].message.content or "")

    # the rules weaver turned the statement into knowledge
    status, entities = get_json(f"{server.base_url}/v1/memory/knowledge/entities?query=Rex")
    assert status == 200
    rex = next(e for e in entities["data"] if e["name"] == "Rex")
    status, graph = get_json(f"{server.base_url}/v1/memory/knowledge/entities/{rex['id']}/graph")
    assert status == 200
    assert any(r["relation"] == "has_dog" for r in graph["relations"])


def test_full_history_and_new_turn_only_store_each_turn_once(
    client: openai.OpenAI, server: RunningServer
) -> None:
    q1 = {"role": "user", "content": "Let's plan a trip to Lisbon."}
    a1 = chat(client, "conv_trip", q1).choices[0].message.content
    q2 = {"role": "user", "content": "What should I pack?"}
    # an OpenAI-style client resends everything ...
    chat(client, "conv_trip", q1, {"role": "assistant", "content": a1}, q2)
    # ... a memory-aware one sends only the new turn (via the header this time)
    q3 = {"role": "user", "content": "And how long is the flight?"}
    client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[q3], temperature=0, max_tokens=20,  # type: ignore[list-item]
        extra_headers={"X-Conversation-Id": "conv_trip"},
    )  # fmt: skip
    status, msgs = get_json(f"{server.base_url}/v1/conversations/conv_trip/messages")
    assert status == 200
    roles = [m["role"] for m in msgs["data"]]
    users = [m["content"] for m in msgs["data"] if m["role"] == "user"]
    assert users == [q1["content"], q2["content"], q3["content"]]
    assert roles == ["user", "assistant"] * 3


def test_a_long_conversation_is_folded_into_a_stored_summary(
    client: openai.OpenAI, server: RunningServer
) -> None:
    filler = " ".join(f"Item {i} on my list is a {w}." for i, w in enumerate(["lamp"] * 60))
    turns = []
    for i in range(4):
        turns += [
            {"role": "user", "content": f"Part {i}: {filler}"},
            {"role": "assistant", "content": f"Noted part {i}."},
        ]
    reply = chat(client, "conv_long", *turns, {"role": "user", "content": "Summarise my list."})
    memory = reply.model_extra["tabagent"]["memory"]
    assert memory["summarized_turns"] > 0
    assert reply.usage is not None
    assert reply.usage.prompt_tokens < 1024
    status, hits = post_json(
        f"{server.base_url}/v1/memory/search",
        {"query": "lamp list", "sources": ["summaries"], "mode": "keyword"},
    )
    assert status == 200
    assert any(h["conversation_id"] == "conv_long" for h in hits["data"])


def test_conversation_and_memory_routes_with_bad_input(server: RunningServer) -> None:
    base = server.base_url
    status, conv = post_json(f"{base}/v1/conversations", {"title": "notes", "tags": ["work"]})
    assert status == 201
    status, added = post_json(
        f"{base}/v1/conversations/{conv['id']}/messages",
        {"messages": [{"role": "user", "content": "The wifi password is hunter2."}]},
    )
    assert status == 201
    assert added["data"][0]["embedded"] is True
    status, found = post_json(f"{base}/v1/memory/search", {"query": "wifi password", "k": 3})
    assert status == 200
    assert found["data"][0]["text"] == "The wifi password is hunter2."
    status, listed = get_json(f"{base}/v1/conversations?tag=work")
    assert [c["id"] for c in listed["data"]] == [conv["id"]]

    assert post_json(f"{base}/v1/memory/search", {"query": ""})[0] == 422
    assert post_json(f"{base}/v1/memory/search", {"query": "x", "k": 100000})[0] == 422
    bad = post_json(f"{base}/v1/conversations", {"id": "../../etc"})
    assert bad[0] == 422
    missing = get_json(f"{base}/v1/conversations/conv_nope")
    assert missing[0] == 404
    assert missing[1]["error"]["code"] == "conversation_not_found"
    status, _ = post_json(
        f"{base}/v1/conversations/conv_nope/messages",
        {"messages": [{"role": "user", "content": "x"}]},
    )
    assert status == 404
    status, err = post_json(
        f"{base}/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "conversation_id": "bad id!"},
    )
    assert status == 422
    assert err["error"]["param"] == "conversation_id"


def test_backup_over_http_restores_with_the_cli(
    server: RunningServer, env: dict[str, str], tmp_path: Path
) -> None:
    base = server.base_url
    status, conv = post_json(f"{base}/v1/conversations", {"title": "to keep"})
    post_json(
        f"{base}/v1/conversations/{conv['id']}/messages",
        {"messages": [{"role": "user", "content": "Remember: the boat is blue."}]},
    )
    target = tmp_path / "memory.tar"
    status, info = post_json(f"{base}/v1/memory/backup", {"path": str(target)})
    assert status == 200, info
    assert info["files"] >= 6
    assert target.is_file()
    status, _ = post_json(f"{base}/v1/memory/backup", {"path": str(target)})
    assert status == 409  # never overwrites

    # restore into another data folder with the CLI, then inspect it
    restored_env = {**env, "TABAGENT_DB_PATH": str(tmp_path / "restored_db")}
    run = subprocess.run(
        [SERVER_BIN, "db", "restore", str(target)], env={**restored_env, "PATH": "/usr/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    stats = subprocess.run(
        [SERVER_BIN, "db", "stats", "--json"], env={**restored_env, "PATH": "/usr/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert stats.returncode == 0, stats.stderr
    data = json.loads(stats.stdout)
    assert data["conversations"]["messages"] >= 1
    assert data["embeddings"]["vectors"] >= 1
    # the running server holds its own databases: the CLI says so instead of opening them
    busy = subprocess.run(
        [SERVER_BIN, "db", "stats"], env={**env, "PATH": "/usr/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert busy.returncode == 1
    assert "in use" in busy.stderr


def test_remember_extracts_knowledge_through_the_chat_model_or_the_rules(
    server: RunningServer,
) -> None:
    status, out = post_json(
        f"{server.base_url}/v1/memory/remember",
        {"text": "I live in Porto and I work at Acme.", "use_llm": True, "provenance": "user"},
    )
    assert status == 200, out
    assert out["method"] in ("llm", "rules")  # the 135M model's JSON is often unusable
    names = {e["name"] for e in out["entities"]}
    assert {"Porto", "Acme"} <= names
    relations = {r["relation"] for r in out["relations"]}
    assert {"lives_in", "works_at"} <= relations
    assert out["facts"]
    assert post_json(f"{server.base_url}/v1/memory/remember", {"text": ""})[0] == 422


async def test_a_vector_store_that_cannot_open_degrades_memory_with_clear_errors(
    make_client: ClientFactory, settings: Settings
) -> None:
    """The server opens LanceDB after it starts answering: when that fails, health says memory is
    degraded and why, conversations still take messages, and search answers 503 in JSON."""
    (settings.db_path / "embeddings").mkdir(parents=True)
    (settings.db_path / "embeddings" / "lance").write_text("not a folder")
    client = await make_client()
    for _ in range(300):
        health = await (await client.get("/v1/health")).json()
        if health["components"]["memory"]["state"] != "ok":
            break
        await asyncio.sleep(0.1)
    memory = health["components"]["memory"]
    assert (health["status"], memory["state"]) == ("degraded", "degraded")
    assert "vector index could not be opened" in memory["detail"]

    created = await client.post("/v1/conversations", json={"title": "notes"})
    assert created.status == 201
    conv = (await created.json())["id"]
    added = await client.post(
        f"/v1/conversations/{conv}/messages",
        json={"messages": [{"role": "user", "content": "The wifi password is hunter2."}]},
    )
    assert added.status == 201
    found = await client.post("/v1/memory/search", json={"query": "wifi password"})
    assert found.status == 503
    assert (await found.json())["error"]["code"] == "vectors_unavailable"
