"""Both memory clients, opened the way the program opens them, for suites that run on each.

``local`` is ``Memory`` in this process; ``remote`` is the same ``Memory`` served by
``serve_database`` on a Unix socket with a fresh token, reached through ``RemoteMemory``, so
every call crosses the real wire (protobuf, token check, error metadata) and back.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from tabagent.storage.client import MemoryClient, RemoteMemory
from tabagent.storage.grpc_service import serve_database
from tabagent.storage.memory import Embedder, Memory

ClientKind = Literal["local", "remote"]


@contextlib.asynccontextmanager
async def serving(memory: Memory) -> AsyncIterator[tuple[str, str]]:
    """Serve ``memory`` on a Unix socket; yields (address, token).

    The socket goes in a short folder of its own: pytest's tmp_path can be longer than the
    ~100 bytes a socket path may have.
    """
    folder = Path(tempfile.mkdtemp(prefix="tabagent-db-"))
    address, token = f"unix://{folder / 'db.sock'}", secrets.token_urlsafe(32)
    server = await serve_database(memory, address, token)
    try:
        yield address, token
    finally:
        await server.stop(grace=None)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.asynccontextmanager
async def open_client(
    kind: ClientKind, root: Path, embedder: Embedder | None
) -> AsyncIterator[MemoryClient]:
    memory = Memory(root, embedder=embedder)
    await memory.open()
    try:
        if kind == "local":
            yield memory
            return
        async with serving(memory) as (address, token):
            client = await RemoteMemory.connect(address, token)
            try:
                yield client
            finally:
                await client.close()
    finally:
        await memory.close()
