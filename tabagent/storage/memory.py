"""Memory: the seven databases behind one async interface (the in-process database client).

Layout under the db path::

    conversations.db  knowledge.db  tool_results.db  experience.db  summaries.db  meta.db
    embeddings/lance/  (LanceDB tables, one per embedding model)
    embeddings/index/  (hnswlib snapshots, a cache rebuilt from LanceDB when stale)

Blocking work never runs on the event loop: writes go to the writer thread (group commit,
acknowledged after COMMIT), reads to a small thread pool with a read-only connection each, and
vectors move from each store's outbox to LanceDB on the sync thread. Opening runs the recovery
pass: migrations, the index brought in step with LanceDB, every outbox entry replayed, and rows
left behind by a cross-store delete swept. The server opens the vector half in the background
(importing LanceDB alone takes about two seconds): searches wait for it, writes do not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from tabagent.errors import BadRequest, Conflict, ServiceUnavailable, StorageError
from tabagent.storage.backup import BackupInfo, backup
from tabagent.storage.conversations import MIGRATIONS as CONVERSATIONS
from tabagent.storage.conversations import ConversationStore
from tabagent.storage.history import (
    EXPERIENCE_MIGRATIONS,
    SUMMARIES_MIGRATIONS,
    TOOL_RESULTS_MIGRATIONS,
    ExperienceStore,
    SummaryStore,
    ToolResultStore,
)
from tabagent.storage.keywords import KeywordIndex
from tabagent.storage.knowledge import MIGRATIONS as KNOWLEDGE
from tabagent.storage.knowledge import KnowledgeStore
from tabagent.storage.lock import DatabaseLock
from tabagent.storage.meta import MIGRATIONS as META
from tabagent.storage.meta import MetaStore
from tabagent.storage.records import (
    Conversation,
    Entity,
    Episode,
    Fact,
    Graph,
    Message,
    NewMessage,
    Relation,
    SearchHit,
    Summary,
    ToolResult,
)
from tabagent.storage.search import QueryEngine, SearchQuery
from tabagent.storage.sqlite import Database
from tabagent.storage.sync import VectorSync
from tabagent.storage.vectors import VectorStore
from tabagent.storage.writer import Writer

log = logging.getLogger(__name__)

T = TypeVar("T")

STORES = (
    "conversations",
    "knowledge",
    "embeddings",
    "tool_results",
    "experience",
    "summaries",
    "meta",
)
MAX_MESSAGES_PER_CALL = 1000


class Embedder(Protocol):
    """Turns texts into unit vectors (the ML worker's embedding model, in the server)."""

    @property
    def model(self) -> str: ...

    def embed(self, texts: Sequence[str]) -> Awaitable[npt.NDArray[np.float32]]: ...


class Memory:
    def __init__(
        self,
        root: Path,
        *,
        embedder: Embedder | None = None,
        durable: bool = False,
        readers: int = 4,
        sync_interval: float = 0.5,
    ) -> None:
        self.root = root
        self.embedder = embedder
        dbs = {
            "conversations": CONVERSATIONS,
            "knowledge": KNOWLEDGE,
            "tool_results": TOOL_RESULTS_MIGRATIONS,
            "experience": EXPERIENCE_MIGRATIONS,
            "summaries": SUMMARIES_MIGRATIONS,
            "meta": META,
        }
        self.dbs = {
            name: Database(root / f"{name}.db", migrations, durable=durable, name=name)
            for name, migrations in dbs.items()
        }
        self.conversations = ConversationStore(self.dbs["conversations"])
        self.knowledge = KnowledgeStore(self.dbs["knowledge"])
        self.tool_results = ToolResultStore(self.dbs["tool_results"])
        self.experience = ExperienceStore(self.dbs["experience"])
        self.summaries = SummaryStore(self.dbs["summaries"])
        self.meta = MetaStore(self.dbs["meta"])
        self.vectors = VectorStore(root / "embeddings")
        self.engine = QueryEngine(
            self.conversations, self.knowledge, self.summaries, self.experience, self.vectors
        )
        self._sync: VectorSync | None = None
        self.writer = Writer(on_commit=self._committed)
        self.keywords = KeywordIndex(self.dbs["conversations"], self.writer, interval=sync_interval)
        self._pool = concurrent.futures.ThreadPoolExecutor(readers, "tabagent-db-read")
        self._sync_interval = sync_interval
        self._lock = DatabaseLock(root)
        self._open = False
        self._opening: threading.Thread | None = None  # opens the vectors in the background
        self._vectors_ready = threading.Event()
        self._vectors_error: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self, *, vectors_in_background: bool = False) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._pool, partial(self.open_sync, vectors_in_background=vectors_in_background)
        )

    def open_sync(self, *, vectors_in_background: bool = False) -> None:
        """Open every store and run the recovery pass (blocking).

        With ``vectors_in_background`` only the SQLite stores open here (milliseconds): reads
        and writes work at once (a write's vector waits in its store's outbox, as it always
        does), while a thread imports LanceDB, brings the index in step and replays the
        outboxes (a second or two). Searches, stats and backups wait for that thread;
        :meth:`vectors_opened` says when it is done."""
        if not self._lock.acquire():
            pid = self._lock.holder()
            raise Conflict(
                f"the databases at {self.root} are in use by another TabAgent process"
                + (f" (pid {pid})" if pid else ""),
                code="database_in_use",
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            versions = {name: db.open() for name, db in self.dbs.items()}
            self.keywords.open()  # quick: catching up or a rebuild is its thread's first pass
        except BaseException:
            self.keywords.stop()
            for db in self.dbs.values():
                db.close()
            self._lock.release()
            raise
        self.writer.start()
        self.keywords.start()
        meta = self.dbs["meta"]

        def record(conn: sqlite3.Connection) -> None:
            for name, version in versions.items():
                self.meta.record_schema(conn, name, version)

        self.writer.run(meta, record)
        self._open = True
        if vectors_in_background:
            self._opening = threading.Thread(
                target=self._open_vectors, name="tabagent-vectors-open", daemon=True
            )
            self._opening.start()
            return
        self._open_vectors()
        if self._vectors_error is not None:
            self._close_stores()  # not the pool: this may be running on it
            raise self._vectors_error

    def _open_vectors(self) -> None:
        """LanceDB, the index and the recovery pass; records a failure for those who wait."""
        try:
            self.vectors.open()
            # published before the first flush: a write committed from here on marks it dirty
            self._sync = VectorSync(
                self.vectors,
                [self.dbs["conversations"], self.dbs["knowledge"], self.dbs["summaries"]],
                self.writer,
                interval=self._sync_interval,
            )
            replayed = self._sync.flush()
            swept = self._sweep()
            if replayed or swept:
                log.info(
                    "recovery: %d vector entries replayed, %d orphan rows swept", replayed, swept
                )
            self._sync.start()
        except BaseException as exc:
            self._sync = None  # never started: nothing to stop
            if self._opening is not None:  # in the background: nobody to raise to
                log.exception("the vector index could not be opened")
            self._vectors_error = exc
        finally:
            self._vectors_ready.set()

    def _await_vectors(self) -> VectorSync:
        """The running vector sync, once the vectors are open (blocks while they open)."""
        if not self._open:
            raise StorageError("the memory store is not open", code="storage_closed")
        self._vectors_ready.wait()
        if self._vectors_error is not None or self._sync is None:
            raise ServiceUnavailable(
                f"the vector index could not be opened: {self._vectors_error}",
                code="vectors_unavailable",
            )
        return self._sync

    async def vectors_opened(self) -> None:
        """Returns once the vectors are open; raises the reason if they could not be."""
        await asyncio.get_running_loop().run_in_executor(None, self._await_vectors)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close_sync)

    def close_sync(self) -> None:
        if self._opening is not None:
            self._opening.join()  # opening cannot be interrupted; it ends by itself
            self._opening = None
        self._close_stores()
        self._pool.shutdown(wait=True)

    def _close_stores(self) -> None:
        if self._sync is not None:
            self._sync.stop()
            self._sync = None
        self.writer.close()
        self.vectors.close()
        for db in self.dbs.values():
            db.close()
        self.keywords.stop()  # its connection last: it checkpoints the index file on close
        self._lock.release()
        self._open = False

    @property
    def sync(self) -> VectorSync:
        return self._await_vectors()

    @property
    def versions(self) -> dict[str, int]:
        """The schema version of each store this build knows."""
        return {name: db.version for name, db in self.dbs.items()}

    def _committed(self, db: Database) -> None:
        self.keywords.notify(db)
        if self._sync is not None:
            self._sync.notify(db)

    def _sweep(self) -> int:
        """Summaries of deleted conversations (a delete spans two databases)."""
        known = {
            r[0] for r in self.dbs["conversations"].reader().execute("SELECT id FROM conversations")
        }
        orphans = [
            r[0]
            for r in self.dbs["summaries"]
            .reader()
            .execute("SELECT DISTINCT conversation_id FROM summaries WHERE period = 'conversation'")
            if r[0] is not None and r[0] not in known
        ]
        for cid in orphans:
            self.writer.run(
                self.dbs["summaries"],
                partial(self.summaries.delete_conversation, conversation_id=cid),
            )
        return len(orphans)

    # -- plumbing ---------------------------------------------------------------------------

    async def _read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self._open:
            raise StorageError("the memory store is not open", code="storage_closed")
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, partial(fn, *args, **kwargs)
        )

    async def _write(self, store: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        if not self._open:
            raise StorageError("the memory store is not open", code="storage_closed")
        return await self.writer.submit_async(self.dbs[store], fn)

    async def _embed(
        self, texts: Sequence[str]
    ) -> tuple[npt.NDArray[np.float32] | None, str | None]:
        if self.embedder is None or not texts:
            return None, None
        vectors = await self.embedder.embed(texts)
        return vectors, self.embedder.model

    # -- conversations ----------------------------------------------------------------------

    async def create_conversation(
        self,
        *,
        conversation_id: str | None = None,
        title: str = "",
        model: str | None = None,
        tags: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
    ) -> Conversation:
        return await self._write(
            "conversations",
            partial(
                self.conversations.create,
                conversation_id=conversation_id,
                title=title,
                model=model,
                tags=tags,
                metadata=metadata,
            ),
        )

    async def list_conversations(
        self, *, limit: int = 50, before: float | None = None, tag: str | None = None
    ) -> list[Conversation]:
        return await self._read(self.conversations.recent, limit=limit, before=before, tag=tag)

    async def get_conversation(self, conversation_id: str) -> Conversation:
        return await self._read(self.conversations.get, conversation_id)

    async def update_conversation(
        self,
        conversation_id: str,
        *,
        title: str | None = None,
        tags: Sequence[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Conversation:
        await self._write(
            "conversations",
            partial(
                self.conversations.update,
                conversation_id=conversation_id,
                title=title,
                tags=tags,
                metadata=metadata,
            ),
        )
        return await self.get_conversation(conversation_id)

    async def delete_conversation(self, conversation_id: str) -> int:
        """Delete a conversation, its messages, their vectors and its summaries."""
        count = await self._write(
            "conversations", partial(self.conversations.delete, conversation_id=conversation_id)
        )
        await self._write(
            "summaries",
            partial(self.summaries.delete_conversation, conversation_id=conversation_id),
        )
        return count

    async def add_messages(
        self,
        conversation_id: str,
        messages: Sequence[NewMessage],
        *,
        create: bool = True,
        embed: bool = True,
    ) -> list[Message]:
        """Append messages; with an embedder, their vectors are stored in the same commit."""
        if not 1 <= len(messages) <= MAX_MESSAGES_PER_CALL:
            raise BadRequest(f"give 1 to {MAX_MESSAGES_PER_CALL} messages", param="messages")
        vectors, model = await self._embed([m.content for m in messages]) if embed else (None, None)

        def write(conn: sqlite3.Connection) -> list[Message]:
            return self.conversations.append(
                conn, conversation_id, messages, vectors, model, create=create
            )

        return await self._write("conversations", write)

    async def messages(
        self, conversation_id: str, *, limit: int = 1000, after_id: int = 0, newest: bool = False
    ) -> list[Message]:
        return await self._read(
            self.conversations.messages, conversation_id, limit=limit, after_id=after_id,
            newest=newest,
        )  # fmt: skip

    async def message(self, message_id: int) -> Message:
        return await self._read(self.conversations.message, message_id)

    # -- search -----------------------------------------------------------------------------

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        vector, model = None, None
        if query.mode != "keyword" and self.embedder is not None:
            vectors, model = await self._embed([query.text])
            vector = None if vectors is None else vectors[0]
        return await self._read(self._search, query, vector, model)

    def _search(
        self, query: SearchQuery, vector: npt.NDArray[np.float32] | None, model: str | None
    ) -> list[SearchHit]:
        sync = self._await_vectors()
        if vector is not None:
            sync.flush()  # read your own writes: vectors still in an outbox move now
        if query.mode != "vector":
            self.keywords.flush()  # and messages not in the keyword index yet go in now
        return self.engine.search(query, vector, model)

    # -- knowledge --------------------------------------------------------------------------

    async def upsert_entity(
        self,
        name: str,
        *,
        type: str = "thing",
        aliases: Sequence[str] = (),
        attributes: dict[str, Any] | None = None,
        provenance: str | None = None,
    ) -> Entity:
        return await self._write(
            "knowledge",
            partial(
                self.knowledge.upsert_entity,
                name=name,
                type=type,
                aliases=aliases,
                attributes=attributes,
                provenance=provenance,
            ),
        )

    async def add_relation(
        self,
        source_id: int,
        relation: str,
        target_id: int,
        *,
        weight: float = 1.0,
        provenance: str | None = None,
    ) -> Relation:
        return await self._write(
            "knowledge",
            partial(
                self.knowledge.add_relation,
                source_id=source_id,
                relation=relation,
                target_id=target_id,
                weight=weight,
                provenance=provenance,
            ),
        )

    async def add_fact(
        self,
        text: str,
        *,
        entity_ids: Sequence[int] = (),
        confidence: float = 1.0,
        provenance: str | None = None,
        embed: bool = True,
    ) -> Fact:
        vectors, model = await self._embed([text]) if embed else (None, None)
        return await self._write(
            "knowledge",
            partial(
                self.knowledge.add_fact,
                text=text,
                entity_ids=entity_ids,
                confidence=confidence,
                provenance=provenance,
                vector=None if vectors is None else vectors[0],
                embedding_model=model,
            ),
        )

    async def entity(self, entity_id: int) -> Entity:
        return await self._read(self.knowledge.entity, entity_id)

    async def entities(
        self, *, limit: int = 100, type: str | None = None, query: str | None = None
    ) -> list[Entity]:
        return await self._read(self.knowledge.entities, limit=limit, type=type, query=query)

    async def facts(self, *, entity_id: int | None = None, limit: int = 100) -> list[Fact]:
        return await self._read(self.knowledge.facts, entity_id=entity_id, limit=limit)

    async def traverse(
        self,
        start_id: int,
        *,
        hops: int = 2,
        relations: Sequence[str] = (),
        direction: str = "both",
        limit: int = 500,
    ) -> Graph:
        return await self._read(
            self.knowledge.traverse, start_id, hops=hops, relations=relations,
            direction=direction, limit=limit,
        )  # fmt: skip

    async def consolidate(self) -> list[tuple[int, int]]:
        return await self._write("knowledge", self.knowledge.consolidate)

    # -- tool results, experience, summaries ------------------------------------------------

    async def record_tool_result(self, **fields: Any) -> ToolResult:
        return await self._write("tool_results", partial(self.tool_results.record, **fields))

    async def tool_result_list(self, **filters: Any) -> list[ToolResult]:
        return await self._read(self.tool_results.recent, **filters)

    async def record_episode(self, **fields: Any) -> Episode:
        return await self._write("experience", partial(self.experience.record, **fields))

    async def episodes(self, **filters: Any) -> list[Episode]:
        return await self._read(self.experience.recent, **filters)

    async def add_summary(
        self,
        text: str,
        *,
        conversation_id: str | None = None,
        period: str = "conversation",
        covers_to_message_id: int | None = None,
        embed: bool = True,
    ) -> Summary:
        vectors, model = await self._embed([text]) if embed else (None, None)
        return await self._write(
            "summaries",
            partial(
                self.summaries.add,
                text=text,
                conversation_id=conversation_id,
                period=period,
                covers_to_message_id=covers_to_message_id,
                vector=None if vectors is None else vectors[0],
                embedding_model=model,
            ),
        )

    async def latest_summary(self, conversation_id: str) -> Summary | None:
        return await self._read(self.summaries.latest, conversation_id)

    # -- maintenance ------------------------------------------------------------------------

    async def stats(self) -> dict[str, dict[str, Any]]:
        return await self._read(self.stats_sync)

    def stats_sync(self) -> dict[str, dict[str, Any]]:
        self._await_vectors()
        out: dict[str, dict[str, Any]] = {
            "conversations": self.conversations.stats(),
            "knowledge": self.knowledge.stats(),
            "tool_results": self.tool_results.stats(),
            "experience": self.experience.stats(),
            "summaries": self.summaries.stats(),
            "embeddings": {
                "vectors": self.vectors.count(),
                "models": {m: self.vectors.count(m) for m in self.vectors.models()},
            },
            "meta": {"schema_versions": self.meta.schema_versions()},
        }
        for name, db in self.dbs.items():
            out[name]["bytes"] = _file_bytes(db.path)
        out["conversations"]["bytes"] += _file_bytes(self.keywords.path)
        out["conversations"]["keyword_backlog"] = self.keywords.backlog()
        out["embeddings"]["bytes"] = sum(
            p.stat().st_size for p in self.vectors.root.rglob("*") if p.is_file()
        )
        return out

    async def backup(self, target: Path) -> BackupInfo:
        """One consistent archive of all seven stores, taken while writes go on."""
        if not self._open:
            raise StorageError("the memory store is not open", code="storage_closed")
        return await asyncio.get_running_loop().run_in_executor(None, backup, self, target)


def _file_bytes(path: Path) -> int:
    """Size of an SQLite file with its -wal and -shm."""
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*") if p.is_file())
