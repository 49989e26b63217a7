"""A writer process for the crash test: ``python -m tests.memory_writer ROOT ONNX_CACHE``.

Writes forever (messages with embeddings, facts with entity links, from several concurrent
tasks so group commits and vector syncs overlap) and prints one line per acknowledged write:
``message <id> <conversation> <content>`` or ``fact <id> <entity ids,...> <text>``. The test
kills it with SIGKILL at a random moment and checks the acknowledged lines against what a
fresh ``Memory`` recovers.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tabagent.storage.memory import Memory
from tabagent.storage.records import NewMessage
from tests.helpers import MiniLM


async def messages(memory: Memory, worker: int) -> None:
    conv = f"conv_crash_{worker}"
    i = 0
    while True:
        i += 1
        text = f"worker {worker} message {i}: the {['cat', 'dog', 'bird'][i % 3]} sat down"
        (msg,) = await memory.add_messages(conv, [NewMessage(role="user", content=text)])
        print(f"message {msg.id} {conv} {text}", flush=True)


async def facts(memory: Memory) -> None:
    i = 0
    while True:
        i += 1
        a = await memory.upsert_entity(f"Person {i}", type="person")
        b = await memory.upsert_entity(f"City {i % 7}", type="city")
        text = f"Person {i} lives in City {i % 7}."
        fact = await memory.add_fact(text, entity_ids=[a.id, b.id])
        print(f"fact {fact.id} {a.id},{b.id} {text}", flush=True)


async def main(root: Path, cache: Path) -> None:
    memory = Memory(root, embedder=MiniLM(cache), sync_interval=0.02)
    await memory.open()
    print("ready", flush=True)
    await asyncio.gather(*(messages(memory, w) for w in range(3)), facts(memory))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
