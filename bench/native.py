"""Native messaging: the browser's pipes vs HTTP, same operations, same run.

``tabagent-server chrome-extension://<id>/`` is started the way Chrome starts a native host
(4-byte length + JSON frames on stdin/stdout, the client from ``tests.native_host``) and
compared with ``tabagent-server --mode http`` on:

* **round trip**: sequential ``system.health`` (native) vs ``GET /v1/health`` on a keep-alive
  aiohttp session (HTTP), one request in flight, after a warm-up; p50/p99/mean.
* **pipelined**: the same small request with 32 in flight (native: one pipe, requests
  pipelined; HTTP: 32 concurrent aiohttp requests over keep-alive connections) -> requests/s.
* **chat**: ``chat.complete`` (native, first ``delta`` event) vs ``POST /v1/chat/completions``
  with ``"stream": true`` (HTTP SSE, first chunk with content) on the embedded SmolLM2-135M,
  same prompt, greedy, 32 tokens: TTFT, total time and tokens/s, medians after a warm-up run
  that loads the model.

Small messages: ML worker off; both servers alive together (each with its own HOME and XDG
folders, so the host serves in-process instead of relaying to the HTTP server), pinned to one
core, this process (the client for both) on another; rounds alternate which goes first, and
the table shows medians over rounds. The server's and the client's CPU time per request are
shown too: the client is Python on both sides, and at 32 in flight it may be what saturates.
Chat: ML worker on, one server at a time (an idle llama.cpp threadpool in another process
still competes for the cores), not pinned (generation uses every physical core).
Every measurement records the CPU other processes used meanwhile; a disturbed one is taken
again after waiting for a quiet machine (within a time budget) and still-disturbed numbers are
starred. No targets are set for this benchmark: the verdict lines are INFO.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp

from bench import harness
from bench.chat import decode_sample
from ml_service.backends.llama import physical_cores
from tests.envelope_client import EnvelopeClient
from tests.native_host import ORIGIN, Host

QUIET_CORES = 0.1  # foreign CPU above this (in cores) marks a measurement as noisy
WINDOW = 32  # requests in flight in the pipelined runs
CHAT_TOKENS = 32
N_CTX = 2048
READY_S = 120  # start-up allowance (ML worker included)
MODEL = "smollm2-135m-instruct"
PROMPT = "Write a long story about a lighthouse keeper and the sea."
NO_ML = {"TABAGENT_ML_WORKER": "false", "TABAGENT_LOG_LEVEL": "WARNING"}
NATIVE, HTTP = "native (pipes)", "HTTP (aiohttp)"
RTT, PIPELINED = "round trip, 1 in flight", f"pipelined, {WINDOW} in flight"


@dataclass
class Plan:
    rounds: int
    rtt_calls: int
    rtt_warmup: int
    pipelined: int  # requests per pipelined run
    chat_runs: int
    retries: int  # re-takes of a measurement that other processes disturbed (after quiet)
    quiet_budget_s: float  # the most this run waits for a quiet machine, in all

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> Plan:
        if args.quick:
            return cls(rounds=1, rtt_calls=300, rtt_warmup=100, pipelined=1000, chat_runs=3,
                       retries=1, quiet_budget_s=20)  # fmt: skip
        return cls(rounds=3, rtt_calls=2000, rtt_warmup=300, pipelined=5000, chat_runs=5,
                   retries=2, quiet_budget_s=60)  # fmt: skip


@dataclass(frozen=True)
class Sample:
    p50_ms: float
    p99_ms: float
    mean_ms: float
    rps: float
    server_cpu_us: float  # server process CPU per request
    client_cpu_us: float  # this process's CPU per request
    foreign_cores: float


@dataclass(frozen=True)
class ChatSample:
    ttft_ms: float
    total_ms: float
    tokens: int  # as the stream's usage counts them (a chunk may carry several tokens)
    tokens_per_s: float  # decode rate: (tokens - 1) / (last chunk - first chunk)
    foreign_cores: float


class _Measured(Protocol):
    @property
    def foreign_cores(self) -> float: ...


_S = TypeVar("_S", bound=_Measured)


class Quiet:
    """Re-takes a measurement that other processes disturbed, after waiting for a quiet machine.

    The machine may be shared (tests, builds): llama.cpp's threads lose whole tokens' worth of
    time when another process takes a core, so the least disturbed attempt is kept. Waiting and
    re-taking are bounded by the plan's budget, so a busy machine makes the run noisy (marked
    in the tables), not endless.
    """

    def __init__(self, plan: Plan) -> None:
        self.retries = plan.retries
        self.budget_s = plan.quiet_budget_s

    async def wait(self, max_wait_s: float = 20) -> None:
        if self.budget_s <= 0:
            return
        start = time.monotonic()
        wait_s = min(max_wait_s, self.budget_s)
        await asyncio.to_thread(harness.wait_for_quiet, QUIET_CORES, wait_s)
        self.budget_s -= time.monotonic() - start

    async def take(self, measure: Callable[[], Awaitable[_S]]) -> _S:
        best = await measure()
        for _ in range(self.retries):
            if best.foreign_cores <= QUIET_CORES or self.budget_s <= 0:
                break
            await self.wait()
            start = time.monotonic()
            again = await measure()
            self.budget_s -= time.monotonic() - start
            if again.foreign_cores < best.foreign_cores:
                best = again
        return best


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the native host ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _native_host(
    env: dict[str, str], home: Path, cpu_prefix: list[str]
) -> AsyncIterator[Host]:
    """``tabagent-server chrome-extension://<id>/`` with pipes, as Chrome starts it (the same
    as ``tests.native_host.start_host``, but with exactly ``env`` and an optional taskset)."""
    stderr_path = home / "native-host.stderr"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *cpu_prefix,
            harness.venv_bin("tabagent-server"),
            ORIGIN,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=env,
            limit=8 << 20,
        )
    host = Host(proc, stderr_path)
    try:
        try:
            await _native_ready(host)
        except Exception as exc:
            tail = stderr_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"native host did not start: {exc!r}\n{tail}") from None
        yield host
    finally:
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                await host.close_stdin()
            try:
                await host.wait(20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _native_ready(host: Host) -> None:
    """Hello (must be in-process, not a relay), then health until every component is up."""
    hello = await host.result("session.hello")
    if hello.get("mode") != "in-process":
        raise RuntimeError(f"the host did not serve in-process: {hello}")
    async with asyncio.timeout(READY_S):
        while True:
            health = await host.result("system.health")
            if health["status"] == "ok":
                return
            await asyncio.sleep(0.1)


def _frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack("=I", len(body)) + body


def _check(message: dict[str, Any], expected_id: Any) -> None:
    if message.get("id") != expected_id or message.get("event") != "done":
        raise RuntimeError(f"unexpected reply for {expected_id!r}: {message}")


async def _native_rtt(host: Host, calls: int) -> list[float]:
    latencies = []
    for n in range(calls):
        start = time.perf_counter()
        await host.send_raw(_frame({"id": n, "method": "system.health", "params": {}}))
        _check(await host.recv(), n)
        latencies.append(time.perf_counter() - start)
    return latencies


async def _native_pipelined(host: Host, total: int) -> list[float]:
    sent_at: dict[Any, float] = {}
    latencies: list[float] = []
    sent = 0

    async def send(count: int) -> None:
        nonlocal sent
        wire = []
        for _ in range(count):
            wire.append(_frame({"id": sent, "method": "system.health", "params": {}}))
            sent_at[sent] = time.perf_counter()
            sent += 1
        await host.send_raw(b"".join(wire))

    await send(min(WINDOW, total))
    while len(latencies) < total:
        reply = await host.recv()
        started = sent_at.pop(reply.get("id"), None)
        if started is None or reply.get("event") != "done":
            raise RuntimeError(f"unexpected reply: {reply}")
        latencies.append(time.perf_counter() - started)
        if sent < total:
            await send(1)
    return latencies


# -- HTTP -----------------------------------------------------------------------------------


async def _timed_get(http: aiohttp.ClientSession, url: str) -> float:
    """Seconds for one GET of ``url``, body read; anything but 200 is an error."""
    start = time.perf_counter()
    async with http.get(url) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")
    return time.perf_counter() - start


async def _http_rtt(http: aiohttp.ClientSession, url: str, calls: int) -> list[float]:
    return [await _timed_get(http, url) for _ in range(calls)]


async def _http_pipelined(http: aiohttp.ClientSession, url: str, total: int) -> list[float]:
    latencies: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            latencies.append(await _timed_get(http, url))

    await asyncio.gather(*(worker() for _ in range(WINDOW)))
    return latencies


# -- small messages -------------------------------------------------------------------------


async def _sample(
    take: Callable[[], Awaitable[list[float]]], server_pid: int, wall_rate: bool
) -> Sample:
    probe = harness.ForeignLoad()
    server_before, client_before = harness.cpu_seconds(server_pid), time.process_time()
    start = time.perf_counter()
    latencies = await take()
    elapsed = time.perf_counter() - start
    count = len(latencies)
    return Sample(
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        mean_ms=statistics.fmean(latencies) * 1000,
        rps=count / elapsed if wall_rate else 1 / statistics.fmean(latencies),
        server_cpu_us=(harness.cpu_seconds(server_pid) - server_before) / count * 1e6,
        client_cpu_us=(time.process_time() - client_before) / count * 1e6,
        foreign_cores=probe.cores(),
    )


async def _small_messages(
    plan: Plan, http_port: int, http_pid: int, native_env: dict[str, str], home: Path,
    cpus: harness.CpuPlan, quiet: Quiet,
) -> dict[tuple[str, str], list[Sample]]:  # fmt: skip
    url = f"http://127.0.0.1:{http_port}/v1/health"
    samples: dict[tuple[str, str], list[Sample]] = {}
    connector = aiohttp.TCPConnector(limit=WINDOW)
    async with (
        _native_host(native_env, home, cpus.prefix(cpus.server)) as host,
        aiohttp.ClientSession(connector=connector) as http,
    ):
        pid = host.proc.pid
        runs: dict[str, dict[str, Callable[[], Awaitable[Sample]]]] = {
            NATIVE: {
                RTT: lambda: _sample(lambda: _native_rtt(host, plan.rtt_calls), pid, False),
                PIPELINED: lambda: _sample(
                    lambda: _native_pipelined(host, plan.pipelined), pid, True
                ),
            },
            HTTP: {
                RTT: lambda: _sample(lambda: _http_rtt(http, url, plan.rtt_calls), http_pid, False),
                PIPELINED: lambda: _sample(
                    lambda: _http_pipelined(http, url, plan.pipelined), http_pid, True
                ),
            },
        }
        # warm-up: imports, caches, connections (HTTP: all 32 of them)
        await _native_rtt(host, plan.rtt_warmup)
        await _native_pipelined(host, plan.rtt_warmup * 2)
        await _http_rtt(http, url, plan.rtt_warmup)
        await _http_pipelined(http, url, plan.rtt_warmup * 2)
        for round_no in range(plan.rounds):
            order = (NATIVE, HTTP) if round_no % 2 == 0 else (HTTP, NATIVE)
            for test in (RTT, PIPELINED):
                for transport in order:
                    got = await quiet.take(runs[transport][test])
                    samples.setdefault((transport, test), []).append(got)
            print(f"  round {round_no + 1}/{plan.rounds} done", file=sys.stderr, flush=True)
    return samples


def _measure_small(
    plan: Plan, root: Path, cpus: harness.CpuPlan, quiet: Quiet
) -> dict[Any, list[Sample]]:
    affinity = os.sched_getaffinity(0)
    with contextlib.ExitStack() as stack:
        http_env = {**harness.isolated_env(root / "http-home"), **NO_ML}
        port = harness.free_port()
        argv = [*cpus.prefix(cpus.server), harness.venv_bin("tabagent-server"), "--mode", "http",
                "--port", str(port)]  # fmt: skip
        proc = stack.enter_context(
            harness.server(
                argv, f"http://127.0.0.1:{port}/v1/health", env=http_env, ready=harness.status_ok
            )
        )
        native_home = root / "native-home"
        native_env = {**harness.isolated_env(native_home), **NO_ML}
        cpus.pin_self()  # the client for both, on the client core
        try:
            return asyncio.run(
                _small_messages(plan, port, proc.pid, native_env, native_home, cpus, quiet)
            )
        finally:
            os.sched_setaffinity(0, affinity)


# -- chat -----------------------------------------------------------------------------------


def _chat_sample(
    start: float, stamps: list[float], tokens: int, end: float, probe: harness.ForeignLoad
) -> ChatSample:
    """TTFT and decode rate counted as ``bench chat`` counts them (``stamps``: when each chunk
    of text arrived; ``tokens``: how many the stream's usage says were generated)."""
    sample = decode_sample(start, stamps, tokens)
    return ChatSample(
        ttft_ms=sample.ttft_ms,
        total_ms=(end - start) * 1000,
        tokens=sample.tokens,
        tokens_per_s=sample.tokens_per_s,
        foreign_cores=probe.cores(),
    )


def _chat_params() -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": CHAT_TOKENS, "temperature": 0}  # fmt: skip


async def envelope_chat(client: EnvelopeClient, request_id: str) -> ChatSample:
    """One timed ``chat.complete`` over the envelope, whatever carries it (native, WebRTC)."""
    probe = harness.ForeignLoad()
    start = time.perf_counter()
    request = {"id": request_id, "method": "chat.complete", "params": _chat_params()}
    await client.send_request(request)
    stamps, tokens = [], 0
    async for event in client.events(request_id, within=120):
        if event["event"] == "delta" and event["data"].get("text"):
            stamps.append(time.perf_counter())
        elif event["event"] == "done":
            tokens = event["data"]["usage"]["completion_tokens"]
        elif event["event"] == "error":
            raise RuntimeError(f"chat over {type(client).__name__} failed: {event['error']}")
    return _chat_sample(start, stamps, tokens, time.perf_counter(), probe)


async def _http_chat(http: aiohttp.ClientSession, url: str) -> ChatSample:
    probe = harness.ForeignLoad()
    start = time.perf_counter()
    stamps, tokens = [], 0
    body = {**_chat_params(), "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status} {(await response.read())[:200]!r}")
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"HTTP chat failed: {chunk['error']}")
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return _chat_sample(start, stamps, tokens, time.perf_counter(), probe)


