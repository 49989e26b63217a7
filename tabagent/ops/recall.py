"""Chat backed by memory: persist each turn, recall memories, fold old turns into a summary.

When a chat request names a conversation, :func:`prepare` decides what the model sees:

1. **History.** Clients differ: OpenAI-style clients resend the whole history each time,
   memory-aware ones send only the new turn. The stored conversation and the request are
   overlapped (the longest tail of the stored turns that the request starts with), so both
   styles give the same transcript and no turn is stored twice.
2. **Persist.** The new turns are written (with their embeddings) before generation, so the
   user's words are kept even if generation fails; the answer is written when it completes.
3. **Recall.** A hybrid search with the last user message over past messages, facts and
   summaries of *other* turns; hits above a similarity floor are added to the system prompt
   as "memories", as many as fit ``memory_budget_tokens`` counted with the model's tokenizer.
4. **Fit the context.** The newest turns that fit the model's context (minus room for the
   answer) are kept; older ones are replaced by the conversation's rolling summary, made by
   the chat model (an extractive fallback when it fails) and stored in ``summaries`` with the
   id of the last message it covers, so the next request reuses it.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ml_service.proto import ml_inference_pb2 as pb
from tabagent.errors import TabAgentError
from tabagent.storage.records import NewMessage, Role, SearchHit, Summary
from tabagent.storage.search import SearchQuery

if TYPE_CHECKING:
    from tabagent.ml.services import MLServices
    from tabagent.ops.registry import OpContext
    from tabagent.storage.memory import Memory

log = logging.getLogger(__name__)

DEFAULT_RESERVE_TOKENS = 512  # room kept for the answer when the request sets no max_tokens
MIN_SIMILARITY = 0.35  # MiniLM cosine below this is mostly noise for short chat turns
RECALL_K = 8
PER_MESSAGE_OVERHEAD = 8  # template tokens around each turn (role markers, separators)
SUMMARY_MAX_TOKENS = 160
MEMORY_HEADER = "Things you remember about the user from earlier conversations:"
SUMMARY_HEADER = "Summary of the earlier part of this conversation:"


@dataclass
class Turn:
    role: Role
    content: str
    id: int | None = None  # stored message id, None until stored


@dataclass
class Plan:
    conversation_id: str
    transcript: list[tuple[str, str]]
    memories: list[SearchHit] = field(default_factory=list)
    summary: Summary | None = None
    dropped: int = 0
    stored_ids: list[int] = field(default_factory=list)
    new_user_turns: list[Turn] = field(default_factory=list)


def overlap(stored: list[Turn], incoming: list[Turn]) -> int:
    """How many of ``incoming``'s first turns repeat the last turns of ``stored``."""
    for k in range(min(len(stored), len(incoming)), 0, -1):
        tail = stored[-k:]
        pairs = zip(tail, incoming[:k], strict=True)
        if all(a.role == b.role and a.content == b.content for a, b in pairs):
            return k
    return 0


_counted: OrderedDict[tuple[str, str], int] = OrderedDict()  # (model, sha1 of text) -> tokens
_COUNTED_MAX = 20_000


async def count_tokens(ml: MLServices, model_id: str, texts: list[str], rid: str) -> list[int]:
    """Token counts with the model's own tokenizer; a turn is counted once, then remembered
    (a long conversation would otherwise cost one RPC per turn on every request)."""
    counts = []
    for text in texts:
        key = (model_id, hashlib.sha1(text.encode()).hexdigest())
        n = _counted.get(key)
        if n is None:
            reply = await ml.supervisor.unary(
                "Tokenize",
                pb.TokenizeRequest(model_id=model_id, text=text, add_special=False),
                rid, 60.0, "tokenize",
            )  # fmt: skip
            n = _counted[key] = len(reply.tokens)
            if len(_counted) > _COUNTED_MAX:
                _counted.popitem(last=False)
        counts.append(n)
    return counts


