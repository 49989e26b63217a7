"""HTTP overhead: TabAgent's API stack vs a bare aiohttp app, same routes, same run.

What TabAgent adds to every request (request ids, error mapping, Prometheus metrics, the
Host/Origin/API-key checks, pydantic parsing and serialisation) is measured as the gap to
``bench.bare_server`` on two routes: ``GET /v1/health`` and ``POST /v1/system/log-level``
with a small JSON body. Per server, route and round:

* **saturated**: ``wrk -t1 -c32`` (closed loop) - the most requests per second the server
  answers on one core;
* **1,000 req/s**: an open-loop fixed-rate client (bench.openloop) - p50/p99 at a realistic
  rate, latency counted from each request's scheduled send time (no coordinated omission).

The bare health route answers ``{"status": "ok"}``, while TabAgent's reports every component
(~300 bytes): part of the gap is that bigger answer, not our stack. So a third row, "same
answer", has the bare app serve TabAgent's own health document (``/v1/health/same``, serialised
per request): the like-for-like view. The issue's target is judged on the first two.

Both servers run at once, pinned to the same core (the load generators to the other). Within a
round the two servers' runs of one route and load are back to back (which goes first alternates),
so "% of bare" is a median of paired ratios; other columns are medians over rounds. The server's
CPU time per request is shown too: on a shared host it moves less than req/s does.

* **side by side**: each round also loads both servers at the same moment, one ``wrk`` each,
  for the same seconds on the same core, and compares the CPU time each spends per request.
  At saturation throughput is the inverse of that, so bare's CPU per request over TabAgent's is
  TabAgent's throughput as a share of bare's. On a VM whose speed drifts by tens of percent
  from one second to the next, back-to-back pairs swing with it (77%-94% for one route in one
  run); measured over the same seconds, both servers see the same machine, and the ratio holds
  within a few percent (two identical TabAgent servers: 98%-102%).

Targets: p99 <= 5 ms at 1,000 req/s, and TabAgent's saturated throughput >= 85% of bare's,
judged side by side (the back-to-back ratio is printed beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from bench import harness, openloop, wrk

FIXED_RATE = 1000.0
P99_TARGET_MS = 5.0
THROUGHPUT_TARGET = 0.85
QUIET_CORES = 0.1  # foreign CPU above this (in cores) marks a measurement as noisy
SATURATED, FIXED = "saturated", "1,000 req/s"


@dataclass(frozen=True)
class Route:
    label: str
    method: str
    path: str
    body: str | None = None
    bare_path: str | None = None  # where the bare app serves it, when not at ``path``
    fixed_rate: bool = True  # also measured at 1,000 req/s


ROUTES = (
    Route("GET /v1/health", "GET", "/v1/health"),
    Route("POST /v1/system/log-level", "POST", "/v1/system/log-level", '{"level":"WARNING"}'),
)
SAME_ANSWER = Route(
    "GET /v1/health same answer", "GET", "/v1/health", bare_path="/v1/health/same", fixed_rate=False
)
MEASURED = (*ROUTES, SAME_ANSWER)
SERVERS = ("bare aiohttp", "TabAgent")


@dataclass(frozen=True)
class Server:
    port: int
    pid: int
    bare: bool

    def path(self, route: Route) -> str:
        return route.bare_path if self.bare and route.bare_path else route.path


@dataclass(frozen=True)
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    foreign_cores: float
    cpu_us_per_req: float = 0.0  # saturated only: server CPU per request, robust to noise
    send_lag_p99_ms: float = 0.0  # open loop only


Key = tuple[str, str, str]  # (server, route label, load)
Shares = dict[str, list[float]]  # route label -> TabAgent's share of bare's, side by side


@dataclass
class Plan:
    rounds: int
    saturated_s: float
    fixed_s: float
    retries: int  # re-takes of a measurement that other processes disturbed (after quiet)

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> Plan:
        if args.quick:
            return cls(rounds=1, saturated_s=2, fixed_s=2, retries=0)
        return cls(rounds=5, saturated_s=4, fixed_s=3, retries=2)


def _measure_saturated(
    server: Server, route: Route, seconds: float, cpus: harness.CpuPlan
) -> Sample:
    probe = harness.ForeignLoad()
    cpu_before = harness.cpu_seconds(server.pid)
    got = wrk.run(
        f"http://127.0.0.1:{server.port}{server.path(route)}",
        duration_s=seconds,
        method=route.method,
        body=route.body,
        cpu_prefix=cpus.prefix(cpus.client),
    )
    cpu_us = (harness.cpu_seconds(server.pid) - cpu_before) / got.requests * 1e6
    if got.errors:
        raise RuntimeError(f"wrk saw {got.errors} errors on :{server.port} {route.label}")
    return Sample(got.rps, got.p50_ms, got.p99_ms, probe.cores(), cpu_us_per_req=cpu_us)


@dataclass(frozen=True)
class Share:
    """Side by side: bare's CPU per request over TabAgent's, and the foreign load meanwhile."""

    value: float
    foreign_cores: float


def _measure_side_by_side(
    servers: dict[str, Server], route: Route, seconds: float, cpus: harness.CpuPlan
) -> Share:
    """Both servers loaded at once on the same core: bare's CPU per request over TabAgent's."""
    probe = harness.ForeignLoad()
    pair = [servers[name] for name in SERVERS]
    loads = [
        wrk.Load(f"http://127.0.0.1:{s.port}{s.path(route)}", route.method, route.body)
        for s in pair
    ]
    before = [harness.cpu_seconds(s.pid) for s in pair]
    got = wrk.together(loads, duration_s=seconds, cpu_prefix=cpus.prefix(cpus.client))
    if any(r.errors or not r.requests for r in got):
        raise RuntimeError(f"wrk saw errors or no answers side by side on {route.label}")
    bare, ours = (
        (harness.cpu_seconds(s.pid) - b) / r.requests
        for s, b, r in zip(pair, before, got, strict=True)
    )
    return Share(bare / ours, probe.cores())


def _measure_fixed(server: Server, route: Route, seconds: float) -> Sample:
    probe = harness.ForeignLoad()
    got = openloop.run(
        f"http://127.0.0.1:{server.port}{server.path(route)}",
        rate=FIXED_RATE,
        duration_s=seconds,
        method=route.method,
        body=route.body.encode() if route.body is not None else None,
    )
    if got.errors:
        raise RuntimeError(f"open-loop client saw {got.errors} errors on {route.label}")
    lag = got.send_lag_p99_ms
    return Sample(got.achieved_rps, got.p50_ms, got.p99_ms, probe.cores(), send_lag_p99_ms=lag)


def _start_servers(
    stack: contextlib.ExitStack, home: Path, cpus: harness.CpuPlan
) -> dict[str, Server]:
    """Both servers, ready, on the server core; stopped (SIGTERM) when ``stack`` closes.

    TabAgent starts first: its health answer, once ready, is the bare app's "same answer"."""
    pin = cpus.prefix(cpus.server)
    env = harness.isolated_env(home)
    bare, ours = harness.free_port(), harness.free_port()
    ours_argv = [*pin, harness.venv_bin("tabagent-server"), "--mode", "http"]
    ours_argv += ["--port", str(ours), "--log-level", "warning"]
    ours_proc = stack.enter_context(
        harness.server(
            ours_argv, f"http://127.0.0.1:{ours}/v1/health", env=env, ready=harness.status_ok
        )
    )
    document = home / "health.json"
    document.write_bytes(harness.get(f"http://127.0.0.1:{ours}/v1/health")[1])
    bare_argv = [*pin, sys.executable, "-m", "bench.bare_server", "--port", str(bare)]
    bare_argv += ["--health-document", str(document)]
    bare_proc = stack.enter_context(
        harness.server(bare_argv, f"http://127.0.0.1:{bare}/v1/health/same", env=env)
    )
    return {
        "bare aiohttp": Server(bare, bare_proc.pid, bare=True),
        "TabAgent": Server(ours, ours_proc.pid, bare=False),
    }


