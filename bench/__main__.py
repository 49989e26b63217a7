"""``python -m bench [NAME ...|all] [--quick]``: run benchmarks, print their tables.

Each benchmark is a module with ``run(args)``; add one by adding a line to BENCHMARKS.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

# name -> (module, what it compares)
BENCHMARKS = {
    "http": ("bench.http_overhead", "API overhead: /v1/health and a JSON POST vs bare aiohttp"),
    "chat": (
        "bench.chat",
        "streaming chat: HTTP vs llama-cpp-python in-process vs llama_cpp.server",
    ),
    "grpc": ("bench.grpc_rtt", "unary gRPC round trip main <-> ML worker"),
    "downloads": ("bench.downloads", "model downloads: ours vs hf_hub_download, resume after kill"),
    "embeddings": ("bench.embeddings", "embeddings sentences/s: HTTP vs onnxruntime direct"),
    "vectors": ("bench.vectors", "hnswlib recall and speed vs numpy brute force and LanceDB"),
    "memory": ("bench.memory", "memory writes/reads/hybrid search vs raw sqlite3"),
    "native": (
        "bench.native",
        "native messaging: round trip and messages/s; chat TTFT native vs HTTP SSE",
    ),
    "binary": ("bench.binary", "single binary: cold start and first token vs the virtualenv; size"),
    "hardware": ("bench.hardware", "cold hardware detection vs py-cpuinfo's get_cpu_info()"),
    "webrtc": (
        "bench.webrtc",
        "WebRTC: offer to open data channel p50/p95; chat TTFT over the data channel vs HTTP SSE",
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks to run, or 'all'")
    parser.add_argument("--quick", action="store_true", help="shorter runs (smoke test)")
    args = parser.parse_args(argv)
    if not args.names:
        for name, (_, what) in BENCHMARKS.items():
            print(f"{name:12} {what}")
        return 0
    names = list(BENCHMARKS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    failed = []
    for name in names:
        # One broken benchmark (a missing model, a port in use) must not hide the others' tables.
        try:
            module = importlib.import_module(BENCHMARKS[name][0])
            module.run(args)
        except Exception as exc:
            failed.append(name)
            traceback.print_exc()
            print(f"\n{name}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