async def _chat_native(
    plan: Plan, env: dict[str, str], home: Path, quiet: Quiet
) -> list[ChatSample]:
    ids = (f"chat{n}" for n in itertools.count())
    async with _native_host(env, home, []) as host:
        await envelope_chat(host, "warm-up")  # loads the model
        await quiet.wait()
        return [
            await quiet.take(lambda: envelope_chat(host, next(ids))) for _ in range(plan.chat_runs)
        ]


async def _chat_http(plan: Plan, port: int, quiet: Quiet) -> list[ChatSample]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        await _http_chat(http, url)  # loads the model
        await quiet.wait()
        return [await quiet.take(lambda: _http_chat(http, url)) for _ in range(plan.chat_runs)]


def _measure_chat(
    plan: Plan, root: Path, threads: int, quiet: Quiet
) -> dict[str, list[ChatSample]]:
    ml = {"TABAGENT_N_CTX": str(N_CTX), "TABAGENT_N_THREADS": str(threads),
          "TABAGENT_LOG_LEVEL": "WARNING"}  # fmt: skip
    samples: dict[str, list[ChatSample]] = {}
    # one server at a time, each with its own folders (the host must not relay to the server)
    http_env = {**harness.isolated_env(root / "chat-http-home"), **ml}
    port = harness.free_port()
    argv = [harness.venv_bin("tabagent-server"), "--mode", "http", "--port", str(port)]
    with harness.server(
        argv, f"http://127.0.0.1:{port}/v1/health", env=http_env, ready=harness.status_ok,
        timeout=120,
    ):  # fmt: skip
        samples[HTTP] = asyncio.run(_chat_http(plan, port, quiet))
    native_home = root / "chat-native-home"
    native_env = {**harness.isolated_env(native_home), **ml}
    samples[NATIVE] = asyncio.run(_chat_native(plan, native_env, native_home, quiet))
    return samples


