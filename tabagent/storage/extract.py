"""Entities, relations and facts from what a user wrote, for the knowledge graph.

Two methods, one result type:

- **llm**: the local chat model is asked for strict JSON (a compact prompt and one example).
  Its answer is parsed leniently (the first JSON object in it), validated, and cleaned: names
  that are empty, over 80 characters or not in the text are dropped, as are relations whose
  ends were dropped and facts that share no word with the text. Small models answer nonsense
  often enough that an unusable answer is normal, not an error: the rules take over.
- **rules**: deterministic English patterns, one line each in :data:`RULES`, for what people
  say about themselves ("my dog's name is Rex", "I live in Paris", "I work at Acme", "my name
  is Ana", "I like tea"), for "X is a Y" and "X is the Y of Z", plus capitalised names inside
  a sentence. They work whatever the model is, even a 135M one.

The speaker is the entity ``user`` (type ``person``). A first-person statement (not a question)
is also kept verbatim as a fact, so recall can find the user's own words.

No ML import here: ``generate`` is any coroutine function that sends a prompt to a model.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from tabagent.storage.fts import STOPWORDS, terms

log = logging.getLogger(__name__)

USER = "user"
MAX_NAME_CHARS = 80
MAX_FACT_CHARS = 300
MAX_PROMPT_TEXT_CHARS = 2000

Generate = Callable[[str], Awaitable[str]]


class ExtractedEntity(BaseModel):
    name: str
    type: str = "thing"
    aliases: list[str] = Field(default_factory=list)
    attributes: dict[str, str] = Field(default_factory=dict)


class ExtractedRelation(BaseModel):
    source: str
    relation: str
    target: str


class Extraction(BaseModel):
    entities: list[ExtractedEntity] = Field(default_factory=list)
    relations: list[ExtractedRelation] = Field(default_factory=list)
    facts: list[str] = Field(default_factory=list)
    method: Literal["llm", "rules"] = "rules"


async def extract(text: str, generate: Generate | None = None) -> Extraction:
    """What ``text`` says, by the model when one is given and answers usefully, else by rules."""
    text = _plain(text)
    if generate is not None and text.strip():
        try:
            answer = await generate(_prompt(text))
        except Exception as exc:  # any failure of the model means: use the rules
            log.warning("extraction by the model failed (%s); using the rules", exc)
        else:
            found = parse_answer(answer, text)
            if found is not None:
                return found
            log.info("the model's extraction was unusable; using the rules")
    return extract_rules(text)


# -- the model ------------------------------------------------------------------------------

_EXAMPLE_TEXT = "My sister Maria lives in Lisbon."
_EXAMPLE_JSON = json.dumps(
    {
        "entities": [
            {"name": "user", "type": "person"},
            {"name": "Maria", "type": "person"},
            {"name": "Lisbon", "type": "place"},
        ],
        "relations": [
            {"source": "user", "relation": "has_sister", "target": "Maria"},
            {"source": "Maria", "relation": "lives_in", "target": "Lisbon"},
        ],
        "facts": ["The user's sister is Maria.", "Maria lives in Lisbon."],
    },
    separators=(",", ":"),
)


def _prompt(text: str) -> str:
    return (
        "Extract entities, relations and facts from the text. Answer with one JSON object only,"
        ' with keys "entities" (name, type), "relations" (source, relation, target) and'
        ' "facts" (short sentences). Call the writer "user". Use only names in the text.\n'
        f"Text: {_EXAMPLE_TEXT}\nJSON: {_EXAMPLE_JSON}\n"
        f"Text: {text[:MAX_PROMPT_TEXT_CHARS]}\nJSON:"
    )


class _Answer(BaseModel):
    """What the model must send; anything else in its object is ignored."""

    entities: list[ExtractedEntity] = Field(default_factory=list)
    relations: list[ExtractedRelation] = Field(default_factory=list)
    facts: list[str] = Field(default_factory=list)


def first_json_object(answer: str) -> dict[str, Any] | None:
    """The first ``{...}`` in ``answer`` that parses as a JSON object (models add prose and
    code fences around it, or stop half way)."""
    decoder = json.JSONDecoder()
    start = answer.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(answer, start)
        except json.JSONDecodeError:
            pass
        else:
            if isinstance(value, dict):
                return value
        start = answer.find("{", start + 1)
    return None


def parse_answer(answer: str, text: str) -> Extraction | None:
    """The model's answer, cleaned; None when nothing usable is left."""
    obj = first_json_object(answer)
    if obj is None:
        return None
    try:
        parsed = _Answer.model_validate(obj)
    except ValidationError:
        return None
    lowered = text.lower()
    first_person = _is_first_person(text)
    entities: dict[str, ExtractedEntity] = {}
    for item in parsed.entities:
        name = _speaker(_clean(item.name))
        if not name or len(name) > MAX_NAME_CHARS:
            continue
        if name == USER and not first_person:
            continue
        if name != USER and name.lower() not in lowered:
            continue  # invented by the model
        entities.setdefault(name.lower(), ExtractedEntity(name=name, type=_type(item.type)))
    relations = []
    for rel in parsed.relations:
        source, target = _speaker(_clean(rel.source)), _speaker(_clean(rel.target))
        name = _relation(rel.relation)
        if name and source.lower() in entities and target.lower() in entities:
            source, target = entities[source.lower()].name, entities[target.lower()].name
            relations.append(ExtractedRelation(source=source, relation=name, target=target))
    words = set(terms(text))
    facts = [
        f
        for f in (" ".join(f.split()) for f in parsed.facts)
        if 0 < len(f) <= MAX_FACT_CHARS and words & set(terms(f))
    ]
    if not entities and not facts:
        return None
    found = Extraction(
        entities=list(entities.values()), relations=relations, facts=facts, method="llm"
    )
    _keep_statements(found, text)
    return found


