"""Supervisor and orchestrator with a real worker process: restarts, circuit breaker,
keep-alive, eviction under a RAM budget, and what a busy model is protected from."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ml_service.proto import ml_inference_pb2 as pb
from tabagent.errors import ServiceUnavailable
from tabagent.ml.orchestrator import ModelOrchestrator, ModelSpec, embedded_models
from tabagent.ml.supervisor import CircuitBreaker, WorkerSupervisor


def test_breaker_opens_after_threshold_within_window_and_closes_on_success() -> None:
    breaker = CircuitBreaker(threshold=3, window=10, cooldown=30)
    breaker.record_failure(0)
    breaker.record_failure(1)
    assert breaker.retry_after(1) == 0
    breaker.record_failure(20)  # the first two fell out of the window
    assert breaker.retry_after(20) == 0
    breaker.record_failure(21)
    breaker.record_failure(22)
    assert breaker.retry_after(22) == 30
    assert breaker.retry_after(40) == 12
    breaker.record_success()
    assert breaker.retry_after(40) == 0


def make_supervisor(tmp_path: Path, breaker: CircuitBreaker | None = None) -> WorkerSupervisor:
    return WorkerSupervisor(
        run_dir=tmp_path / "run",
        cache_dir=tmp_path / "cache",
        log_dir=tmp_path / "logs",
        breaker=breaker,
    )


@pytest.fixture
async def supervisor(tmp_path: Path) -> AsyncIterator[WorkerSupervisor]:
    sup = make_supervisor(tmp_path)
    await sup.start()
    await sup.stub()
    yield sup
    await sup.stop()


def chat_spec(model_id: str = "smollm2-135m-instruct") -> ModelSpec:
    smol = next(s for s in embedded_models() if s.kind == "chat")
    return ModelSpec(model_id, "chat", pb.LLAMA_CPP, smol.path, smol.size_bytes)


async def test_breaker_opens_on_a_crash_loop_then_recovers(tmp_path: Path) -> None:
    sup = make_supervisor(tmp_path, CircuitBreaker(threshold=2, window=30, cooldown=1.5))
    await sup.start()
    try:
        for _ in range(2):
            await sup.stub()  # healthy (after the first kill: restarted)
            assert sup.proc is not None
            os.kill(sup.proc.pid, signal.SIGKILL)
            await sup.proc.wait()
            while sup.ready:  # until the supervisor has seen the death  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        with pytest.raises(ServiceUnavailable) as excinfo:
            await sup.stub()
        assert excinfo.value.code == "worker_circuit_open"
        assert excinfo.value.retry_after is not None
        assert 0 < excinfo.value.retry_after <= 1.5
        await asyncio.sleep(excinfo.value.retry_after + 0.1)
        stub = await sup.stub(wait=30)  # the half-open restart answered healthy
        status = await stub.GetStatus(pb.StatusRequest(), metadata=sup.metadata())
        assert status.pid == sup.proc.pid
        assert sup.generation == 3  # first start, restart after the first kill, half-open probe
    finally:
        await sup.stop()


async def test_keep_alive_unloads_idle_models(supervisor: WorkerSupervisor) -> None:
    orch = ModelOrchestrator(supervisor, [chat_spec()], ram_budget_bytes=4 << 30)
    await orch.load("smollm2-135m-instruct", keep_alive=0.05)
    assert "smollm2-135m-instruct" in orch.loaded()
    await asyncio.sleep(0.1)
    assert await orch.unload_idle() == ["smollm2-135m-instruct"]
    listed = await supervisor.unary("ListModels", pb.ListModelsRequest(), "-", 10, "list")
    assert not listed.models  # really freed in the worker, not only forgotten


async def test_keep_alive_zero_unloads_right_after_use(supervisor: WorkerSupervisor) -> None:
    orch = ModelOrchestrator(supervisor, [chat_spec()], ram_budget_bytes=4 << 30)
    async with orch.use("smollm2-135m-instruct", keep_alive=0):
        assert "smollm2-135m-instruct" in orch.loaded()
    assert orch.loaded() == {}


async def test_busy_models_are_never_evicted_idle_ones_are(supervisor: WorkerSupervisor) -> None:
    # a budget that holds one copy of the model: loading a second must evict an idle one
    a, b, c = chat_spec("a"), chat_spec("b"), chat_spec("c")
    orch = ModelOrchestrator(supervisor, [a, b, c], ram_budget_bytes=int(a.size_bytes * 1.5))
    async with orch.use("a"):
        await orch.load("b")  # a is busy: over budget rather than evicting it
        assert set(orch.loaded()) == {"a", "b"}
    await orch.load("c")  # now both a and b are idle: the least recently used goes first
    assert "c" in orch.loaded()
    assert "a" not in orch.loaded()


async def test_models_are_reloaded_after_a_worker_restart(supervisor: WorkerSupervisor) -> None:
    orch = ModelOrchestrator(supervisor, [chat_spec()], ram_budget_bytes=4 << 30)
    await orch.load("smollm2-135m-instruct")
    assert supervisor.proc is not None
    os.kill(supervisor.proc.pid, signal.SIGKILL)
    await supervisor.proc.wait()
    info = await orch.load("smollm2-135m-instruct")  # waits for the new worker, loads again
    assert info.context_length > 0
    listed = await supervisor.unary("ListModels", pb.ListModelsRequest(), "-", 10, "list")
    assert [m.model_id for m in listed.models] == ["smollm2-135m-instruct"]


async def test_waiting_longer_than_the_request_timeout_is_refused(
    supervisor: WorkerSupervisor,
) -> None:
    from tabagent.errors import TooManyRequests

    orch = ModelOrchestrator(
        supervisor, [chat_spec()], ram_budget_bytes=4 << 30, request_timeout=0.2
    )
    async with orch.use("smollm2-135m-instruct"):  # holds the model's only slot
        with pytest.raises(TooManyRequests) as excinfo:
            async with orch.use("smollm2-135m-instruct"):
                pass
    assert excinfo.value.code == "queue_timeout"
    assert excinfo.value.retry_after
    async with orch.use("smollm2-135m-instruct"):  # the slot is free again afterwards
        assert orch.queue_depth() == 0
