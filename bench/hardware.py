"""Hardware detection: how long a cold ``detect()`` takes, beside py-cpuinfo's own entry point.

Each sample is a fresh interpreter (nothing imported, nothing cached) that times only the call:
``tabagent.hardware.detect.detect()`` (CPU, RAM, OS, every GPU probe, NPUs, acceleration,
onnxruntime's providers and llama.cpp's GPU support), the server's variant that asks the worker
program for the last two instead of importing them (what ``tabagent-server`` does), and
``cpuinfo.get_cpu_info()``, the public call of the CPU library everyone reaches for, which
detects the CPU alone. The cached ``HardwareCache.get()`` is timed in-process. Target (issue 8):
cold detection < 300 ms.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TARGET_MS = 300.0

_SNIPPETS = {
    "detect() in-process": (
        "from tabagent.hardware.detect import detect",
        "detect()",
    ),
    "server (asks the worker)": (
        "from tabagent.app import server_hardware",
        "server_hardware().get()",
    ),
    "cpuinfo.get_cpu_info()": (
        "import cpuinfo",
        "cpuinfo.get_cpu_info()",
    ),
}


def _cold_ms(setup: str, call: str) -> float:
    code = (
        f"import time\n{setup}\nstart = time.perf_counter()\n{call}\n"
        "print((time.perf_counter() - start) * 1000)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return float(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> None:
    """Entry point for ``python -m bench hardware``."""
    from tabagent.hardware.detect import HardwareCache

    runs = 3 if args.quick else 7
    results = {
        name: [_cold_ms(*snippet) for _ in range(runs)] for name, snippet in _SNIPPETS.items()
    }
    cache = HardwareCache()
    cache.get()
    start = time.perf_counter()
    for _ in range(1000):
        cache.get()
    cached_us = (time.perf_counter() - start) * 1000  # seconds for 1000 calls -> us per call

    print(f"\nCold hardware detection, fresh interpreter per sample, {runs} samples")
    header = f"{'what':28} {'median ms':>10} {'min ms':>8} {'max ms':>8}"
    print(header)
    print("-" * len(header))
    for name, values in results.items():
        print(f"{name:28} {statistics.median(values):10.1f} {min(values):8.1f} {max(values):8.1f}")
    print(f"{'HardwareCache.get() (warm)':28} {cached_us / 1000:10.4f}   (in-process, cached)")
    cold = statistics.median(results["detect() in-process"])
    verdict = "PASS" if cold < TARGET_MS else "FAIL"
    print("\nResults")
    print(f"{verdict}  cold detect() median {cold:.1f} ms (target < {TARGET_MS:.0f} ms)")
    server = statistics.median(results["server (asks the worker)"])
    print(
        f"INFO  the server's detection takes {server:.0f} ms (a worker process starts once) "
        "and runs in the background at start-up"
    )
