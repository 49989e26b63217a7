"""WebRTC: how fast a data channel opens, and chat over it vs HTTP SSE, on one server.

``tabagent-server --mode web`` (ML worker on, embedded SmolLM2-135M, isolated HOME and XDG
folders) is driven by the aiortc client from ``tests.webrtc_client``:

* **connect**: ``connect()`` started -> data channel open (offer, ``POST /v1/webrtc/offer``,
  answer, ICE, DTLS, SCTP), over sequential connections, each peer closed before the next;
  p50/p95/max. Target (from the issue): p50 < 100 ms.
* **chat**: ``chat.complete`` over the data channel (first ``delta`` event) vs
  ``POST /v1/chat/completions`` with ``"stream": true`` (first SSE chunk with content), same
  prompt, greedy, 32 tokens: TTFT, total time and tokens/s, medians after a warm-up each.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from bench import harness
from bench.native import (
    CHAT_TOKENS,
    N_CTX,
    READY_S,
    ChatSample,
    _http_chat,
    _percentile,
    envelope_chat,
)
from ml_service.backends.llama import physical_cores
from tests.webrtc_client import connect

TARGET_P50_MS = 100.0


async def _measure(base: str, connects: int, chat_runs: int) -> tuple[list[float], dict]:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        # warm-up connection (imports, first-use costs), not counted
        warm = await connect(http, base)
        await warm.pc.close()
        open_ms = []
        for _ in range(connects):
            start = time.perf_counter()
            peer = await connect(http, base)
            open_ms.append((time.perf_counter() - start) * 1000)
            await peer.pc.close()

        url = f"{base}/v1/chat/completions"
        ids = (f"chat{n}" for n in itertools.count())
        peer = await connect(http, base)
        try:
            await envelope_chat(peer, "warm-up")  # loads the model
            rtc = [await envelope_chat(peer, next(ids)) for _ in range(chat_runs)]
        finally:
            await peer.pc.close()
        await _http_chat(http, url)  # warm-up
        sse = [await _http_chat(http, url) for _ in range(chat_runs)]
    return open_ms, {"WebRTC channel": rtc, "HTTP SSE": sse}


def _median(values: list[ChatSample], field: str) -> float:
    return float(statistics.median(float(getattr(v, field)) for v in values))


def run(args: argparse.Namespace) -> None:
    """Entry point for ``python -m bench webrtc``."""
    connects, chat_runs = (10, 3) if args.quick else (20, 5)
    threads = physical_cores()
    with tempfile.TemporaryDirectory(prefix="tabagent-bench-") as tmp:
        env = {
            **harness.isolated_env(Path(tmp) / "home"),
            "TABAGENT_N_CTX": str(N_CTX),
            "TABAGENT_N_THREADS": str(threads),
            "TABAGENT_LOG_LEVEL": "WARNING",
        }
        port = harness.free_port()
        base = f"http://127.0.0.1:{port}"
        argv = [harness.venv_bin("tabagent-server"), "--mode", "web", "--port", str(port)]
        with harness.server(
            argv, f"{base}/v1/health", env=env, ready=harness.status_ok, timeout=READY_S
        ):
            open_ms, chat = asyncio.run(_measure(base, connects, chat_runs))

    p50 = statistics.median(open_ms)
    p95 = _percentile(open_ms, 0.95)
    print(f"\nWebRTC offer -> data channel open, {connects} sequential connections (loopback)")
    header = f"{'connections':>11} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}"
    print(header)
    print("-" * len(header))
    print(f"{connects:11d} {p50:8.1f} {p95:8.1f} {max(open_ms):8.1f}")

    print(
        f"\nStreaming chat, SmolLM2-135M Q4_1, {CHAT_TOKENS} tokens, greedy, {threads} threads, "
        f"median of {chat_runs} runs after a warm-up each; same server"
    )
    header = f"{'transport':16} {'TTFT ms':>8} {'min TTFT':>9} {'total ms':>9} {'tokens':>7} "
    header += f"{'tokens/s':>9}"
    print(header)
    print("-" * len(header))
    for name, runs in chat.items():
        print(
            f"{name:16} {_median(runs, 'ttft_ms'):8.1f} {min(r.ttft_ms for r in runs):9.1f} "
            f"{_median(runs, 'total_ms'):9.1f} {_median(runs, 'tokens'):7.0f} "
            f"{_median(runs, 'tokens_per_s'):9.1f}"
        )
    print(
        "TTFT: request sent -> first text (WebRTC: first delta event; HTTP: first SSE chunk "
        "with content)."
    )

    rtc, sse = chat["WebRTC channel"], chat["HTTP SSE"]
    ttft_r, ttft_h = _median(rtc, "ttft_ms"), _median(sse, "ttft_ms")
    verdict = "PASS" if p50 < TARGET_P50_MS else "FAIL"
    print("\nResults")
    print(
        f"{verdict}  offer -> channel open p50 {p50:.1f} ms (target < {TARGET_P50_MS:.0f} ms); "
        f"p95 {p95:.1f} ms, max {max(open_ms):.1f} ms"
    )
    print(
        f"INFO  chat TTFT: WebRTC {ttft_r:.1f} ms, HTTP SSE {ttft_h:.1f} ms "
        f"({ttft_r - ttft_h:+.1f} ms); tokens/s WebRTC {_median(rtc, 'tokens_per_s'):.1f}, "
        f"HTTP SSE {_median(sse, 'tokens_per_s'):.1f}"
    )
