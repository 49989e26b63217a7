"""Inference through the real server, its real worker process and the real SmolLM2 model,
driven by the official ``openai`` client as any user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.helpers import RunningServer, http_post, post_json, running_server

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer concisely."}
FRANCE = {"role": "user", "content": "What is the capital of France?"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("home")
    env = {
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_STATE_HOME": str(home / "state"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_RUNTIME_DIR": str(home),
        "TABAGENT_MAX_QUEUE": "1",
    }
    with running_server(("--mode", "http"), env=env, log_dir=home) as srv:
        yield srv


@pytest.fixture
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def worker_pid(server: RunningServer) -> int:
    with urllib.request.urlopen(f"{server.base_url}/v1/health", timeout=5) as response:
        detail = json.load(response)["components"]["ml_worker"]["detail"]
    return int(detail.split()[-1])


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_chat_answers_the_capital_of_france(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[SYSTEM, FRANCE], temperature=0, max_tokens=30
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 10
    assert reply.usage.completion_tokens > 0


def test_chat_streams_deltas_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[SYSTEM, FRANCE],
        temperature=0,
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    # the first text at once, then at most one delta per --stream-interval-ms
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_same_seed_and_temperature_zero_give_the_same_text(client: openai.OpenAI) -> None:
    def ask() -> str:
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "Write a sentence about the sea."}],
            temperature=0,
            seed=7,
            max_tokens=20,
        )
        return reply.choices[0].message.content or ""

    assert ask() == ask()


def test_max_tokens_stops_with_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Count from one to one hundred."}],
        max_tokens=5,
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens <= 6


def test_legacy_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="smollm2-135m-instruct",
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
    )
    assert reply.object == "text_completion"
    assert reply.choices[0].text.strip()
    streamed = client.completions.create(
        model="smollm2-135m-instruct",
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_stop_sequence_ends_generation(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[SYSTEM, FRANCE], temperature=0, stop=["Paris"]
    )
    assert "Paris" not in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"


def test_model_list_and_details(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert "smollm2-135m-instruct" in models
    model = client.models.retrieve("smollm2-135m-instruct")
    assert model.owned_by == "HuggingFaceTB"
    assert (model.model_extra or {})["kind"] == "chat"


def test_unknown_model_is_a_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert excinfo.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_invalid_parameters_are_422_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as excinfo:
        client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "hi"}],
            temperature=5,
        )
    body = excinfo.value.body
    assert isinstance(body, dict)
    assert body["param"] == "temperature"


def test_tokenize_and_detokenize_round_trip(server: RunningServer) -> None:
    status, tokens = post_json(
        f"{server.base_url}/v1/tokenize", {"text": "Hello, world", "add_special": False}
    )
    assert status == 200
    assert tokens["count"] == len(tokens["tokens"])
    status, text = post_json(f"{server.base_url}/v1/detokenize", {"tokens": tokens["tokens"]})
    assert status == 200
    assert text["text"] == "Hello, world"


def test_full_queue_answers_429_with_retry_after(server: RunningServer) -> None:
    """TABAGENT_MAX_QUEUE=1: one request runs, one waits, the third is refused at once."""
    import concurrent.futures

    long_chat = {"model": "smollm2-135m-instruct", "max_tokens": 200,
                 "messages": [{"role": "user", "content": "Tell me a long story."}]}  # fmt: skip

    def send() -> tuple[int, dict[str, str]]:
        url = f"{server.base_url}/v1/chat/completions"
        status, headers, _ = http_post(url, json.dumps(long_chat).encode(), timeout=120)
        return status, headers

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: send(), range(4)))
    refused = [headers for status, headers in results if status == 429]
    assert refused, results
    assert all(int(h["Retry-After"]) >= 1 for h in refused)
    assert any(status == 200 for status, _ in results)


def test_worker_killed_mid_stream_errors_then_recovers(
    client: openai.OpenAI, server: RunningServer
) -> None:
    old = worker_pid(server)
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Tell me a very long story about dragons."}],
        max_tokens=400,
        stream=True,
    )

    def read_and_kill_worker() -> None:
        for i, _chunk in enumerate(stream):
            if i == 3:
                os.kill(old, signal.SIGKILL)

    with stream, pytest.raises(openai.APIError) as excinfo:
        read_and_kill_worker()
    assert "worker" in str(excinfo.value.message)
    deadline = time.monotonic() + 30
    reply, statuses = None, []
    while reply is None and time.monotonic() < deadline:
        try:
            reply = client.chat.completions.create(
                model="smollm2-135m-instruct",
                messages=[SYSTEM, FRANCE],
                temperature=0,
                max_tokens=20,
            )
        except openai.APIStatusError as exc:
            statuses.append(exc.status_code)
            time.sleep(0.2)
    assert set(statuses) <= {503}  # while the worker restarts: 503, never another error
    assert reply is not None
    assert "Paris" in (reply.choices[0].message.content or "")
    assert worker_pid(server) != old
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert "tabagent_ml_worker_restarts_total 1.0" in metrics
    assert "tabagent_ttft_seconds_count" in metrics


def _streamed_texts(base_url: str) -> list[str]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as c:
        stream = c.completions.create(
            model="smollm2-135m-instruct",
            prompt="Once upon a time",
            temperature=0,
            max_tokens=16,
            stream=True,
        )
        return [
            chunk.choices[0].text for chunk in stream if chunk.choices and chunk.choices[0].text
        ]


def test_stream_interval_setting_joins_tokens(server: RunningServer, tmp_path: Path) -> None:
    default = _streamed_texts(server.base_url)  # every 40 ms at most
    with running_server(
        ("--mode", "http", "--stream-interval-ms", "1000"), log_dir=tmp_path
    ) as joined_server:
        started = time.monotonic()
        joined = _streamed_texts(joined_server.base_url)
        elapsed = time.monotonic() - started
    # the first text at once, then at most one chunk a second, the last when generation ends
    # (two in all on an idle machine; a busy one may take more than a second for 16 tokens)
    assert 2 <= len(joined) <= 2 + int(elapsed)
    assert len(default) > 2
    assert "".join(joined) == "".join(default)


def test_stopping_the_server_leaves_no_worker(tmp_path: Path) -> None:
    with running_server(("--mode", "http"), log_dir=tmp_path) as server:
        with urllib.request.urlopen(f"{server.base_url}/v1/models", timeout=5) as response:
            assert response.status == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not children_of(server.proc.pid):
            time.sleep(0.05)
        workers = children_of(server.proc.pid)
        assert workers
        assert server.stop() == 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_worker_exits_when_the_server_is_killed(tmp_path: Path) -> None:
    with running_server(("--mode", "http"), log_dir=tmp_path) as server:
        pid = worker_pid_when_ready(server)
        server.proc.kill()  # kill -9: no chance to clean up
        server.proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the worker outlived its server")


def worker_pid_when_ready(server: RunningServer) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{server.base_url}/v1/health", timeout=5) as response:
            component = json.load(response)["components"]["ml_worker"]
        if component["state"] == "ok":
            return int(component["detail"].split()[-1])
        time.sleep(0.05)
    raise TimeoutError("worker never became ready")


def test_client_disconnect_stops_generation(server: RunningServer, client: openai.OpenAI) -> None:
    """Close the connection mid-stream: the worker stops, so the next request runs at once."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"model": "smollm2-135m-instruct", "stream": True, "max_tokens": 3000,
            "messages": [{"role": "user", "content": "Write a very long epic poem."}]}  # fmt: skip
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body))
    response = conn.getresponse()
    assert response.status == 200
    data_lines = 0
    while data_lines < 3:
        if response.fp.readline().startswith(b"data: "):
            data_lines += 1
    response.close()
    conn.close()
    start = time.monotonic()
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
    )
    assert reply.choices[0].finish_reason in ("length", "stop")
    # 3,000 tokens at ~70 tokens/s would hold the model's slot for ~40 s
    assert time.monotonic() - start < 10


