"""The installed ``tabagent-server`` started the way Chrome starts a native host, and a client
that speaks Chrome's frames to it (used by the tests and ``bench native``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabagent.native_messaging.codec import Reassembler, dumps, frame
from tabagent.native_messaging.manifest import DEV_EXTENSION_ID
from tests.envelope_client import EnvelopeClient
from tests.helpers import SERVER_BIN

ORIGIN = f"chrome-extension://{DEV_EXTENSION_ID}/"


@dataclass
class Host(EnvelopeClient):
    proc: asyncio.subprocess.Process
    stderr_path: Path
    raw_frames: list[bytes] = field(default_factory=list)  # every frame read from stdout
    _assembler: Reassembler = field(default_factory=Reassembler)

    async def send(self, message: Mapping[str, Any]) -> None:
        await self.send_raw(frame(dumps(dict(message)).encode()))

    async def send_request(self, message: Mapping[str, Any]) -> None:
        await self.send(message)

    async def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        await self.proc.stdin.drain()

    async def recv(self, within: float = 60) -> dict[str, Any]:
        """The next whole message (chunks reassembled)."""
        assert self.proc.stdout is not None
        while True:
            header = await asyncio.wait_for(self.proc.stdout.readexactly(4), within)
            (length,) = struct.unpack("=I", header)
            body = await asyncio.wait_for(self.proc.stdout.readexactly(length), within)
            self.raw_frames.append(header + body)
            message = self._assembler.add(json.loads(body))
            if message is not None:
                return message

    async def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await self.proc.stdin.wait_closed()

    async def wait(self, within: float = 30) -> int:
        return await asyncio.wait_for(self.proc.wait(), within)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


async def start_host(
    env: Mapping[str, str] | None = None,
    *,
    log_dir: Path | None = None,
    stdin: Any = asyncio.subprocess.PIPE,
    args: tuple[str, ...] = (ORIGIN,),
    program: str = SERVER_BIN,
) -> Host:
    """``tabagent-server chrome-extension://<id>/`` with pipes, as the browser starts it
    (``program``: another build of it, the frozen binary say)."""
    log_dir = log_dir or Path(os.environ.get("HOME", "/tmp"))
    log_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = log_dir / f"host-{os.urandom(4).hex()}.stderr"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            program,
            *args,
            stdin=stdin,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, **(env or {})},
            limit=8 << 20,
        )
    return Host(proc, stderr_path)


@contextlib.asynccontextmanager
async def native_host(env: Mapping[str, str] | None = None, **kwargs: Any) -> AsyncIterator[Host]:
    host = await start_host(env, **kwargs)
    try:
        yield host
    finally:
        if host.proc.returncode is None:
            with contextlib.suppress(Exception):
                await host.close_stdin()
            try:
                await host.wait(20)
            except TimeoutError:
                host.proc.kill()
                await host.proc.wait()
