"""Embeddings: sentences/s through TabAgent's HTTP API vs the same ONNX model called directly.

Both use the embedded all-MiniLM-L6-v2 (the same converted ONNX file, the same thread count),
batches of 32 short sentences; measured one after the other in one run (the server alone,
then the direct session alone), medians of several rounds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.chat import _free_port, _process
from ml_service.backends.onnx_embed import OnnxEmbedder, ensure_onnx
from tabagent.ml.orchestrator import embedded_models

BATCH = 32
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "near",
    "the",
    "river",
    "bank",
    "at",
    "dawn",
]


def _sentences(count: int) -> list[str]:
    return [" ".join(WORDS[(i % 7) :] + WORDS[: (i % 7)]) + f" #{i}" for i in range(count)]


def _direct(sentences: list[str], rounds: int, cache: Path) -> list[float]:
    folder = Path(next(s.path for s in embedded_models() if s.kind == "embedding"))
    embedder = OnnxEmbedder(folder, ensure_onnx(folder, cache))
    embedder.embed(sentences[:BATCH])  # warm-up
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(0, len(sentences), BATCH):
            embedder.embed(sentences[i : i + BATCH], batch_size=BATCH)
        rates.append(len(sentences) / (time.perf_counter() - start))
    return rates


def _http(port: int, sentences: list[str], rounds: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"}

    def post(batch: list[str]) -> None:
        body = json.dumps({"model": "all-minilm-l6-v2", "input": batch})
        conn.request("POST", "/v1/embeddings", body=body, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")

    post(sentences[:BATCH])  # warm-up: loads the model
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(0, len(sentences), BATCH):
            post(sentences[i : i + BATCH])
        rates.append(len(sentences) / (time.perf_counter() - start))
    conn.close()
    return rates


def run(args: argparse.Namespace) -> None:
    sentences = _sentences(256 if args.quick else 1024)
    rounds = 2 if args.quick else 5
    home = tempfile.mkdtemp(prefix="tabagent-bench-")
    env = {"HOME": home, "XDG_DATA_HOME": f"{home}/data", "XDG_STATE_HOME": f"{home}/state",
           "XDG_RUNTIME_DIR": home, "TABAGENT_LOG_LEVEL": "WARNING"}  # fmt: skip
    port = _free_port()
    server_bin = os.path.join(os.path.dirname(sys.executable), "tabagent-server")
    with _process([server_bin, "--mode", "http", "--port", str(port)],
                  f"http://127.0.0.1:{port}/v1/health", env):  # fmt: skip
        ours = statistics.median(_http(port, sentences, rounds))
    direct = statistics.median(_direct(sentences, rounds, Path(home) / "onnx"))
    print(f"\nEmbeddings, all-MiniLM-L6-v2 (ONNX, CPU), {len(sentences)} sentences, batch {BATCH}")
    print(f"{'peer':34} {'sentences/s':>12} {'vs direct':>10}")
    print(f"{'onnxruntime called directly':34} {direct:12.0f} {1:10.1%}")
    print(f"{'TabAgent HTTP /v1/embeddings':34} {ours:12.0f} {ours / direct:10.1%}")