# -- the rules ------------------------------------------------------------------------------

# A name: capitalised words ("Rex", "New York", "Bank of America"), or a single lowercase word
# ending the clause ("rex" in "my dog is called rex"), checked against function words in code.
_NAME = (
    r"(?:[A-Z][\w'&.-]*(?:\s+(?:(?:of|de|da|del|van|von|the)\s+)?[A-Z][\w'&.-]*)*"
    r"|[a-z][\w'-]*(?=\s*(?:$|[,;:!?.]|\s(?:and|but|with|since|now|because|for|too)\b)))"
)
# A short phrase up to the end of the clause (what someone likes, what something is).
_PHRASE = (
    r"(?:(?:the|an?)\s+)?(?P<obj>[\w' -]{1,60}?)"
    r"(?=\s*(?:$|[,;:!?.]|\s(?:and|but|because|so)\b))"
)
_THE = r"(?: the(?=\s+(?-i:[A-Z])))?"  # "in the Netherlands", but not "in the city"
_NAMED = "The user's {noun} is named {obj}."


@dataclass(frozen=True, slots=True)
class Rule:
    """One pattern: ``said`` (a case-insensitive regex) then the object.

    The subject is the user, or with ``subject`` a name just before ``said``. ``{noun}`` in
    ``relation``, ``type`` and ``fact`` is the ``noun`` group of ``said``. The object is a
    name (capitalised; refused when it is a function word) or, with ``phrase``, any short
    phrase. ``alias`` makes the object another name of the user instead of a related entity.
    """

    said: str
    relation: str | None
    type: str
    fact: str
    phrase: bool = False
    subject: bool = False
    alias: bool = False

    def compile(self) -> re.Pattern[str]:
        subject = rf"(?P<subj>{_NAME})\s+" if self.subject else r"\b"
        obj = _PHRASE if self.phrase else rf"(?P<obj>{_NAME})"
        return re.compile(rf"{subject}(?i:{self.said})\s+{obj}")


RULES: tuple[Rule, ...] = (
    Rule(r"my name is", None, "person", "The user's name is {obj}.", alias=True),
    Rule(r"my (?P<noun>[a-z]+)(?:'s| s) name is", "has_{noun}", "{noun}", _NAMED),
    Rule(r"my (?P<noun>[a-z]+) is (?:called|named)", "has_{noun}", "{noun}", _NAMED),
    Rule(rf"i (?:live|(?:am|'m) living) in{_THE}", "lives_in", "place", "The user lives in {obj}."),
    Rule(rf"i (?:work|(?:am|'m) working) (?:at|for){_THE}", "works_at", "organization",
         "The user works at {obj}."),
    Rule(r"i (?:really )?(?:like|love|enjoy)", "likes", "thing", "The user likes {obj}.",
         phrase=True),
    Rule(r"is the (?P<noun>[a-z]+) of", "{noun}_of", "thing", "{subj} is the {noun} of {obj}.",
         subject=True),
    Rule(r"is an?", "is_a", "concept", "{subj} is a {obj}.", subject=True, phrase=True),
)  # fmt: skip

