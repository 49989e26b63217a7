"""Backup while writes go on, restore only after verification, refusal of bad archives."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from pathlib import Path

import pytest

from tabagent.errors import BadRequest, Conflict
from tabagent.storage.backup import restore, verify
from tabagent.storage.memory import Memory
from tabagent.storage.records import NewMessage, label_parts
from tabagent.storage.search import SearchQuery
from tests.helpers import MiniLM


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> MiniLM:
    return MiniLM(tmp_path_factory.mktemp("onnx"))


async def test_online_backup_is_one_consistent_instant_and_restores(
    tmp_path: Path, minilm: MiniLM
) -> None:
    memory = Memory(tmp_path / "db", embedder=minilm, sync_interval=0.1)
    await memory.open()
    await memory.add_messages("conv_a", [NewMessage(role="user", content="My dog's name is Rex.")])
    stop = asyncio.Event()
    written = 0

    async def writer() -> None:
        nonlocal written
        while not stop.is_set():
            await memory.add_messages(
                "conv_b", [NewMessage(role="user", content=f"note {written} about the garden")]
            )
            written += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(writer())
    await asyncio.sleep(0.5)
    info = await memory.backup(tmp_path / "backups")
    during = written
    with pytest.raises(Conflict, match="exists"):  # a backup never overwrites a file
        await memory.backup(Path(info.path))
    await asyncio.sleep(0.3)
    stop.set()
    await task
    await memory.close()
    assert during > 5  # writes went on around the backup
    assert written > during
    assert Path(info.path).suffix == ".tar"
    assert set(info.stores) == {
        "conversations", "knowledge", "tool_results", "experience", "summaries", "meta"
    }  # fmt: skip

    target = tmp_path / "restored"
    assert restore(Path(info.path), target, memory.versions) is None
    again = Memory(target, embedder=minilm)
    await again.open()
    try:
        conv = again.dbs["conversations"].reader()
        ids = {r[0] for r in conv.execute("SELECT id FROM messages")}
        assert 1 + 5 < len(ids) <= 1 + written
        labels = {label_parts(int(x)) for x in again.vectors.labels(minilm.model)}
        assert labels == {("message", i) for i in ids}  # no message without its vector
        hits = await again.search(SearchQuery("what is my dog called?", k=1))
        assert hits[0].text == "My dog's name is Rex."
    finally:
        await again.close()


async def test_restore_keeps_the_previous_databases_and_refuses_while_in_use(
    tmp_path: Path,
) -> None:
    db = tmp_path / "db"
    memory = Memory(db)
    await memory.open()
    await memory.add_messages("conv_1", [NewMessage(role="user", content="first")])
    info = await memory.backup(tmp_path / "one.tar")
    await memory.add_messages("conv_1", [NewMessage(role="user", content="second")])
    with pytest.raises(Conflict, match="in use"):
        restore(Path(info.path), db, memory.versions)
    await memory.close()

    previous = restore(Path(info.path), db, memory.versions)
    assert previous is not None
    assert previous.is_dir()
    reopened = Memory(db)
    await reopened.open()
    try:
        assert [m.content for m in await reopened.messages("conv_1")] == ["first"]
    finally:
        await reopened.close()


def _archive(path: Path, members: dict[str, bytes], manifest: dict[str, object]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in {"manifest.json": json.dumps(manifest).encode(), **members}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    ("members", "files", "message"),
    [
        ({"../evil.db": b"x"}, {"../evil.db": {"size": 1, "sha256": "0"}}, "outside"),
        ({"/etc/evil": b"x"}, {"/etc/evil": {"size": 1, "sha256": "0"}}, "outside"),
        ({"meta.db": b"x"}, {"meta.db": {"size": 1, "sha256": "0" * 64}}, "damaged"),
        ({}, {"meta.db": {"size": 1, "sha256": "0" * 64}}, "incomplete"),
        ({"extra.db": b"x"}, {}, "unexpected"),
    ],
)
def test_bad_archives_are_refused_before_anything_changes(
    tmp_path: Path, members: dict[str, bytes], files: dict[str, object], message: str
) -> None:
    archive = tmp_path / "bad.tar"
    manifest = {"format": "tabagent-memory-backup", "format_version": 1, "stores": {},
                "files": files}  # fmt: skip
    _archive(archive, members, manifest)
    db = tmp_path / "db"
    db.mkdir()
    (db / "keep.txt").write_text("live data")
    with pytest.raises(BadRequest, match=message):
        restore(archive, db, {"meta": 1})
    assert (db / "keep.txt").read_text() == "live data"
    assert not (tmp_path / "evil.db").exists()
    assert not [p for p in tmp_path.iterdir() if "restore" in p.name]  # staging removed


def test_something_that_is_not_a_backup_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file at all")
    with pytest.raises(BadRequest, match="not a TabAgent backup"):
        verify(junk, tmp_path / "out", {})