def test_embeddings_are_semantic(client: openai.OpenAI) -> None:
    texts = ["My dog's name is Rex", "What is my dog called?", "The stock market fell today"]
    reply = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    assert reply.model == "all-minilm-l6-v2"
    assert [d.index for d in reply.data] == [0, 1, 2]
    vectors = [d.embedding for d in reply.data]
    assert all(len(v) == 384 for v in vectors)

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))  # unit vectors

    assert abs(cosine(vectors[0], vectors[0]) - 1) < 1e-4
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    assert reply.usage.prompt_tokens > len(texts) * 3


def test_embeddings_base64_matches_float_and_default_model(client: openai.OpenAI) -> None:
    import base64
    import struct

    as_float = client.embeddings.create(model="all-minilm-l6-v2", input="hello world")
    raw = client.embeddings.with_raw_response.create(
        model="all-minilm-l6-v2", input="hello world", encoding_format="base64"
    )
    encoded = json.loads(raw.http_response.text)["data"][0]["embedding"]
    decoded = struct.unpack("<384f", base64.b64decode(encoded))
    assert max(abs(a - b) for a, b in zip(decoded, as_float.data[0].embedding, strict=True)) < 1e-6
    default = client.embeddings.create(model="", input="hello world")  # no model: the default
    assert default.model == "all-minilm-l6-v2"


