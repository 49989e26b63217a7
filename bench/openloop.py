"""Open-loop fixed-rate load: latency at a given request rate, coordinated omission included.

Request ``i`` is due at ``start + i / rate`` whatever happened to earlier ones, and its latency
is measured from that due time, not from when it was actually sent. A server that stalls
therefore shows the full wait of every request queued behind the stall (a closed-loop client
such as plain wrk would stop sending and hide it).

The scheduler spins (``sleep(0)``) instead of sleeping until the next due time: asyncio wakes
from a timed sleep up to a millisecond late, which at 1,000 req/s is a whole interval. The
spin costs one core, which is why this generator runs on its own core (see harness.CpuPlan).
How late requests actually left is reported as ``send_lag_p99_ms``, so a generator that
cannot keep up is visible rather than blamed on the server.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True)
class OpenLoopResult:
    target_rps: float
    achieved_rps: float  # answered requests / (last answer - first due time)
    p50_ms: float
    p99_ms: float
    send_lag_p99_ms: float  # the generator's own lateness; should stay far below p99_ms
    errors: int  # non-200 answers, timeouts and connection errors


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def _run(
    url: str, method: str, body: bytes | None, rate: float, duration_s: float, warmup_s: float
) -> OpenLoopResult:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    warmup = int(rate * warmup_s)
    total = warmup + int(rate * duration_s)
    latencies: list[float] = []
    lags: list[float] = []
    errors = 0
    last_done = 0.0
    connector = aiohttp.TCPConnector(limit=256)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(index: int, due: float) -> None:
            nonlocal errors, last_done
            sent = time.perf_counter()
            try:
                async with session.request(method, url, data=body, headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            done = time.perf_counter()
            if index < warmup:
                return
            if not ok:
                errors += 1
                return
            latencies.append(done - due)
            lags.append(sent - due)
            last_done = max(last_done, done)

        start = time.perf_counter() + 0.005
        tasks: set[asyncio.Task[None]] = set()
        issued = 0
        while issued < total:
            due_now = min(total, int((time.perf_counter() - start) * rate) + 1)
            while issued < due_now:
                task = asyncio.create_task(one(issued, start + issued / rate))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                issued += 1
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)

    if not latencies:
        raise RuntimeError(f"no successful request to {url} ({errors} errors)")
    measured_start = start + warmup / rate
    return OpenLoopResult(
        target_rps=rate,
        achieved_rps=len(latencies) / (last_done - measured_start),
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        send_lag_p99_ms=percentile(lags, 0.99) * 1000,
        errors=errors,
    )


def run(
    url: str,
    *,
    rate: float,
    duration_s: float,
    method: str = "GET",
    body: bytes | None = None,
    warmup_s: float = 0.5,
) -> OpenLoopResult:
    """``rate`` requests per second for ``duration_s`` (after an unmeasured warm-up)."""
    return asyncio.run(_run(url, method, body, rate, duration_s, warmup_s))
