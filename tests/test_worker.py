"""The ML worker process on its own: gRPC contract, token, status codes, lifecycle."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ml_service.backends.llama import smollm2_path
from ml_service.lifecycle import REQUEST_ID_METADATA, TOKEN_ENV, TOKEN_METADATA
from ml_service.proto import ml_inference_pb2 as pb
from ml_service.proto import ml_inference_pb2_grpc as pb_grpc
from tests.helpers import SERVER_BIN

ROOT = Path(__file__).resolve().parent.parent


class Worker:
    def __init__(self, proc: subprocess.Popen[bytes], address: str, token: str, log_dir: Path):
        self.proc, self.address, self.token, self.log_dir = proc, address, token, log_dir
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.MLInferenceStub(self.channel)

    def md(self, request_id: str = "test") -> tuple[tuple[str, str], ...]:
        return ((TOKEN_METADATA, self.token), (REQUEST_ID_METADATA, request_id))

    async def wait_ready(self, seconds: float = 30) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="tabagent.ml.v1.MLInference"),
            metadata=self.md(),
            timeout=seconds,
            wait_for_ready=True,
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def start_worker(tmp_path: Path, command: list[str], parent_pid: int | None = None) -> Worker:
    token = secrets.token_hex(16)
    socket_path = tmp_path / "w.sock"
    args = [
        *command,
        *("--listen", f"unix:{socket_path}"),
        *("--cache-dir", str(tmp_path / "cache")),
        *("--log-dir", str(tmp_path / "logs")),
    ]
    if parent_pid is not None:
        args += ["--parent-pid", str(parent_pid)]
    proc = subprocess.Popen(args, env={**os.environ, TOKEN_ENV: token}, stdin=subprocess.DEVNULL)
    return Worker(proc, f"unix:{socket_path}", token, tmp_path / "logs")


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[Worker]:
    w = start_worker(tmp_path, [sys.executable, "-m", "ml_service"], parent_pid=os.getpid())
    try:
        await w.wait_ready()
        yield w
    finally:
        await w.channel.close()
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
            w.proc.wait(timeout=20)


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    out = tmp_path / "proto"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(out)], check=True)
    checked_in = ROOT / "ml_service" / "proto"
    fresh = sorted(p.name for p in out.iterdir())
    assert fresh == sorted(p.name for p in checked_in.iterdir() if p.is_file())
    for name in fresh:
        assert (out / name).read_text() == (checked_in / name).read_text(), (
            f"{name} differs: run scripts/gen_protos.py"
        )


async def test_every_call_needs_the_token(worker: Worker) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await worker.stub.ListModels(pb.ListModelsRequest(), metadata=((TOKEN_METADATA, "wrong"),))
    assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        async for _ in worker.stub.Generate(pb.GenerateRequest(model_id="x", prompt="hi")):
            pass
    assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status = await worker.stub.GetStatus(pb.StatusRequest(), metadata=worker.md())
    assert status.pid == worker.proc.pid
    assert status.rss_bytes > 10 << 20


async def test_status_codes(worker: Worker) -> None:
    md = worker.md()

    async def code_of(coro: object) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await coro  # type: ignore[misc]
        return excinfo.value.code()

    load = pb.LoadModelRequest
    assert (
        await code_of(worker.stub.LoadModel(load(model_id="", backend=pb.LLAMA_CPP), metadata=md))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        await code_of(
            worker.stub.LoadModel(
                load(model_id="m", backend=pb.LLAMA_CPP, path="/nope.gguf"), metadata=md
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        await code_of(worker.stub.UnloadModel(pb.UnloadModelRequest(model_id="m"), metadata=md))
        == grpc.StatusCode.NOT_FOUND
    )
    small_ctx = pb.LlamaOptions(n_ctx=256)
    info = await worker.stub.LoadModel(
        load(model_id="smol", backend=pb.LLAMA_CPP, path=smollm2_path(), llama=small_ctx),
        metadata=md,
    )
    assert info.context_length == 256
    assert info.has_chat_template
    again = await worker.stub.LoadModel(
        load(model_id="smol", backend=pb.LLAMA_CPP, path=smollm2_path()), metadata=md
    )
    assert again.load_seconds == info.load_seconds  # already loaded: the same model, not a reload
    too_long = pb.GenerateRequest(model_id="smol", prompt="word " * 400)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        async for _ in worker.stub.Generate(too_long, metadata=md):
            pass
    assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    faces_on_text_model = pb.DetectFacesRequest(model_id="smol", encoded=b"x")
    assert (
        await code_of(worker.stub.DetectFaces(faces_on_text_model, metadata=md))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    bad_tokens = pb.DetokenizeRequest(model_id="smol", tokens=[-5])
    assert (
        await code_of(worker.stub.Detokenize(bad_tokens, metadata=md))
        == grpc.StatusCode.INVALID_ARGUMENT
    )


async def test_cancelling_a_stream_frees_the_slot(worker: Worker) -> None:
    md = worker.md("cancel-me")
    await worker.stub.LoadModel(
        pb.LoadModelRequest(model_id="smol", backend=pb.LLAMA_CPP, path=smollm2_path()), metadata=md
    )
    long = pb.GenerateRequest(
        model_id="smol", prompt="Once upon a time", sampling=pb.Sampling(max_tokens=2000)
    )
    call = worker.stub.Generate(long, metadata=md)
    got = 0
    async for _chunk in call:
        got += 1
        if got == 3:
            call.cancel()
            break
    # the slot is free again within a token: a new generation starts at once
    start = time.perf_counter()
    short = pb.GenerateRequest(model_id="smol", prompt="Hi", sampling=pb.Sampling(max_tokens=2))
    chunks = [c async for c in worker.stub.Generate(short, metadata=md)]
    assert chunks[-1].finish_reason in ("length", "stop")
    assert time.perf_counter() - start < 5  # the cancelled 2,000-token story would take ~30 s
    log_text = (worker.log_dir / "ml_worker.log").read_text()
    assert "[cancel-me] loaded smol" in log_text  # request ids travel as gRPC metadata


async def test_stream_interval_joins_fast_tokens(worker: Worker) -> None:
    md = worker.md()
    await worker.stub.LoadModel(
        pb.LoadModelRequest(model_id="smol", backend=pb.LLAMA_CPP, path=smollm2_path()), metadata=md
    )

    async def chunks(interval_ms: int) -> list[pb.GenerateChunk]:
        request = pb.GenerateRequest(
            model_id="smol",
            prompt="Once upon a time",
            sampling=pb.Sampling(max_tokens=24, temperature=0.0),
            stream_interval_ms=interval_ms,
        )
        return [c async for c in worker.stub.Generate(request, metadata=md)]

    per_token = await chunks(0)
    together = await chunks(60_000)  # longer than the whole generation
    texts = [c.text for c in together if c.text]
    # the first text at once, all the rest with the last chunk; the same greedy text
    assert len(texts) == 2
    assert together[-1].text == texts[1]
    assert len([c for c in per_token if c.text]) > 10
    assert "".join(texts) == "".join(c.text for c in per_token)
    assert together[-1].finish_reason == per_token[-1].finish_reason == "length"
    assert together[-1].usage.completion_tokens == per_token[-1].usage.completion_tokens
    assert next(c for c in together if c.text).ttft_ms > 0


async def test_sigterm_drains_and_exits_zero(worker: Worker) -> None:
    worker.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.proc.wait, 20) == 0


def test_worker_without_token_refuses_to_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    args = ["ml-service", "--listen", f"unix:{tmp_path}/w.sock", "--cache-dir", str(tmp_path)]
    result = subprocess.run(
        [SERVER_BIN, *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert TOKEN_ENV in result.stderr


async def test_ml_service_subcommand_serves_the_worker(tmp_path: Path) -> None:
    """The frozen binary spawns itself this way: tabagent-server ml-service."""
    w = start_worker(tmp_path, [SERVER_BIN, "ml-service"])
    try:
        await w.wait_ready()
        status = await w.stub.GetStatus(pb.StatusRequest(), metadata=w.md())
        assert status.pid == w.proc.pid
    finally:
        await w.channel.close()
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(timeout=20) == 0


def test_worker_exits_when_its_parent_dies(tmp_path: Path) -> None:
    """A middle process starts the worker and is killed with SIGKILL: no orphan remains."""
    script = (
        "import os, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'ml_service',"
        f" '--listen', 'unix:{tmp_path}/w.sock', '--cache-dir', '{tmp_path}',"
        " '--parent-pid', str(os.getpid())],"
        f" env={{**os.environ, '{TOKEN_ENV}': 't'}})\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    worker_pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 30
    while not (tmp_path / "w.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    parent.kill()
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(worker_pid, signal.SIGKILL)
    pytest.fail("the worker outlived its parent")


async def test_video_stream_gives_one_result_per_frame_in_order(worker: Worker) -> None:
    import numpy as np
    from skimage import data

    face = data.astronaut()
    blank = np.zeros_like(face)

    async def frames() -> AsyncIterator[pb.VideoFrame]:
        for i, image in enumerate([face, blank, face[:, ::-1].copy(), face]):
            raw = pb.RawImage(width=image.shape[1], height=image.shape[0], rgb=image.tobytes())
            yield pb.VideoFrame(timestamp_us=1000 * i, frame=raw)

    results = [r async for r in worker.stub.DetectFacesStream(frames(), metadata=worker.md())]
    assert [r.timestamp_us for r in results] == [0, 1000, 2000, 3000]
    assert [len(r.faces) for r in results] == [1, 0, 1, 1]
    assert results[0].faces[0].score > 0.8
    assert results[0].faces[0].x == results[3].faces[0].x  # no state carried between frames

    async def bad_frames() -> AsyncIterator[pb.VideoFrame]:
        yield pb.VideoFrame(frame=pb.RawImage(width=10, height=10, rgb=b"short"))

    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        async for _ in worker.stub.DetectFacesStream(bad_frames(), metadata=worker.md()):
            pass
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
