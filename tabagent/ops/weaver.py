"""The knowledge weaver: text → entities, relations and facts in the knowledge graph.

Extraction (``tabagent.storage.extract``) asks the chat model for JSON when allowed and falls
back to deterministic rules, so it works with the tiny default model; the weaver then upserts
what was found (entities are merged by name and alias, the same relation is stored once) and
links each fact to the entities it names, with the text's provenance on everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tabagent.ops.registry import OpContext
from tabagent.storage.extract import extract
from tabagent.storage.records import Entity

_LLM_MAX_TOKENS = 256


async def weave(
    ctx: OpContext, text: str, *, provenance: str | None, use_llm: bool
) -> dict[str, Any]:
    memory = ctx.state.require_memory()
    generate = _generator(ctx) if use_llm and ctx.state.ml is not None else None
    found = await extract(text, generate)
    entities: dict[str, Entity] = {}

    async def entity(
        name: str, type_: str = "thing", aliases: Sequence[str] = (), attributes: Any = None
    ) -> Entity:
        key = name.strip().lower()
        if key not in entities or aliases or attributes:
            entities[key] = await memory.upsert_entity(
                name, type=type_, aliases=aliases, attributes=attributes, provenance=provenance
            )
        return entities[key]

    for item in found.entities:
        await entity(item.name, item.type, item.aliases, item.attributes or None)
    relations = []
    for rel in found.relations:
        source, target = await entity(rel.source), await entity(rel.target)
        relations.append(
            await memory.add_relation(source.id, rel.relation, target.id, provenance=provenance)
        )
    facts = []
    for fact in found.facts:
        lowered = fact.lower()
        linked = [e.id for key, e in entities.items() if key in lowered]
        facts.append(
            await memory.add_fact(fact, entity_ids=sorted(set(linked)), provenance=provenance)
        )
    return {
        "method": found.method,
        "entities": list(entities.values()),
        "relations": relations,
        "facts": facts,
    }


def _generator(ctx: OpContext) -> Any:
    ml = ctx.state.require_ml()

    async def generate(prompt: str) -> str:
        return await ml.complete(None, prompt, _LLM_MAX_TOKENS, ctx.request_id, "extraction")

    return generate
