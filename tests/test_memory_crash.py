"""Crash consistency: ``kill -9`` a writer process mid-loop, restart, check every invariant.

Three rounds on the same databases, each killed at a different moment (vector syncs run every
20 ms, so kills land inside LanceDB writes, outbox retirements and commits). After each restart:

- every acknowledged write is present, whole (a message with its content; a fact with its
  entity links) and has its vector;
- nothing is half-written: every stored message and fact has a vector, every vector has its
  row, the outboxes are empty, the hnswlib index holds exactly LanceDB's labels, and the keyword
  index exactly the messages.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tabagent.storage.memory import Memory
from tabagent.storage.records import label_parts, vector_label
from tests.helpers import MiniLM

ROOT = Path(__file__).resolve().parent.parent


def run_and_kill(root: Path, cache: Path, min_acks: int, rng: random.Random) -> list[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.memory_writer", str(root), str(cache)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    acks: list[str] = []
    try:
        ready = proc.stdout.readline()
        assert ready.strip() == "ready", ready
        target = min_acks + rng.randrange(min_acks)
        deadline = time.monotonic() + 90
        while len(acks) < target and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acks.append(line.rstrip("\n"))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # lines printed before the kill but not yet read were acknowledged too
    rest = proc.stdout.read()
    acks.extend(line for line in rest.splitlines() if line)
    proc.stdout.close()
    assert proc.stderr is not None
    errors = proc.stderr.read()
    proc.stderr.close()
    assert len(acks) >= min_acks, errors[-2000:]
    return acks


async def check(root: Path, minilm: MiniLM, acks: list[str]) -> None:
    memory = Memory(root, embedder=minilm)
    await memory.open()  # the recovery pass
    try:
        conv = memory.dbs["conversations"].reader()
        know = memory.dbs["knowledge"].reader()
        model = minilm.model
        for line in acks:
            kind, row_id, ref, text = line.split(" ", 3)
            if kind == "message":
                msg = await memory.message(int(row_id))
                assert (msg.conversation_id, msg.content) == (ref, text)
                assert msg.embedded
                assert memory.vectors.has(model, vector_label("message", int(row_id)))
            else:
                links = {
                    r[0]
                    for r in know.execute(
                        "SELECT entity_id FROM fact_entities WHERE fact_id = ?", (int(row_id),)
                    )
                }
                assert links == {int(e) for e in ref.split(",")}, line
                assert memory.vectors.has(model, vector_label("fact", int(row_id)))

        message_ids = {r[0] for r in conv.execute("SELECT id FROM messages")}
        fact_ids = {r[0] for r in know.execute("SELECT id FROM facts")}
        labels = {
            label_parts(int(label))
            for label in memory.vectors.labels(model)  # the index, which must equal LanceDB
        }
        assert labels == {("message", i) for i in message_ids} | {("fact", i) for i in fact_ids}
        assert conv.execute("SELECT count(*) FROM vector_outbox").fetchone()[0] == 0
        # the keyword index (its own file, fed from an outbox) holds exactly the messages
        index = memory.keywords.conn
        assert {r[0] for r in index.execute("SELECT rowid FROM messages_fts")} == message_ids
        assert memory.keywords.backlog() == 0
        assert know.execute("SELECT count(*) FROM vector_outbox").fetchone()[0] == 0
        assert memory.vectors.count(model) == len(labels)
        assert sorted(memory.vectors.stored_labels(model)) == sorted(memory.vectors.labels(model))
        dangling = know.execute(
            "SELECT count(*) FROM fact_entities fe LEFT JOIN entities e ON e.id = fe.entity_id"
            " WHERE e.id IS NULL"
        ).fetchone()[0]
        assert dangling == 0
    finally:
        await memory.close()


@pytest.mark.timeout(300)
async def test_every_acknowledged_write_survives_kill_9_whole(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cache = tmp_path_factory.mktemp("onnx")
    minilm = MiniLM(cache)
    root = tmp_path / "db"
    rng = random.Random(20261123)
    all_acks: list[str] = []
    for _ in range(3):
        acks = run_and_kill(root, cache, 60, rng)
        all_acks.extend(acks)
        await check(root, minilm, all_acks)