async def prepare(
    ctx: OpContext,
    memory: Memory,
    conversation_id: str,
    messages: Sequence[tuple[str, str]],
    model_id: str,
    reserve_tokens: int,
    *,
    recall_memories: bool = True,
) -> Plan:
    ml = ctx.state.require_ml()
    settings = ctx.state.settings
    system = [content for role, content in messages if role == "system"]
    incoming = [Turn(role, content) for role, content in messages if role != "system"]  # type: ignore[arg-type]
    stored = [
        Turn(m.role, m.content, m.id)
        for m in await memory.messages(conversation_id, limit=2000, newest=True)
        if m.role != "system"
    ]
    k = overlap(stored, incoming)
    new = incoming[k:]
    history = stored + new
    if new:
        saved = await memory.add_messages(
            conversation_id, [NewMessage(role=t.role, content=t.content, model=None) for t in new]
        )
        for turn, msg in zip(new, saved, strict=True):
            turn.id = msg.id

    plan = Plan(conversation_id=conversation_id, transcript=[])
    plan.stored_ids = [t.id for t in new if t.id is not None]
    plan.new_user_turns = [t for t in new if t.role == "user"]
    query = next((t.content for t in reversed(history) if t.role == "user"), "")
    if query and recall_memories and settings.memory_budget_tokens > 0:
        plan.memories = await _recall(ctx, memory, query, history, model_id)

    async with ml.orchestrator.use(model_id, ctx.request_id) as info:
        n_ctx = info.context_length or settings.n_ctx or 2048
        memory_lines = [f"- {hit.text}" for hit in plan.memories]
        counts = await count_tokens(ml, model_id, memory_lines, ctx.request_id)
        budget, kept_lines = settings.memory_budget_tokens, []
        for line, n in zip(memory_lines, counts, strict=True):
            if n > budget:
                break
            budget -= n
            kept_lines.append(line)
        plan.memories = plan.memories[: len(kept_lines)]
        system_text = "\n\n".join(system)
        fixed = sum(await count_tokens(ml, model_id, [system_text], ctx.request_id))
        fixed += settings.memory_budget_tokens - budget + 2 * PER_MESSAGE_OVERHEAD
        room = n_ctx - reserve_tokens - fixed - SUMMARY_MAX_TOKENS
        sizes = await count_tokens(ml, model_id, [t.content for t in history], ctx.request_id)
        keep = 0
        for n in reversed(sizes):
            if n + PER_MESSAGE_OVERHEAD > room and keep > 0:
                break
            room -= n + PER_MESSAGE_OVERHEAD
            keep += 1
    older, recent = history[: len(history) - keep], history[len(history) - keep :]
    if older:
        plan.summary = await _summary(ctx, memory, conversation_id, older, model_id)
        plan.dropped = len(older)

    parts = list(system)
    if kept_lines:
        parts.append(MEMORY_HEADER + "\n" + "\n".join(kept_lines))
    if plan.summary is not None:
        parts.append(f"{SUMMARY_HEADER}\n{plan.summary.text}")
    if parts:
        plan.transcript.append(("system", "\n\n".join(parts)))
    plan.transcript.extend((t.role, t.content) for t in recent)
    return plan


async def _recall(
    ctx: OpContext, memory: Memory, query: str, history: list[Turn], model_id: str
) -> list[SearchHit]:
    try:
        hits = await memory.search(SearchQuery(query, k=RECALL_K, min_similarity=MIN_SIMILARITY))
    except TabAgentError as exc:  # memory must never break chat
        log.warning("memory recall failed: %s", exc.message)
        return []
    in_context = {t.id for t in history if t.id is not None}
    texts = {t.content.strip() for t in history}
    seen: set[str] = set()
    out = []
    for hit in hits:
        text = hit.text.strip()
        if (hit.source == "messages" and hit.id in in_context) or text in texts or text in seen:
            continue
        if hit.vector_rank is None:  # keyword-only matches on chatty words are rarely memories
            continue
        seen.add(text)
        out.append(hit)
    return out


async def _summary(
    ctx: OpContext, memory: Memory, conversation_id: str, older: list[Turn], model_id: str
) -> Summary:
    """The rolling summary covering ``older``: reused if it already covers them, else extended."""
    latest = await memory.latest_summary(conversation_id)
    last_id = max((t.id for t in older if t.id is not None), default=0)
    if latest is not None and (latest.covers_to_message_id or 0) >= last_id:
        return latest
    start = latest.covers_to_message_id or 0 if latest else 0
    uncovered = [t for t in older if t.id is None or t.id > start]
    previous = latest.text if latest else ""
    text = await _summarise(ctx, previous, uncovered, model_id)
    return await memory.add_summary(
        text, conversation_id=conversation_id, covers_to_message_id=last_id
    )


async def _summarise(ctx: OpContext, previous: str, turns: list[Turn], model_id: str) -> str:
    lines = [f"{t.role}: {t.content}" for t in turns]
    dialogue = "\n".join(lines)[-6000:]
    prompt = (
        (f"Earlier summary: {previous}\n\n" if previous else "")
        + f"Conversation:\n{dialogue}\n\n"
        + "Summarise the conversation above in at most five short sentences. "
        "Keep names, numbers and decisions."
    )
    ml = ctx.state.require_ml()
    try:
        answer = await ml.complete(model_id, prompt, SUMMARY_MAX_TOKENS, ctx.request_id, "summary")
        text = answer.strip()
    except TabAgentError as exc:
        log.warning("summary by the model failed (%s); using an extractive one", exc.message)
        text = ""
    if len(text) < 20:  # nothing useful from the model: keep the first words of each turn
        text = " ".join(f"{t.role.capitalize()}: {t.content[:160].strip()}" for t in turns[-12:])
    return (previous + " " + text).strip()[-4000:] if previous else text


async def learn(ctx: OpContext, memory: Memory, plan: Plan) -> None:
    """Weave what the user just said into the knowledge graph (never fails the chat)."""
    mode = ctx.state.settings.memory_extract
    if mode == "off":
        return
    from tabagent.ops.weaver import weave

    for turn in plan.new_user_turns:
        try:
            await weave(ctx, turn.content, provenance=f"message:{turn.id}", use_llm=mode == "llm")
        except TabAgentError as exc:
            log.warning("could not extract knowledge from message %s: %s", turn.id, exc.message)
