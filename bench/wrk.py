"""Saturated (closed-loop) throughput with ``wrk``, parsed into numbers.

wrk is a C load generator: it can push far more requests than one Python server answers, so
its req/s is the server's ceiling, not the client's. A POST needs a Lua script that sets
method, body and headers; it is written to a temporary file for the run.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_COUNT_RE = re.compile(r"^\s*(\d+) requests in ", re.M)
_PCT_RE = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)
_NON_2XX_RE = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass(frozen=True)
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx answers plus socket errors; a valid run has none


def lua_script(method: str, body: str, content_type: str = "application/json") -> str:
    """The Lua that makes every wrk request a ``method`` with ``body``."""
    quoted = body.replace("\\", "\\\\").replace('"', '\\"')
    return (
        f'wrk.method = "{method}"\n'
        f'wrk.body = "{quoted}"\n'
        f'wrk.headers["Content-Type"] = "{content_type}"\n'
    )


def parse(output: str) -> WrkResult:
    """Req/s, p50 and p99 from ``wrk --latency`` output."""
    rps = _RPS_RE.search(output)
    count = _COUNT_RE.search(output)
    pcts = {q: float(v) * _UNITS_MS[u] for q, v, u in _PCT_RE.findall(output)}
    if rps is None or count is None or set(pcts) != {"50", "99"}:
        raise ValueError(f"cannot parse wrk output:\n{output}")
    errors = sum(int(n) for n in _NON_2XX_RE.findall(output))
    for match in _SOCKET_RE.findall(output):
        errors += sum(int(n) for n in match)
    return WrkResult(float(rps.group(1)), int(count.group(1)), pcts["50"], pcts["99"], errors)


@dataclass(frozen=True)
class Load:
    """What one wrk process asks for."""

    url: str
    method: str = "GET"
    body: str | None = None


def run(
    url: str,
    *,
    duration_s: float,
    connections: int = 32,
    method: str = "GET",
    body: str | None = None,
    cpu_prefix: list[str] | None = None,
) -> WrkResult:
    """One ``wrk -t1 -c<connections> -d<duration>s --latency`` run against ``url``."""
    (result,) = together(
        [Load(url, method, body)],
        duration_s=duration_s,
        connections=connections,
        cpu_prefix=cpu_prefix,
    )
    return result


def together(
    loads: list[Load],
    *,
    duration_s: float,
    connections: int = 32,
    cpu_prefix: list[str] | None = None,
) -> list[WrkResult]:
    """One wrk process per load, all started at once and run for the same seconds."""
    seconds = max(1, round(duration_s))
    base = [*(cpu_prefix or []), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        procs: list[subprocess.Popen[str]] = []
        outputs = []
        try:
            for i, load in enumerate(loads):
                argv = list(base)
                if load.method != "GET" or load.body is not None:
                    script = Path(tmp) / f"request{i}.lua"
                    script.write_text(lua_script(load.method, load.body or ""))
                    argv += ["-s", str(script)]
                procs.append(
                    subprocess.Popen(
                        [*argv, load.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                    )
                )
            for proc in procs:
                out, err = proc.communicate(timeout=seconds + 30)
                if proc.returncode != 0:
                    raise subprocess.CalledProcessError(proc.returncode, proc.args, out, err)
                outputs.append(out)
        finally:  # one failed: the others stop too, not load the servers on
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return [parse(out) for out in outputs]
