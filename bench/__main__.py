"""``python -m bench [NAME ...|all] [--quick]``: run benchmarks, print their tables.

Each benchmark is a module with ``run(args)``; add one by adding a line to BENCHMARKS.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, what it compares)
BENCHMARKS = {
    "chat": (
        "bench.chat",
        "streaming chat: HTTP vs llama-cpp-python in-process vs llama_cpp.server",
    ),
    "grpc": ("bench.grpc_rtt", "unary gRPC round trip main <-> ML worker"),
    "embeddings": ("bench.embeddings", "embeddings sentences/s: HTTP vs onnxruntime direct"),
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
    for name in names:
        module = importlib.import_module(BENCHMARKS[name][0])
        module.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
