"""Real headless Chromium for tests, driven over the DevTools protocol (CDP) with aiohttp.

No Selenium, no Playwright: ``chromium --remote-debugging-port=0`` prints its DevTools websocket
URL on stderr and we talk CDP over that socket with aiohttp's client. The browser runs with the
network cut off: every host name but loopback fails to resolve and anything that would leave the
machine goes to a proxy on a closed port. A ``Page`` records every request it (and its workers)
made, every failed load and every console error, so a test can assert what the page fetched.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

DEBIAN_PACKAGES = "chromium chromium-driver"
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")
# Closed port: whatever is not loopback and still gets past the resolver rules dies here.
_DEAD_PROXY = "127.0.0.1:9"
_NETWORK_SCHEMES = frozenset({"http", "https", "ws", "wss"})


def chromium_binary() -> str:
    """The Chromium executable, or a test failure that says which Debian packages to install."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "headless Chromium is required for the browser tests but `chromium` is not on PATH: "
        f"install the Debian packages `{DEBIAN_PACKAGES}` (sudo apt-get install {DEBIAN_PACKAGES},"
        " or scripts/setup.sh --dev)",
        pytrace=False,
    )


def offline_flags() -> list[str]:
    """Flags that leave Chromium able to reach loopback and nothing else."""
    return [
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
        f"--proxy-server=http://{_DEAD_PROXY}",
        # Chromium bypasses the proxy for loopback by default; say so explicitly all the same.
        "--proxy-bypass-list=127.0.0.1;localhost",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--no-pings",
        "--disable-quic",
    ]


class CDPError(RuntimeError):
    pass


@dataclass
class Page:
    """One tab, attached over a flat CDP session; its workers are auto-attached as well."""

    browser: Browser
    session_id: str
    requests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    bad_status: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _inflight: set[tuple[str, str]] = field(default_factory=set)
    _last_activity: float = field(default_factory=time.monotonic)

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, session_id=self.session_id)

    async def goto(self, url: str) -> None:
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigation to {url} failed: {result['errorText']}")

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(
        self,
        expression: str,
        predicate: Callable[[Any], bool] = bool,
        within: float = 20.0,
        what: str = "condition",
    ) -> Any:
        """Poll ``expression`` in the page until ``predicate`` holds for its value: no fixed sleep
        decides the outcome, only the deadline does. An uncaught exception in the page fails at
        once (a docs page that throws is broken whether or not it would render later)."""
        deadline = time.monotonic() + within
        value: Any = None
        while True:
            value = await self.evaluate(expression)
            if predicate(value):
                return value
            thrown = [e for e in self.errors if e.startswith("exception:")]
            if thrown or time.monotonic() > deadline:
                why = "the page threw" if thrown else f"not met after {within} s"
                raise AssertionError(
                    f"{what}: {why}; last value: {str(value)[:2000]}\n{self.report()}"
                )
            await asyncio.sleep(0.05)

    async def wait_network_idle(self, quiet: float = 0.3, within: float = 10.0) -> None:
        """Wait until no request is in flight and none started for ``quiet`` seconds."""
        deadline = time.monotonic() + within
        while self._inflight or time.monotonic() - self._last_activity < quiet:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"network not idle after {within} s: {sorted(self._inflight)}\n{self.report()}"
                )
            await asyncio.sleep(0.05)

    def report(self) -> str:
        return (
            f"requests: {self.requests}\nfailed: {self.failed}\n"
            f"bad status: {self.bad_status}\nconsole errors: {self.errors}"
        )

    def on_event(self, session_id: str, method: str, params: dict[str, Any]) -> None:
        key = (session_id, str(params.get("requestId", "")))
        if method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            self.requests.append(url)
            if urlsplit(url).scheme in _NETWORK_SCHEMES:  # blob: and data: never "finish"
                self._inflight.add(key)
            self._last_activity = time.monotonic()
        elif method == "Network.responseReceived":
            response = params["response"]
            if response["status"] >= 400:
                self.bad_status.append(f"{response['status']} {response['url']}")
        elif method == "Network.loadingFinished":
            self._inflight.discard(key)
            self._last_activity = time.monotonic()
        elif method == "Network.loadingFailed":
            self._inflight.discard(key)
            self._last_activity = time.monotonic()
            blocked = params.get("blockedReason")
            self.failed.append(
                f"{params.get('errorText')} ({params.get('type')})"
                + (f" blocked: {blocked}" if blocked else "")
            )
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            description = details.get("exception", {}).get("description") or details.get("text")
            self.errors.append(f"exception: {description}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            args = [a.get("value", a.get("description", "")) for a in params["args"]]
            self.errors.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())