def test_embedding_input_bounds(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="all-minilm-l6-v2", input=[])
    with pytest.raises(openai.UnprocessableEntityError):
        client.embeddings.create(model="all-minilm-l6-v2", input="x" * 100_001)
    with pytest.raises(openai.NotFoundError):  # a chat model cannot embed
        client.embeddings.create(model="smollm2-135m-instruct", input="hi")


def _astronaut_png() -> bytes:
    import cv2
    from skimage import data

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    assert ok
    return encoded.tobytes()


def _post_faces(
    server: RunningServer, body: bytes, content_type: str
) -> tuple[int, dict[str, object]]:
    status, _, payload = http_post(f"{server.base_url}/v1/vision/faces", body, content_type)
    return status, dict(json.loads(payload))


def test_face_detection_finds_the_astronaut_as_base64_json(server: RunningServer) -> None:
    import base64

    image = base64.b64encode(_astronaut_png()).decode()
    body = json.dumps({"image": f"data:image/png;base64,{image}"}).encode()
    status, result = _post_faces(server, body, "application/json")
    assert status == 200, result
    faces = result["faces"]
    assert isinstance(faces, list)
    assert len(faces) == 1
    x, y, width, _ = faces[0]["box"]  # the face is in the upper middle of the photograph
    assert 0.3 < x < 0.4
    assert 0.1 < y < 0.25
    assert 0.1 < width < 0.3
    assert faces[0]["score"] > 0.8
    assert {k["name"] for k in faces[0]["keypoints"]} >= {"left_eye", "right_eye", "nose_tip"}
    assert (result["width"], result["height"]) == (512, 512)


def test_face_detection_as_multipart_upload_and_blank_frame(server: RunningServer) -> None:
    import cv2
    import numpy as np

    def multipart(image: bytes, extra: dict[str, str]) -> tuple[bytes, str]:
        boundary = "tabagent-test-boundary"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in extra.items()
        ]
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
            + image
            + b"\r\n"
        )
        parts.append(f"--{boundary}--\r\n".encode())
        return b"".join(parts), f"multipart/form-data; boundary={boundary}"

    status, result = _post_faces(server, *multipart(_astronaut_png(), {"min_confidence": "0.6"}))
    assert status == 200, result
    assert len(result["faces"]) == 1  # type: ignore[arg-type]
    ok, blank = cv2.imencode(".png", np.zeros((240, 320, 3), np.uint8))
    assert ok
    status, result = _post_faces(server, *multipart(blank.tobytes(), {}))
    assert status == 200
    assert result["faces"] == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (json.dumps({"image": "not base64!"}), "bad_request"),
        (json.dumps({"image": "aGVsbG8gd29ybGQ="}), "bad_request"),  # valid base64, not an image
        (json.dumps({"image": "aGVsbG8=", "min_confidence": 2}), "validation_error"),
    ],
)
def test_face_detection_rejects_bad_images_clearly(
    server: RunningServer, body: str, code: str
) -> None:
    status, result = _post_faces(server, body.encode(), "application/json")
    assert status in (400, 422)
    assert result["error"]["code"] == code  # type: ignore[index]


def test_load_and_unload_models_on_request(server: RunningServer, client: openai.OpenAI) -> None:
    def post(path: str, payload: dict[str, object]) -> tuple[int, dict[str, object]]:
        return post_json(server.base_url + path, payload)

    status, card = post("/v1/models/load", {"model": "all-minilm-l6-v2", "keep_alive": "10m"})
    assert status == 200
    assert card["loaded"] is True
    assert card["embedding_dimensions"] == 384
    assert {m.id: m.model_extra["loaded"] for m in client.models.list()}["all-minilm-l6-v2"]
    assert post("/v1/models/unload", {"model": "all-minilm-l6-v2"}) == (
        200,
        {"model": "all-minilm-l6-v2", "unloaded": True},
    )
    assert not {m.id: m.model_extra["loaded"] for m in client.models.list()}["all-minilm-l6-v2"]
    assert post("/v1/models/unload", {"model": "all-minilm-l6-v2"})[1]["unloaded"] is False
    status, error = post("/v1/models/load", {"model": "nope"})
    assert status == 404
    assert error["error"]["code"] == "model_not_found"  # type: ignore[index]
    status, error = post("/v1/models/load", {"model": "all-minilm-l6-v2", "keep_alive": "soon"})
    assert status == 400
    assert error["error"]["param"] == "keep_alive"  # type: ignore[index]
