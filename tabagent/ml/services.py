"""The inference services one server owns, with their metrics."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tabagent.ml.orchestrator import ModelOrchestrator
from tabagent.ml.supervisor import WorkerSupervisor


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