@dataclass
class Browser:
    ws: aiohttp.ClientWebSocketResponse
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _pages: dict[str, Page] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    log: deque[str] = field(default_factory=lambda: deque(maxlen=200))  # Chromium's stderr

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"id": next(self._ids), "method": method}
        message["params"] = params or {}
        if session_id:
            message["sessionId"] = session_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[message["id"]] = future
        await self.ws.send_str(json.dumps(message))
        reply = await asyncio.wait_for(future, timeout=30)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"])
        self._pages[page.session_id] = page
        await self._instrument(page.session_id, page=True)
        return page

    async def _instrument(self, session_id: str, page: bool) -> None:
        """Turn on the event domains a ``Page`` records, and auto-attach workers (paused, so none
        of their requests can slip by before Network is enabled on them)."""
        await self.send("Network.enable", session_id=session_id)
        await self.send("Runtime.enable", session_id=session_id)
        if page:
            await self.send("Page.enable", session_id=session_id)
            await self.send("Log.enable", session_id=session_id)
        await self.send(
            "Target.setAutoAttach",
            {"autoAttach": True, "waitForDebuggerOnStart": True, "flatten": True},
            session_id=session_id,
        )
        if not page:
            await self.send("Runtime.runIfWaitingForDebugger", session_id=session_id)

    async def _attach_child(self, page: Page, session_id: str) -> None:
        self._pages[session_id] = page
        with contextlib.suppress(CDPError):  # the worker may already be gone
            await self._instrument(session_id, page=False)

    async def read_loop(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            method, params = data.get("method", ""), data.get("params", {})
            page = self._pages.get(data.get("sessionId", ""))
            if page is None:
                continue
            if method == "Target.attachedToTarget":
                task = asyncio.create_task(self._attach_child(page, params["sessionId"]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            page.on_event(data["sessionId"], method, params)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CDPError("DevTools connection closed"))


def _cmdline(binary: str, profile: Path, extra: Sequence[str] = ()) -> list[str]:
    return [
        binary,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--mute-audio",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        *offline_flags(),
        *extra,
        "about:blank",
    ]


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Let Chromium exit, then TERM and KILL its process group (it leads one, by
    ``start_new_session``), so no zygote or renderer outlives the test."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(proc.wait(), timeout=5)
            break
        except TimeoutError:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children left behind, if any
    for _ in range(250):  # at most 5 s
        if not _alive_in_group(proc.pid):
            break
        await asyncio.sleep(0.02)


def _alive_in_group(pgid: int) -> list[int]:
    """Processes of group ``pgid`` not yet dead (zombies only wait for init to reap them)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            alive.append(int(entry))
    return alive


@contextlib.asynccontextmanager
async def chromium(
    startup: float = 30.0,
    extra_args: Sequence[str] = (),
    prepare_profile: Callable[[Path], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Browser]:
    """A headless Chromium with the network cut off, in a fresh profile removed on exit.

    ``prepare_profile`` gets the profile folder before the browser starts (to install a
    native-messaging host into it, say); ``env`` is the browser's environment (its native
    hosts inherit it)."""
    binary = chromium_binary()
    profile = Path(tempfile.mkdtemp(prefix="tabagent-chromium-"))
    if prepare_profile is not None:
        prepare_profile(profile)
    proc: asyncio.subprocess.Process | None = None
    drainer: asyncio.Task[None] | None = None
    stderr: deque[str] = deque(maxlen=200)
    try:
        proc = await asyncio.create_subprocess_exec(
            *_cmdline(binary, profile, extra_args),
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            limit=1 << 20,
        )
        listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        drainer = asyncio.create_task(_drain(proc, stderr, listening))
        try:
            url = await asyncio.wait_for(listening, timeout=startup)
        except TimeoutError:
            raise TimeoutError(
                f"chromium printed no DevTools URL in {startup} s:\n{''.join(stderr)}"
            ) from None
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, max_msg_size=0) as ws,
        ):
            browser = Browser(ws, log=stderr)
            reader = asyncio.create_task(browser.read_loop())
            try:
                yield browser
            finally:
                with contextlib.suppress(CDPError, TimeoutError, ConnectionError):
                    await asyncio.wait_for(browser.send("Browser.close"), timeout=5)
                await ws.close()
                for task in [reader, *browser._tasks]:
                    task.cancel()
                await asyncio.gather(reader, *browser._tasks, return_exceptions=True)
    finally:
        if proc is not None:
            await _stop(proc)
        if drainer is not None:  # stderr ends once every process of the group is gone
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drainer, timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


async def _drain(
    proc: asyncio.subprocess.Process, lines: deque[str], listening: asyncio.Future[str]
) -> None:
    """Read Chromium's stderr to the end (so it never blocks on a full pipe); the line
    "DevTools listening on ws://..." resolves ``listening``."""
    assert proc.stderr is not None
    async for raw in proc.stderr:
        line = raw.decode(errors="replace")
        lines.append(line)
        found = _LISTENING.search(line)
        if found and not listening.done():
            listening.set_result(found.group(1))
    if not listening.done():
        code = await proc.wait()
        listening.set_exception(
            RuntimeError(f"chromium exited with {code} before DevTools listened:\n{''.join(lines)}")
        )


def off_host(urls: list[str], allowed_netloc: str) -> list[str]:
    """The URLs that went anywhere but ``allowed_netloc`` (data:, blob: and about: stay local)."""
    local_schemes = {"data", "blob", "about"}
    strays = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme in local_schemes:
            continue
        if parts.scheme not in {"http", "https", "ws", "wss"} or parts.netloc != allowed_netloc:
            strays.append(url)
    return strays