_COMPILED = tuple((rule, rule.compile()) for rule in RULES)
_CAPITALISED = re.compile(r"\b[A-Z][\w'&-]*(?:\s+(?:(?:of|de|da|del|van|von)\s+)?[A-Z][\w'&-]*)*")
_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n+")
_FIRST_PERSON = re.compile(r"(?i:\b(?:i|my|me|mine|myself)\b)")  # "i" also ends at "i'm"
_NOT_NAMES = STOPWORDS | {
    "i", "i'm", "it's", "im", "here", "yes", "hello", "hi", "thanks", "please", "ok", "okay",
    "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "today",
    "january", "february", "march", "april", "may", "june", "july", "august", "september",
    "october", "november", "december", "very", "really", "also", "just", "too", "much", "lot",
    "one", "something", "someone", "nothing", "everything", "all", "some", "any", "called",
    "named", "mine", "myself",
}  # fmt: skip


def extract_rules(text: str) -> Extraction:
    """What the rules find in ``text`` (no model involved)."""
    text = _plain(text)
    found = Extraction(method="rules")
    entities: dict[str, ExtractedEntity] = {}

    def entity(name: str, type_: str) -> ExtractedEntity:
        return entities.setdefault(name.lower(), ExtractedEntity(name=name, type=type_))

    sentences = list(_statements(text))
    for sentence in sentences:  # the rules first: they know the types
        for rule, pattern in _COMPILED:
            for match in pattern.finditer(sentence):
                _apply(rule, match, entity, found)
    user = entities.get(USER)
    user_names = {a.lower() for a in user.aliases} if user else set()
    for sentence in sentences:
        for match in _CAPITALISED.finditer(sentence):
            name = _clean(match.group(0))
            if (
                match.start() > _first_word_start(sentence)
                and _is_name(name)
                and name.lower() not in user_names
            ):
                entity(name, "thing")
    found.entities = list(entities.values())
    _keep_statements(found, text)
    return found


def _apply(
    rule: Rule,
    match: re.Match[str],
    entity: Callable[[str, str], ExtractedEntity],
    found: Extraction,
) -> None:
    groups = match.groupdict()
    noun = (groups.get("noun") or "").lower()
    obj = _clean(groups["obj"])
    if not rule.phrase:
        obj = _proper(obj)
    if not obj or not _is_name(obj) or len(obj) > MAX_NAME_CHARS:
        return
    subj = _clean(groups["subj"]) if groups.get("subj") else USER
    if subj != USER and (not _is_name(subj) or subj[:1].islower()):
        return
    fill = {"noun": noun, "obj": obj, "subj": subj}
    source = entity(subj, "person" if subj == USER else "thing")
    if rule.alias:
        if obj.lower() not in {a.lower() for a in source.aliases}:
            source.aliases.append(obj)
        source.attributes["name"] = obj
    else:
        target = entity(obj, rule.type.format(**fill))
        assert rule.relation is not None
        relation = _relation(rule.relation.format(**fill))
        found.relations.append(
            ExtractedRelation(source=source.name, relation=relation, target=target.name)
        )
    fact = rule.fact.format(**fill)
    if fact not in found.facts:
        found.facts.append(fact)


# -- helpers --------------------------------------------------------------------------------


def _plain(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'")


def _clean(value: str) -> str:
    return " ".join(value.split()).strip(" .,;:!?\"'")


def _speaker(name: str) -> str:
    return USER if name.lower() in {"i", "me", "user", "the user", "myself"} else name


def _type(value: str) -> str:
    cleaned = re.sub(r"[^a-z0-9_]+", "_", value.strip().lower()).strip("_")
    return cleaned if 0 < len(cleaned) <= 32 else "thing"


def _relation(value: str) -> str:
    cleaned = re.sub(r"[^a-z0-9_]+", "_", value.strip().lower()).strip("_")
    return cleaned if 0 < len(cleaned) <= 64 else ""


def _proper(name: str) -> str:
    """A name typed in lower case ("rex") is written as one ("Rex")."""
    return name if name != name.lower() else " ".join(w.capitalize() for w in name.split())


def _is_name(name: str) -> bool:
    words = name.lower().split()
    return bool(words) and not all(w in _NOT_NAMES for w in words)


def _first_word_start(sentence: str) -> int:
    match = re.search(r"\w", sentence)
    return match.start() if match else 0


def _statements(text: str) -> Iterator[str]:
    """Sentences that state something (questions are not facts, nor rule material)."""
    for sentence in _SENTENCES.split(text):
        sentence = sentence.strip()
        if sentence and not sentence.endswith("?"):
            yield sentence


def _is_first_person(sentence: str) -> bool:
    return _FIRST_PERSON.search(sentence) is not None


def _keep_statements(found: Extraction, text: str) -> None:
    """The user's own first-person statements are facts too, word for word."""
    for sentence in _statements(text):
        short = len(sentence) <= MAX_FACT_CHARS
        if short and _is_first_person(sentence) and sentence not in found.facts:
            found.facts.append(sentence)
