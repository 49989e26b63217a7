"""Streaming generation: TabAgent over HTTP vs llama-cpp-python in-process vs llama_cpp.server.

Same model (the embedded SmolLM2-135M GGUF), same prompt, same threads, greedy decoding, same
number of tokens; each peer measured in the same run, alternating rounds, medians reported.

* TTFT: from sending the request (or calling the library) to the first text.
* tokens/s: decode rate, (tokens - 1) / (last token time - first token time).

Targets (issue 3): TabAgent >= 95% of direct tokens/s, TTFT overhead <= 15 ms, and >= 1.0x
llama_cpp.server's tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ml_service.backends.llama import physical_cores, smollm2_path

PROMPT = (
    "<|im_start|>user\nWrite a long story about a lighthouse keeper and the sea.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
N_CTX = 2048


@dataclass
class Sample:
    ttft_ms: float
    tokens: int
    tokens_per_s: float
    events: int  # pieces of text received (a stream may carry several tokens in one)


def decode_sample(start: float, stamps: list[float], tokens: int | None = None) -> Sample:
    """``stamps``: when each piece of text arrived; ``tokens``: how many tokens they held in all,
    when the stream says (a server may send several tokens in one event), else one per stamp.
    The first piece is one token (sent as soon as it exists), so the decode rate is the other
    tokens over the time from the first piece to the last."""
    tokens = tokens or len(stamps)
    if len(stamps) < 2 or tokens < 2:
        raise RuntimeError("fewer than two tokens generated")
    decode = stamps[-1] - stamps[0]
    return Sample((stamps[0] - start) * 1000, tokens, (tokens - 1) / decode, len(stamps))


def direct_runner(tokens: int, threads: int) -> Callable[[], Sample]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=smollm2_path(), n_ctx=N_CTX, n_threads=threads, verbose=False)

    def run() -> Sample:
        start = time.perf_counter()
        stamps = []
        for part in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, stream=True):
            if part["choices"][0]["text"]:
                stamps.append(time.perf_counter())
        return decode_sample(start, stamps)

    return run


def http_runner(port: int, tokens: int, model: str) -> Callable[[], Sample]:
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})  # fmt: skip
    headers = {"Content-Type": "application/json"}

    def run() -> Sample:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        start = time.perf_counter()
        stamps = []
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{port}: HTTP {response.status} {response.read()[:200]!r}")
        produced = None
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0].get("text"):
                stamps.append(time.perf_counter())
            if event.get("usage"):
                produced = event["usage"]["completion_tokens"]
        conn.close()
        return decode_sample(start, stamps, produced)

    return run


def _wait(url: str, proc: subprocess.Popen[bytes], seconds: float = 60) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


@contextmanager
def _process(args: list[str], health: str, env: dict[str, str] | None = None) -> Iterator[None]:
    proc = subprocess.Popen(
        args,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(health, proc)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(args: argparse.Namespace) -> None:
    tokens = 48 if args.quick else 256
    rounds = 2 if args.quick else 9
    threads = physical_cores()
    home = tempfile.mkdtemp(prefix="tabagent-bench-")
    ours, theirs = _free_port(), _free_port()
    server_bin = os.path.join(os.path.dirname(sys.executable), "tabagent-server")
    env = {"HOME": home, "XDG_DATA_HOME": f"{home}/data", "XDG_STATE_HOME": f"{home}/state",
           "XDG_RUNTIME_DIR": home, "TABAGENT_N_CTX": str(N_CTX),
           "TABAGENT_N_THREADS": str(threads), "TABAGENT_LOG_LEVEL": "WARNING"}  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.enter_context(_process([server_bin, "--mode", "http", "--port", str(ours)],
                                     f"http://127.0.0.1:{ours}/v1/health", env))  # fmt: skip
        stack.enter_context(_process(
            [sys.executable, "-m", "llama_cpp.server", "--model", smollm2_path(),
             "--n_ctx", str(N_CTX), "--n_threads", str(threads), "--port", str(theirs),
             "--host", "127.0.0.1"], f"http://127.0.0.1:{theirs}/v1/models"))  # fmt: skip
        runners = {
            "llama-cpp-python in-process": direct_runner(tokens, threads),
            "TabAgent HTTP (SSE)": http_runner(ours, tokens, "smollm2-135m-instruct"),
            "llama_cpp.server HTTP (SSE)": http_runner(theirs, tokens, "x"),
        }
        samples = _collect(runners, rounds)
    report(samples, tokens, threads)


def _collect(runners: dict[str, Callable[[], Sample]], rounds: int) -> dict[str, list[Sample]]:
    """Each round runs every peer once, in turn: the machine's speed drifts over minutes here,
    and alternating puts each peer in the same conditions. A peer idle between its turns uses no
    CPU (llama.cpp's OpenMP threads sleep once their short spin ends)."""
    for run in runners.values():
        run()  # warm-up: model load, prompt cache
    samples: dict[str, list[Sample]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            samples[name].append(run())
    return samples


def _paired(samples: dict[str, list[Sample]], peer: str, base: str) -> float:
    """Median over rounds of peer/base tokens/s within the same round: the machine's speed
    drifts between rounds, and a ratio of two peers measured seconds apart cancels it."""
    pairs = zip(samples[peer], samples[base], strict=True)
    return statistics.median(p.tokens_per_s / b.tokens_per_s for p, b in pairs)


def report(samples: dict[str, list[Sample]], tokens: int, threads: int) -> None:
    direct = "llama-cpp-python in-process"
    ttfts = {name: statistics.median(s.ttft_ms for s in got) for name, got in samples.items()}
    print(f"\nStreaming generation, SmolLM2-135M Q4_1, {tokens} tokens, {threads} threads, greedy")
    columns = f"{'TTFT ms':>9} {'tokens/s':>9} {'vs direct':>10} {'runs tok/s':>11}"
    columns += f" {'tokens':>7} {'events':>7}"
    print(f"{'peer':32} {columns}")
    for name, got in samples.items():
        rates = [s.tokens_per_s for s in got]
        counted = statistics.median(s.tokens for s in got)
        events = statistics.median(s.events for s in got)
        spread = f"{min(rates):.0f}-{max(rates):.0f}"
        print(
            f"{name:32} {ttfts[name]:9.1f} {statistics.median(rates):9.1f} "
            f"{_paired(samples, name, direct):9.1%} {spread:>11} {counted:7.0f} {events:7.0f}"
        )
    print(
        "tokens: as the stream's usage counts them (one per event where it gives no usage);\n"
        "events: pieces of text received (TabAgent sends at most one every 40 ms: tokens made\n"
        "faster travel together). tokens/s = (tokens - 1) / (last event - first event), median\n"
        "of the runs; vs direct: median of the per-round ratios (peers take turns each round);\n"
        "runs tok/s: slowest-fastest run."
    )
    ours, theirs = "TabAgent HTTP (SSE)", "llama_cpp.server HTTP (SSE)"
    vs_direct, vs_theirs = _paired(samples, ours, direct), _paired(samples, ours, theirs)
    overhead = ttfts[ours] - ttfts[direct]
    checks = [
        (f"TabAgent tokens/s >= 95% of direct (is {vs_direct:.1%})", vs_direct >= 0.95),
        (f"TTFT overhead <= 15 ms (is {overhead:.1f} ms)", overhead <= 15),
        (f"TabAgent >= 1.0x llama_cpp.server tokens/s (is {vs_theirs:.2f}x)", vs_theirs >= 1.0),
    ]
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