Taken = TypeVar("Taken", Sample, Share)


def _quietest(take: Callable[[], Taken], plan: Plan) -> Taken:
    """A sample; while other processes disturbed it, wait for quiet and take it again.

    The machine may be shared (other benchmarks, builds): a server that loses its core for a
    few milliseconds shows it straight in p99, so the least disturbed attempt is kept.
    """
    best = take()
    for _ in range(plan.retries):
        if best.foreign_cores <= QUIET_CORES:
            break
        harness.wait_for_quiet(QUIET_CORES, max_wait_s=30)
        again = take()
        if again.foreign_cores < best.foreign_cores:
            best = again
    return best


def measure(plan: Plan, cpus: harness.CpuPlan) -> tuple[dict[Key, list[Sample]], Shares]:
    samples: dict[Key, list[Sample]] = {}
    shares: Shares = {}
    with (
        tempfile.TemporaryDirectory(prefix="tabagent-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        servers = _start_servers(stack, Path(tmp), cpus)
        for server in servers.values():  # warm-up: imports, caches, connection setup
            for route in ROUTES:
                _measure_saturated(server, route, 1, cpus)
        for round_no in range(plan.rounds):
            # The two servers' runs of one route and load are back to back, so each round is a
            # pair measured under the same conditions (a shared host drifts over minutes).
            order = SERVERS if round_no % 2 == 0 else SERVERS[::-1]
            for route in MEASURED:
                for name in order:
                    sat = _quietest(
                        partial(_measure_saturated, servers[name], route, plan.saturated_s, cpus),
                        plan,
                    )
                    samples.setdefault((name, route.label, SATURATED), []).append(sat)
                share = _quietest(
                    partial(_measure_side_by_side, servers, route, plan.saturated_s, cpus), plan
                )
                shares.setdefault(route.label, []).append(share.value)
                for name in order if route.fixed_rate else ():
                    fixed = _quietest(
                        partial(_measure_fixed, servers[name], route, plan.fixed_s), plan
                    )
                    samples.setdefault((name, route.label, FIXED), []).append(fixed)
            print(f"  round {round_no + 1}/{plan.rounds} done", file=sys.stderr, flush=True)
    return samples, shares


def _median(values: list[Sample], field: str) -> float:
    return float(statistics.median(float(getattr(s, field)) for s in values))


def _pairs(samples: dict[Key, list[Sample]], route: str, field: str) -> list[float]:
    """TabAgent / bare per round, each pair measured back to back."""
    ours, bare = (
        samples[("TabAgent", route, SATURATED)],
        samples[("bare aiohttp", route, SATURATED)],
    )
    return [getattr(o, field) / getattr(b, field) for o, b in zip(ours, bare, strict=True)]


def _paired_ratio(samples: dict[Key, list[Sample]], route: str, field: str) -> float:
    return float(statistics.median(_pairs(samples, route, field)))


def report(
    samples: dict[Key, list[Sample]], shares: Shares, plan: Plan, cpus: harness.CpuPlan
) -> None:
    print(
        f"\nHTTP overhead: TabAgent vs bare aiohttp, medians of {plan.rounds} round(s); "
        f"saturated = wrk -t1 -c32 {plan.saturated_s:.0f} s, 1,000 req/s = open loop "
        f"{plan.fixed_s:.0f} s; {cpus.describe()}"
    )
    header = (
        f"{'server':13} {'route':27} {'load':12} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'% of bare':>9} {'side by side':>12} {'CPU us/req':>10} {'other CPU':>9}"
    )
    print(header)
    print("-" * len(header))
    for name in SERVERS:
        for route in MEASURED:
            for load in (SATURATED, FIXED) if route.fixed_rate else (SATURATED,):
                got = samples[(name, route.label, load)]
                ratio = side = cpu = ""
                if load == SATURATED:
                    cpu = f"{_median(got, 'cpu_us_per_req'):.0f}"
                    if name == "TabAgent":
                        ratio = f"{_paired_ratio(samples, route.label, 'rps'):.1%}"
                        side = f"{statistics.median(shares[route.label]):.1%}"
                other = max(s.foreign_cores for s in got)
                print(
                    f"{name:13} {route.label:27} {load:12} {_median(got, 'rps'):8.0f} "
                    f"{_median(got, 'p50_ms'):7.2f} {_median(got, 'p99_ms'):7.2f} {ratio:>9} "
                    f"{side:>12} {cpu:>10} {other:8.2f}{'*' if other > QUIET_CORES else ''}"
                )
    lag = max(
        s.send_lag_p99_ms for (_, _, load), got in samples.items() if load == FIXED for s in got
    )
    print(
        "% of bare: median over rounds of TabAgent/bare req/s, each pair run back to back.\n"
        "side by side: both servers loaded at once on one core; bare's CPU per request over "
        "TabAgent's (median over rounds).\n"
        "CPU us/req: the server process's CPU time per request under wrk (steadier than req/s "
        "when the machine is shared).\nother CPU: cores used by other processes in this machine "
        f"while measuring (worst round; * above {QUIET_CORES}: numbers skewed).\n"
        f"Open-loop generator's own send lag p99: {lag:.2f} ms worst (counted in p99)."
    )
    _verdicts(samples, shares)


def _spread(ratios: dict[str, list[float]]) -> str:
    return ", ".join(
        f"{k}: {statistics.median(v):.1%}, rounds {min(v):.0%}-{max(v):.0%}"
        for k, v in ratios.items()
    )


def _verdicts(samples: dict[Key, list[Sample]], shares: Shares) -> None:
    fixed = {r.label: samples[("TabAgent", r.label, FIXED)] for r in ROUTES}
    p99s = {label: _median(got, "p99_ms") for label, got in fixed.items()}
    sustained = all(_median(got, "rps") >= 0.98 * FIXED_RATE for got in fixed.values())
    p99_ok = sustained and all(v <= P99_TARGET_MS for v in p99s.values())
    side = {r.label: shares[r.label] for r in ROUTES}
    tput_ok = all(statistics.median(v) >= THROUGHPUT_TARGET for v in side.values())
    shown_p99 = ", ".join(f"{k}: {v:.2f} ms" for k, v in p99s.items())
    shown_side = _spread(side)
    shown_pairs = _spread({r.label: _pairs(samples, r.label, "rps") for r in ROUTES})
    same = _pairs(samples, SAME_ANSWER.label, "rps")
    same_side = shares[SAME_ANSWER.label]
    print("\nTargets")
    print(f"{'PASS' if p99_ok else 'FAIL'}  p99 ≤ 5 ms at 1,000 req/s (TabAgent {shown_p99})")
    print(
        f"{'PASS' if tput_ok else 'FAIL'}  TabAgent saturated throughput ≥ 85% of bare, side by "
        f"side ({shown_side})"
    )
    print(f"      (back to back, req/s: {shown_pairs})")
    print(
        f"info  same answer: TabAgent's GET /v1/health at {statistics.median(same_side):.1%} side "
        f"by side ({statistics.median(same):.1%} back to back) of a bare aiohttp app serving "
        "TabAgent's own health document: what the stack costs once the answers are equal"
    )


def run(args: argparse.Namespace) -> None:
    """Entry point for ``python -m bench http``."""
    plan = Plan.for_args(args)
    cpus = harness.CpuPlan.split()
    affinity = os.sched_getaffinity(0)
    cpus.pin_self()  # the open-loop client runs in this process, on the client core
    try:
        samples, shares = measure(plan, cpus)
    finally:
        os.sched_setaffinity(0, affinity)  # later benchmarks in this process get every core
    report(samples, shares, plan, cpus)