# -- report ---------------------------------------------------------------------------------


def _median(values: list[Any], field: str) -> float:
    return float(statistics.median(float(getattr(v, field)) for v in values))


def report(
    small: dict[Any, list[Sample]],
    chat: dict[str, list[ChatSample]],
    plan: Plan,
    cpus: harness.CpuPlan,
    threads: int,
) -> None:
    print(
        f"\nNative messaging vs HTTP: system.health / GET /v1/health, ML worker off, medians of "
        f"{plan.rounds} round(s); round trip = {plan.rtt_calls} sequential calls, pipelined = "
        f"{plan.pipelined} calls with {WINDOW} in flight"
    )
    print(
        f"Machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
        f"{physical_cores()} physical; {cpus.describe()}"
    )
    header = (
        f"{'transport':16} {'test':24} {'p50 ms':>7} {'p99 ms':>7} {'mean ms':>8} {'req/s':>7} "
        f"{'server us/req':>13} {'client us/req':>13} {'other CPU':>9}"
    )
    print(header)
    print("-" * len(header))
    for test in (RTT, PIPELINED):
        for transport in (NATIVE, HTTP):
            got = small[(transport, test)]
            other = max(s.foreign_cores for s in got)
            print(
                f"{transport:16} {test:24} {_median(got, 'p50_ms'):7.3f} "
                f"{_median(got, 'p99_ms'):7.3f} {_median(got, 'mean_ms'):8.3f} "
                f"{_median(got, 'rps'):7.0f} {_median(got, 'server_cpu_us'):13.0f} "
                f"{_median(got, 'client_cpu_us'):13.0f} {other:8.2f}"
                f"{'*' if other > QUIET_CORES else ''}"
            )
    print(
        "req/s: round trip = 1 / mean latency; pipelined = calls / wall time.\n"
        "server/client us/req: CPU time of the server process / of this client process per call."
        "\nother CPU: cores used by other processes while measuring (worst round; * above "
        f"{QUIET_CORES}: numbers skewed)."
    )

    print(
        f"\nStreaming chat, SmolLM2-135M Q4_1, {CHAT_TOKENS} tokens, greedy, {threads} threads, "
        f"median of {plan.chat_runs} runs after a warm-up (model load); one server at a time"
    )
    header = f"{'transport':16} {'TTFT ms':>8} {'min TTFT':>9} {'total ms':>9} {'tokens':>7} "
    header += f"{'tokens/s':>9} {'other CPU':>9}"
    print(header)
    print("-" * len(header))
    chat_names = {NATIVE: "native (pipes)", HTTP: "HTTP SSE"}
    for transport in (NATIVE, HTTP):
        runs = chat[transport]
        print(
            f"{chat_names[transport]:16} {_median(runs, 'ttft_ms'):8.1f} "
            f"{min(r.ttft_ms for r in runs):9.1f} {_median(runs, 'total_ms'):9.1f} "
            f"{_median(runs, 'tokens'):7.0f} {_median(runs, 'tokens_per_s'):9.1f} "
            f"{max(r.foreign_cores for r in runs):8.2f}"
            f"{'*' if max(r.foreign_cores for r in runs) > QUIET_CORES else ''}"
        )
    print(
        "TTFT: request sent -> first text (native: first delta event; HTTP: first SSE chunk "
        "with content).\ntokens/s: (tokens - 1) / (last token - first token), as bench chat."
    )

    rtt_n, rtt_h = _median(small[(NATIVE, RTT)], "p50_ms"), _median(small[(HTTP, RTT)], "p50_ms")
    rps_n = _median(small[(NATIVE, PIPELINED)], "rps")
    rps_h = _median(small[(HTTP, PIPELINED)], "rps")
    ttft_n, ttft_h = _median(chat[NATIVE], "ttft_ms"), _median(chat[HTTP], "ttft_ms")
    rate_n, rate_h = _median(chat[NATIVE], "tokens_per_s"), _median(chat[HTTP], "tokens_per_s")
    print("\nResults (no targets set)")
    print(
        f"INFO  round trip p50: native {rtt_n:.3f} ms, HTTP {rtt_h:.3f} ms "
        f"(HTTP / native = {rtt_h / rtt_n:.2f}x)"
    )
    print(
        f"INFO  pipelined ({WINDOW} in flight): native {rps_n:.0f} msg/s, HTTP {rps_h:.0f} req/s "
        f"(native / HTTP = {rps_n / rps_h:.2f}x)"
    )
    print(
        f"INFO  chat TTFT: native {ttft_n:.1f} ms, HTTP SSE {ttft_h:.1f} ms "
        f"({ttft_n - ttft_h:+.1f} ms); tokens/s native {rate_n:.1f}, HTTP SSE {rate_h:.1f}"
    )


def run(args: argparse.Namespace) -> None:
    """Entry point for ``python -m bench native``."""
    plan = Plan.for_args(args)
    cpus = harness.CpuPlan.split()
    threads = physical_cores()
    quiet = Quiet(plan)
    with tempfile.TemporaryDirectory(prefix="tabagent-bench-") as tmp:
        small = _measure_small(plan, Path(tmp), cpus, quiet)
        chat = _measure_chat(plan, Path(tmp), threads, quiet)
    report(small, chat, plan, cpus, threads)
