"""The inference services one server owns, with their metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ml_service.proto import ml_inference_pb2 as pb
from tabagent.ml.orchestrator import ModelOrchestrator
from tabagent.ml.supervisor import WorkerSupervisor

# Text nobody watches arrive travels in few large chunks: each chunk costs CPU the model needs.
WHOLE_TEXT_INTERVAL_MS = 1000


class MLMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.ttft = Histogram(
            "tabagent_ttft_seconds", "Time to first token.", ["model"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=registry,
        )  # fmt: skip
        self.tokens_per_second = Histogram(
            "tabagent_tokens_per_second", "Generation speed per request.", ["model"],
            buckets=(1, 5, 10, 20, 40, 80, 160, 320, 640), registry=registry,
        )  # fmt: skip
        self.model_load = Histogram(
            "tabagent_model_load_seconds", "Time to load a model into the worker.", ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=registry,
        )  # fmt: skip
        self.worker_restarts = Counter(
            "tabagent_ml_worker_restarts", "ML worker restarts after a crash.", registry=registry
        )
        self.queue_depth = Gauge(
            "tabagent_model_queue_depth", "Requests waiting for a model.", registry=registry
        )


@dataclass
class MLServices:
    supervisor: WorkerSupervisor
    orchestrator: ModelOrchestrator
    metrics: MLMetrics

    async def embed(
        self, texts: Sequence[str], model: str | None = None, request_id: str = "-"
    ) -> tuple[str, npt.NDArray[np.float32], int]:
        """(model id, unit vectors (n, dims), prompt tokens) from the worker's embedding model."""
        model_id = self.orchestrator.resolve(model, "embedding")
        async with self.orchestrator.use(model_id, request_id):
            reply = await self.supervisor.unary(
                "Embed", pb.EmbedRequest(model_id=model_id, inputs=list(texts)), request_id,
                120.0, "embedding",
            )  # fmt: skip
        vectors = np.frombuffer(reply.vectors, dtype="<f4").reshape(len(texts), reply.dimensions)
        return model_id, vectors, reply.prompt_tokens

    async def complete(
        self, model: str | None, prompt: str, max_tokens: int, request_id: str, purpose: str
    ) -> str:
        """The whole answer of a chat model (greedy) to one user message: for the server's own
        uses of a model (summaries, extraction), where nobody watches the text arrive."""
        model_id = self.orchestrator.resolve(model, "chat")
        request = pb.GenerateRequest(
            model_id=model_id,
            sampling=pb.Sampling(max_tokens=max_tokens, temperature=0.0),
            chat=pb.ChatTranscript(messages=[pb.ChatMessage(role="user", content=prompt)]),
            stream_interval_ms=WHOLE_TEXT_INTERVAL_MS,
        )
        parts = []
        async with self.orchestrator.use(model_id, request_id):
            async for chunk in self.supervisor.stream(
                "Generate", request, request_id, self.orchestrator.request_timeout, purpose
            ):
                parts.append(chunk.text)
        return "".join(parts)


class WorkerEmbedder:
    """Memory's embedder in the server: the default embedding model in the ML worker."""

    def __init__(self, ml: MLServices, model: str | None = None) -> None:
        self._ml = ml
        self._model = ml.orchestrator.resolve(model, "embedding")

    @property
    def model(self) -> str:
        return self._model

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        _, vectors, _ = await self._ml.embed(texts, self._model, "memory")
        return vectors
