"""The query engine: keyword (FTS5/BM25), vector (hnswlib) and hybrid search over memory.

Hybrid search runs each ranked list (keyword per store, vector across kinds) and fuses them
with reciprocal-rank fusion, ``score = Σ 1 / (60 + rank)``: ranks, not raw scores, so BM25
and cosine need no common scale. With ``recency_half_life_days`` the fused score is multiplied
by ``0.5 ** (age / half_life)``, so of two equally relevant memories the newer wins.

Filters: the time range applies to every store; ``conversation_id`` to the stores kept per
conversation (facts are not, so a conversation-scoped search leaves them out); ``roles`` and
``tags`` are properties of messages, so a search with either looks at messages only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from tabagent.storage.records import SearchHit, Source, label_parts

if TYPE_CHECKING:  # lancedb takes a second to import: not on the CLI's start-up path
    from tabagent.storage.conversations import ConversationStore
    from tabagent.storage.history import ExperienceStore, SummaryStore
    from tabagent.storage.knowledge import KnowledgeStore
    from tabagent.storage.vectors import VectorStore

RRF_K = 60
SearchMode = Literal["hybrid", "keyword", "vector"]
_VECTOR_KINDS: dict[str, Source] = {"message": "messages", "fact": "facts", "summary": "summaries"}


@dataclass
class SearchQuery:
    text: str
    sources: Sequence[Source] = ("messages", "facts", "summaries")
    k: int = 10
    mode: SearchMode = "hybrid"
    conversation_id: str | None = None
    roles: Sequence[str] = ()
    since: float | None = None
    until: float | None = None
    tags: Sequence[str] = ()
    recency_half_life_days: float | None = None
    min_similarity: float = field(default=0.0)

    def effective_sources(self) -> list[Source]:
        if self.roles or self.tags:
            return [s for s in self.sources if s == "messages"]
        if self.conversation_id is not None:  # facts belong to no one conversation
            return [s for s in self.sources if s != "facts"]
        return list(self.sources)


@dataclass(slots=True)
class _Candidate:
    source: Source
    id: int
    score: float = 0.0
    keyword_rank: int | None = None
    vector_rank: int | None = None


class QueryEngine:
    def __init__(
        self,
        conversations: ConversationStore,
        knowledge: KnowledgeStore,
        summaries: SummaryStore,
        experience: ExperienceStore,
        vectors: VectorStore,
    ) -> None:
        self.conversations = conversations
        self.knowledge = knowledge
        self.summaries = summaries
        self.experience = experience
        self.vectors = vectors

    def search(
        self, q: SearchQuery, query_vector: npt.NDArray[np.float32] | None, model: str | None
    ) -> list[SearchHit]:
        sources = q.effective_sources()
        depth = max(q.k * 4, 20)
        candidates: dict[tuple[Source, int], _Candidate] = {}

        def take(source: Source, ids: Sequence[int], kind: Literal["keyword", "vector"]) -> None:
            for rank, row_id in enumerate(ids, start=1):
                cand = candidates.setdefault((source, row_id), _Candidate(source, row_id))
                cand.score += 1.0 / (RRF_K + rank)
                if kind == "keyword":
                    cand.keyword_rank = rank
                else:
                    cand.vector_rank = rank

        allowed_messages = self.conversations.allowed_ids(
            q.conversation_id, q.roles, q.since, q.until, q.tags
        )
        if q.mode in ("hybrid", "keyword"):
            for source in sources:
                hits = self._keyword(source, q, depth, allowed_messages)
                take(source, hits, "keyword")
        if q.mode in ("hybrid", "vector") and query_vector is not None and model is not None:
            kinds = [k for k, s in _VECTOR_KINDS.items() if s in sources]

            def allowed(label: int) -> bool:
                kind, row_id = label_parts(label)
                return kind != "message" or allowed_messages is None or row_id in allowed_messages

            found = self.vectors.search(
                model,
                query_vector,
                depth,
                # a kind filter calls back into Python at every visited node: skip it when
                # every kind that has vectors is wanted
                kinds=None if set(kinds) == set(_VECTOR_KINDS) else kinds,
                allowed=None if allowed_messages is None else allowed,
            )
            per_source: dict[Source, list[int]] = {}
            for label, similarity in found:
                if similarity < q.min_similarity:
                    continue
                kind, row_id = label_parts(label)
                if kind not in _VECTOR_KINDS:
                    continue
                per_source.setdefault(_VECTOR_KINDS[kind], []).append(row_id)
            for source, ids in per_source.items():
                take(source, ids, "vector")
        return self._hits(candidates, q)

    def _keyword(
        self, source: Source, q: SearchQuery, depth: int, allowed: set[int] | None
    ) -> list[int]:
        if source == "messages":
            found = self.conversations.keyword_search(
                q.text,
                limit=depth,
                conversation_id=q.conversation_id,
                roles=q.roles,
                since=q.since,
                until=q.until,
                tags=q.tags,
            )
        elif source == "facts":
            found = self.knowledge.keyword_search(q.text, depth)
        elif source == "summaries":
            found = self.summaries.keyword_search(q.text, depth)
        elif source == "experience":
            found = self.experience.keyword_search(q.text, depth)
        else:
            return []
        return [row_id for row_id, _ in found]

    def _hits(
        self, candidates: dict[tuple[Source, int], _Candidate], q: SearchQuery
    ) -> list[SearchHit]:
        if (
            q.recency_half_life_days is None
            and q.since is None
            and q.until is None
            and (q.conversation_id is None)
        ):  # the order is final: load only the k best instead of every candidate
            best = sorted(candidates.values(), key=lambda c: c.score, reverse=True)[: q.k]
            candidates = {(c.source, c.id): c for c in best}
        by_source: dict[Source, list[int]] = {}
        for source, row_id in candidates:
            by_source.setdefault(source, []).append(row_id)
        hits: list[SearchHit] = []
        now = time.time()
        for source, ids in by_source.items():
            for row_id, hit in self._load(source, ids).items():
                if q.since is not None and hit.created_at < q.since:
                    continue
                if q.until is not None and hit.created_at >= q.until:
                    continue
                if q.conversation_id is not None and hit.conversation_id != q.conversation_id:
                    continue
                cand = candidates[(source, row_id)]
                score = cand.score
                if q.recency_half_life_days:
                    age_days = max(0.0, now - hit.created_at) / 86400.0
                    score *= math.pow(0.5, age_days / q.recency_half_life_days)
                hits.append(
                    hit.model_copy(
                        update={
                            "score": score,
                            "keyword_rank": cand.keyword_rank,
                            "vector_rank": cand.vector_rank,
                        }
                    )
                )
        hits.sort(key=lambda h: h.score, reverse=True)
        return hits[: q.k]

    def _load(self, source: Source, ids: Sequence[int]) -> dict[int, SearchHit]:
        out: dict[int, SearchHit] = {}
        if source == "messages":
            for mid, m in self.conversations.messages_by_id(ids).items():
                out[mid] = SearchHit(
                    source=source,
                    id=mid,
                    text=m.content,
                    score=0.0,
                    conversation_id=m.conversation_id,
                    role=m.role,
                    created_at=m.created_at,
                )
        elif source == "facts":
            for fid, f in self.knowledge.facts_by_id(ids).items():
                out[fid] = SearchHit(
                    source=source, id=fid, text=f.text, score=0.0, created_at=f.created_at
                )
        elif source == "summaries":
            for sid, s in self.summaries.by_id(ids).items():
                out[sid] = SearchHit(
                    source=source,
                    id=sid,
                    text=s.text,
                    score=0.0,
                    conversation_id=s.conversation_id,
                    created_at=s.created_at,
                )
        elif source == "experience":
            for eid, e in self.experience.by_id(ids).items():
                text = e.event if not e.outcome else f"{e.event} -> {e.outcome}"
                out[eid] = SearchHit(
                    source=source,
                    id=eid,
                    text=text,
                    score=0.0,
                    conversation_id=e.conversation_id,
                    created_at=e.created_at,
                )
        return out
