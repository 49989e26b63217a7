"""Main process <-> ML worker: unary gRPC round trip over the Unix socket, p50/p99.

The worker is started by the real supervisor (token, health, socket in the run folder), and the
call is ``GetStatus`` (no model work), so this is the cost every inference request pays on top
of the model itself. A raw ``grpc.aio`` channel without our metadata is measured beside it.
Target (issue 3): p99 < 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from ml_service.proto import ml_inference_pb2 as pb
from tabagent.ml.supervisor import WorkerSupervisor


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _measure(calls: int) -> dict[str, list[float]]:
    root = Path(tempfile.mkdtemp(prefix="tabagent-bench-"))
    sup = WorkerSupervisor(run_dir=root / "run", cache_dir=root / "cache", log_dir=root / "logs")
    await sup.start()
    try:
        stub = await sup.stub()
        request = pb.StatusRequest()
        results: dict[str, list[float]] = {"supervisor.unary (errors mapped)": [], "raw stub": []}
        for _ in range(200):  # warm-up
            await stub.GetStatus(request, metadata=sup.metadata())
        for _ in range(calls):
            start = time.perf_counter()
            await sup.unary("GetStatus", request, "bench", 5.0, "status")
            results["supervisor.unary (errors mapped)"].append(time.perf_counter() - start)
            start = time.perf_counter()
            await stub.GetStatus(request, metadata=sup.metadata())
            results["raw stub"].append(time.perf_counter() - start)
        return results
    finally:
        await sup.stop()


def run(args: argparse.Namespace) -> None:
    calls = 500 if args.quick else 5000
    results = asyncio.run(_measure(calls))
    print(f"\nUnary gRPC round trip main <-> worker (GetStatus over a Unix socket), {calls} calls")
    print(f"{'path':34} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>9}")
    for name, values in results.items():
        print(
            f"{name:34} {statistics.median(values) * 1000:8.3f} "
            f"{_percentile(values, 0.99) * 1000:8.3f} {len(values) / sum(values):9.0f}"
        )
    p99 = _percentile(results["supervisor.unary (errors mapped)"], 0.99) * 1000
    print(f"{'PASS' if p99 < 1 else 'FAIL'}  p99 < 1 ms (is {p99:.3f} ms)")
