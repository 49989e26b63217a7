"""Helpers every benchmark needs: free ports, CPU pinning, an isolated home, server processes.

Servers run as subprocesses (as users run them) pinned to their own core, so a load generator
in this process never competes with them for CPU; they are stopped with SIGTERM on every exit
path, errors included, so a failed benchmark leaves no server behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

Ready = Callable[[bytes], bool]


def free_port() -> int:
    """A loopback port free right now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def venv_bin(name: str) -> str:
    """A console script installed beside this interpreter (``.venv/bin/<name>``)."""
    return str(Path(sys.executable).parent / name)


def isolated_env(home: Path) -> dict[str, str]:
    """os.environ with HOME and every XDG folder inside ``home``: real user data is never read."""
    env = dict(os.environ)
    env["HOME"] = str(home)
    for var, sub in (
        ("XDG_DATA_HOME", "data"),
        ("XDG_STATE_HOME", "state"),
        ("XDG_CACHE_HOME", "cache"),
        ("XDG_CONFIG_HOME", "config"),
        ("XDG_RUNTIME_DIR", "run"),
    ):
        folder = home / sub
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)  # platformdirs ignores a runtime dir others can read (XDG spec)
        env[var] = str(folder)
    for var in [v for v in env if v.startswith("TABAGENT_")]:
        del env[var]  # the benchmark states every setting it relies on
    return env


@dataclass(frozen=True)
class CpuPlan:
    """Which core runs the server and which the load generator (None: no pinning possible)."""

    server: int | None
    client: int | None

    @classmethod
    def split(cls) -> CpuPlan:
        """First allowed core to the server, the next to the client; the same for every server."""
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2 or shutil.which("taskset") is None:
            return cls(None, None)
        return cls(cores[0], cores[1])

    def prefix(self, cpu: int | None) -> list[str]:
        """``taskset -c N`` for a command line, or nothing."""
        return [] if cpu is None else ["taskset", "-c", str(cpu)]

    def pin_self(self) -> None:
        """Run this process (the in-process load generator) on the client core."""
        if self.client is not None:
            os.sched_setaffinity(0, {self.client})

    def describe(self) -> str:
        if self.server is None:
            return "not pinned (fewer than 2 cores or no taskset)"
        return f"server on CPU {self.server}, load generator on CPU {self.client}"


def get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return int(response.status), bytes(response.read())


def status_ok(body: bytes) -> bool:
    """Ready predicate for ``/v1/health``: every component up and done with its start-up work
    (memory's vector index open, hardware detected), so none of it runs while we measure."""
    try:
        health = json.loads(body)
        components = health.get("components", {})
        memory = components.get("memory", {}).get("detail", "")
        hardware = components.get("hardware", {}).get("detail", "")
        return bool(
            health.get("status") == "ok" and "opening" not in memory and hardware != "detecting"
        )
    except (ValueError, AttributeError):
        return False


def wait_ready(proc: subprocess.Popen[bytes], url: str, ready: Ready, timeout: float) -> None:
    """Poll ``url`` until ``ready(body)``; fail fast if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with status {proc.returncode}")
        try:
            status, body = get(url)
            if status == 200 and ready(body):
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM (graceful shutdown, children stopped by the server), SIGKILL as a last resort."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def server(
    argv: list[str],
    health_url: str,
    *,
    env: dict[str, str] | None = None,
    ready: Ready = lambda _body: True,
    timeout: float = 60.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """A server subprocess that is ready on entry and stopped with SIGTERM on exit.

    Its stderr goes to a temporary file, not a pipe: a pipe nobody reads would fill up and
    stall the server mid-benchmark. The file's tail is shown if the server fails to start.
    """
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors
        )
        try:
            try:
                wait_ready(proc, health_url, ready, timeout)
            except (RuntimeError, TimeoutError) as exc:
                stop(proc)
                errors.seek(0)
                tail = errors.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{exc}\n{' '.join(argv)}\n{tail}") from None
            yield proc
        finally:
            stop(proc)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (its children not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_jiffies() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, user+system clock ticks) for every process we can read."""
    table: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        fields = raw[raw.rindex(")") + 2 :].split()  # the name may contain spaces
        table[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def _descendants(table: dict[int, tuple[int, int]], root: int) -> set[int]:
    ours = {root}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in table.items() if ppid in ours} - ours
        ours |= more
        grew = bool(more)
    return ours


class ForeignLoad:
    """CPU that processes outside this benchmark's own tree used over a window, in cores.

    The benchmark owns the machine's cores (one server, one generator); anything else running
    (another benchmark, a build) skews the numbers, so each measurement reports it and the
    runner can wait for a quiet machine first.
    """

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._before = self._foreign()

    @staticmethod
    def _foreign() -> dict[int, int]:
        table = _cpu_jiffies()
        ours = _descendants(table, os.getpid())
        return {pid: ticks for pid, (_, ticks) in table.items() if pid not in ours}

    def cores(self) -> float:
        """Average number of cores used by foreign processes since construction."""
        after = self._foreign()
        ticks = sum(t - self._before.get(pid, 0) for pid, t in after.items())
        elapsed = max(1e-3, time.monotonic() - self._start)
        return max(0.0, ticks / os.sysconf("SC_CLK_TCK") / elapsed)


def wait_for_quiet(threshold: float = 0.1, max_wait_s: float = 120.0) -> float:
    """Wait (1 s samples) until foreign processes use under ``threshold`` cores; return last."""
    deadline = time.monotonic() + max_wait_s
    while True:
        probe = ForeignLoad()
        time.sleep(1.0)
        load = probe.cores()
        if load < threshold or time.monotonic() >= deadline:
            return load
