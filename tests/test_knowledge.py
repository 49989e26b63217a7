"""The knowledge graph (entities, relations, facts, provenance) and extraction from text.

Real SQLite files in tmp_path; the model of the LLM extraction is a coroutine returning a fixed
answer (the model is the external edge).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tabagent.errors import BadRequest, NotFound
from tabagent.storage.extract import Extraction, extract, first_json_object
from tabagent.storage.knowledge import MIGRATIONS, KnowledgeStore
from tabagent.storage.records import Entity, label_parts, vector_label
from tabagent.storage.sqlite import Database


def open_db(path: Path, migrations: tuple[str, ...] = MIGRATIONS) -> Database:
    db = Database(path, migrations)
    db.open()
    return db


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_db(tmp_path / "knowledge.db")
    yield database
    database.close()


@pytest.fixture
def store(db: Database) -> KnowledgeStore:
    return KnowledgeStore(db)


def upsert(
    store: KnowledgeStore,
    name: str,
    type_: str = "thing",
    *,
    aliases: Sequence[str] = (),
    attributes: dict[str, Any] | None = None,
    provenance: str | None = None,
) -> Entity:
    with store.db.transaction() as conn:
        return store.upsert_entity(
            conn, name, type=type_, aliases=aliases, attributes=attributes, provenance=provenance
        )


def outbox_rows(db: Database) -> list[tuple[str, str, int]]:
    """(op, kind, row id) of every queued vector change."""
    rows = db.reader().execute("SELECT op, label FROM vector_outbox ORDER BY id").fetchall()
    return [(r[0], *label_parts(r[1])) for r in rows]


# ---- entities -------------------------------------------------------------------------------


def test_upsert_finds_an_entity_by_any_spelling_of_its_name_or_an_alias(
    store: KnowledgeStore,
) -> None:
    rex = upsert(store, "Rex", "dog", aliases=["Rexy"], attributes={"breed": "lab"})
    for spelling in ["rex", "  REX ", "Rex", "rexy", "Rexy "]:
        same = upsert(store, spelling, "dog", attributes={"age": 3})
        assert same.id == rex.id, spelling
    again = upsert(store, "rex", "Dog", aliases=["Mr  Rex", "rex", "REXY"])
    assert again.id == rex.id
    assert again.name == "Rex"  # the first spelling is the one shown
    assert again.aliases == ["Rexy", "Mr Rex"]  # the own name and known aliases not repeated
    assert again.attributes == {"breed": "lab", "age": 3}
    assert store.find_entity("mr rex") == store.entity(rex.id)
    assert store.find_entity("nobody") is None
    assert store.stats()["entities"] == 1


def test_a_bare_thing_and_a_typed_entity_of_one_name_are_one_entity(
    store: KnowledgeStore,
) -> None:
    paris = upsert(store, "Paris")  # seen as a capitalised word first
    assert paris.type == "thing"
    placed = upsert(store, "paris", "place")  # then "I live in Paris"
    assert (placed.id, placed.type) == (paris.id, "place")
    assert upsert(store, "Paris").id == paris.id  # a bare mention finds the typed one
    jordan_p = upsert(store, "Jordan", "person")
    jordan_c = upsert(store, "Jordan", "country")
    assert jordan_p.id != jordan_c.id  # two specific types are two entities
    assert len(store.entities(query="jordan")) == 2
    assert [e.name for e in store.entities(type="place")] == ["Paris"]


def test_entity_writes_reject_empty_names_and_unknown_ids(store: KnowledgeStore) -> None:
    with pytest.raises(BadRequest):
        upsert(store, "   ")
    with pytest.raises(NotFound) as err:
        store.entity(12345)
    assert err.value.code == "entity_not_found"
    with pytest.raises(NotFound) as err, store.db.transaction() as conn:
        store.delete_entity(conn, 12345)
    assert err.value.code == "entity_not_found"
    with pytest.raises(NotFound) as err:
        store.fact(12345)
    assert err.value.code == "fact_not_found"


# ---- relations ------------------------------------------------------------------------------


def test_a_relation_is_stored_once_and_weighs_its_distinct_sources(
    store: KnowledgeStore,
) -> None:
    user, rex = upsert(store, "user", "person"), upsert(store, "Rex", "dog")
    with store.db.transaction() as conn:
        first = store.add_relation(conn, user.id, "has_dog", rex.id, provenance="message:1")
        replay = store.add_relation(conn, user.id, "has dog", rex.id, provenance="message:1")
        second = store.add_relation(conn, user.id, "Has-Dog", rex.id, provenance="message:2")
        store.add_relation(conn, user.id, "has_dog", rex.id, weight=0.5)  # no source: no evidence
    assert first.id == replay.id == second.id
    assert replay.weight == 1.0  # the same message again does not count twice
    assert second.weight == 2.0
    assert second.provenance == ["message:1", "message:2"]
    [stored] = store.relations_of(rex.id)
    assert (stored.relation, stored.weight) == ("has_dog", 2.0)
    assert store.relations_of(user.id) == [stored]
    with pytest.raises(NotFound), store.db.transaction() as conn:
        store.add_relation(conn, user.id, "knows", 999)
    with pytest.raises(BadRequest), store.db.transaction() as conn:
        store.add_relation(conn, user.id, "  ", rex.id)


# ---- facts ----------------------------------------------------------------------------------


def test_facts_link_entities_are_stored_once_and_found_by_stemmed_keywords(
    store: KnowledgeStore, db: Database
) -> None:
    user, rex = upsert(store, "user", "person"), upsert(store, "Rex", "dog")
    vector = np.arange(4, dtype=np.float32)
    with db.transaction() as conn:
        fact = store.add_fact(
            conn,
            "The user has two dogs.",
            entity_ids=[rex.id, user.id, rex.id],
            confidence=0.6,
            provenance="message:1",
            vector=vector,
            embedding_model="mini",
        )
        same = store.add_fact(
            conn, " The user has two dogs. ", entity_ids=[user.id, rex.id], confidence=0.9,
            provenance="message:2",
        )  # fmt: skip
        about_user = store.add_fact(conn, "The user has two dogs.", entity_ids=[user.id])
        store.add_fact(conn, "The stock market fell today.")
    assert fact.entity_ids == sorted([user.id, rex.id])
    assert same.id == fact.id  # identical text about the same entities
    assert (same.confidence, same.provenance) == (0.9, ["message:1", "message:2"])
    assert about_user.id != fact.id  # the same words about other entities are another fact
    hits = store.keyword_search("dog")
    assert {fid for fid, _ in hits} == {fact.id, about_user.id}
    assert all(score > 0 for _, score in hits)
    assert store.keyword_search("?!") == []  # no word to search for
    assert [f.id for f in store.facts(entity_id=rex.id)] == [fact.id]
    assert len(store.facts(limit=2)) == 2
    assert set(store.facts_by_id([fact.id, about_user.id, 999])) == {fact.id, about_user.id}
    blob = db.reader().execute("SELECT label, model, vector FROM vector_outbox").fetchall()
    assert [(r[0], r[1]) for r in blob] == [(vector_label("fact", fact.id), "mini")]
    assert np.frombuffer(blob[0][2], dtype="<f4").tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(BadRequest), db.transaction() as conn:
        store.add_fact(conn, "x", confidence=1.5)
    with pytest.raises(NotFound), db.transaction() as conn:
        store.add_fact(conn, "about nobody", entity_ids=[999])
    assert store.stats()["facts"] == 3  # the failed writes left nothing behind


def test_deletes_cascade_and_queue_vector_deletes(store: KnowledgeStore, db: Database) -> None:
    user, rex, vet = (
        upsert(store, "user", "person"),
        upsert(store, "Rex", "dog"),
        upsert(store, "Silva", "person"),
    )
    with db.transaction() as conn:
        store.add_relation(conn, user.id, "has_dog", rex.id, provenance="message:1")
        store.add_relation(conn, rex.id, "treated_by", vet.id)
        fact = store.add_fact(conn, "Rex is a dog.", entity_ids=[rex.id, user.id])
        other = store.add_fact(conn, "Silva is a vet.", entity_ids=[vet.id], provenance="user")
        store.delete_entity(conn, rex.id)
    assert store.relations_of(user.id) == []
    assert store.relations_of(vet.id) == []
    assert store.fact(fact.id).entity_ids == [user.id]  # the fact stays, unlinked from Rex
    with db.transaction() as conn:
        store.delete_fact(conn, other.id)
    assert store.keyword_search("vet") == []
    assert outbox_rows(db) == [("delete", "entity", rex.id), ("delete", "fact", other.id)]
    stats = store.stats()
    assert (stats["relations"], stats["fact_links"], stats["provenance"]) == (0, 1, 0)
    with pytest.raises(NotFound) as err, db.transaction() as conn:
        store.delete_fact(conn, other.id)
    assert err.value.code == "fact_not_found"


# ---- traversal ------------------------------------------------------------------------------


@pytest.fixture
def graph(store: KnowledgeStore) -> dict[str, int]:
    """a -next-> b -next-> c -next-> d, c -back-> b, and the cycle x -> y -> z -> x."""
    ids = {n: upsert(store, n).id for n in "abcdxyz"}
    edges = [("a", "next", "b"), ("b", "next", "c"), ("c", "next", "d"), ("c", "back", "b")]
    edges += [("x", "loop", "y"), ("y", "loop", "z"), ("z", "loop", "x")]
    with store.db.transaction() as conn:
        for s, rel, t in edges:
            store.add_relation(conn, ids[s], rel, ids[t])
    return ids


def names(graph: dict[str, int], distances: dict[int, int]) -> dict[str, int]:
    by_id = {v: k for k, v in graph.items()}
    return {by_id[i]: d for i, d in distances.items()}


def test_traverse_reaches_k_hops_with_distances(
    store: KnowledgeStore, graph: dict[str, int]
) -> None:
    two = store.traverse(graph["a"], hops=2)
    assert names(graph, two.distances) == {"a": 0, "b": 1, "c": 2}
    assert [e.name for e in two.entities] == ["a", "b", "c"]
    assert sorted((r.source_id, r.relation, r.target_id) for r in two.relations) == sorted(
        [
            (graph["a"], "next", graph["b"]),
            (graph["b"], "next", graph["c"]),
            (graph["c"], "back", graph["b"]),
        ]
    )
    far = store.traverse(graph["a"], hops=6, direction="out")
    assert names(graph, far.distances) == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert names(graph, store.traverse(graph["a"], 6, limit=2).distances) == {"a": 0, "b": 1}


def test_traverse_terminates_on_cycles_and_follows_direction_and_relation_filters(
    store: KnowledgeStore, graph: dict[str, int]
) -> None:
    cycle_out = store.traverse(graph["x"], hops=6, direction="out")
    assert names(graph, cycle_out.distances) == {"x": 0, "y": 1, "z": 2}
    assert len(cycle_out.relations) == 3
    cycle_both = store.traverse(graph["x"], hops=6, direction="both")
    assert names(graph, cycle_both.distances) == {"x": 0, "y": 1, "z": 1}
    into_d = store.traverse(graph["d"], hops=2, direction="in")
    assert names(graph, into_d.distances) == {"d": 0, "c": 1, "b": 2}
    assert names(graph, store.traverse(graph["d"], hops=2, direction="out").distances) == {"d": 0}
    only_next = store.traverse(graph["a"], hops=6, relations=["next"])
    assert names(graph, only_next.distances) == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert {r.relation for r in only_next.relations} == {"next"}
    back = store.traverse(graph["c"], hops=6, relations=["back"], direction="out")
    assert names(graph, back.distances) == {"c": 0, "b": 1}
    assert names(graph, store.traverse(graph["a"], 3, relations=["back"]).distances) == {"a": 0}
    for bad in (0, 7):
        with pytest.raises(BadRequest) as err:
            store.traverse(graph["a"], hops=bad)
        assert err.value.param == "hops"
    with pytest.raises(BadRequest):
        store.traverse(graph["a"], hops=2, direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        store.traverse(999, hops=1)


def test_neighbourhood_is_one_hop_both_ways(store: KnowledgeStore, graph: dict[str, int]) -> None:
    around_b = store.neighbourhood(graph["b"])
    assert names(graph, around_b.distances) == {"b": 0, "a": 1, "c": 1}
    assert names(graph, store.neighbourhood(graph["b"], relation="back").distances) == {
        "b": 0,
        "c": 1,
    }
    assert names(graph, store.neighbourhood(graph["a"], hops=2).distances) == {
        "a": 0,
        "b": 1,
        "c": 2,
    }


# ---- consolidation and migration ------------------------------------------------------------


def legacy(path: Path) -> None:
    """A version-1 file: names unique only as typed, so "Rex" and "rex " are two rows."""
    old = open_db(path, MIGRATIONS[:1])
    with old.transaction() as conn:
        for i, (name, type_) in enumerate(
            [("Rex", "dog"), ("rex ", "dog"), ("user", "person"), ("Dr. Silva", "person")], 1
        ):
            conn.execute(
                "INSERT INTO entities(id, name, type, aliases, attributes, created_at,"
                " updated_at) VALUES (?, ?, ?, '[]', ?, ?, ?)",
                (i, name, type_, json.dumps({"row": i}), float(i), float(i)),
            )
        conn.executemany(
            "INSERT INTO relations(source_id, relation, target_id, weight, created_at)"
            " VALUES (?, ?, ?, 1.0, 0)",
            [(3, "has_dog", 1), (3, "has_dog", 2), (1, "treated_by", 4), (2, "friend_of", 1)],
        )
        conn.execute(
            "INSERT INTO facts(id, text, confidence, source, created_at)"
            " VALUES (1, 'Rex barks at the postman.', 1.0, 'message:7', 0)"
        )
        conn.execute("INSERT INTO fact_entities(fact_id, entity_id) VALUES (1, 2)")
    old.close()


def test_migration_from_version_1_keeps_data_and_enables_new_features(tmp_path: Path) -> None:
    path = tmp_path / "knowledge.db"
    legacy(path)
    db = open_db(path)
    try:
        assert db.reader().execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        store = KnowledgeStore(db)
        assert store.entity(2).name == "rex "  # kept, waiting to be merged into Rex
        assert [e.id for e in store.entities(type="dog")] == [1]
        assert store.stats()["pending_merges"] == 1
        assert store.fact(1).provenance == ["message:7"]  # the old source column moved
        assert [fid for fid, _ in store.keyword_search("barking postmen")] == [1]
        assert upsert(store, "REX", "dog").id == 1  # normalised names
        with db.transaction() as conn:
            rel = store.add_relation(conn, 3, "has_dog", 2)  # a pending id means its survivor
        assert (rel.target_id, rel.id) == (1, store.relations_of(1)[0].id)
        distances = store.traverse(3, hops=2, direction="out").distances
        assert distances == {3: 0, 1: 1, 2: 1, 4: 2}
    finally:
        db.close()


def test_consolidate_merges_duplicates_and_keeps_everything_they_had(tmp_path: Path) -> None:
    path = tmp_path / "knowledge.db"
    legacy(path)
    db = open_db(path)
    try:
        store = KnowledgeStore(db)
        upsert(store, "Rex", "dog", provenance="message:1")
        with db.transaction() as conn:  # the duplicate's own source
            conn.execute("INSERT INTO provenance VALUES ('entity', 2, 'message:2', 0)")
        ana = upsert(store, "Ana", "person", provenance="message:3")
        upsert(store, "user", "person", aliases=["Ana"], provenance="message:4")
        with db.transaction() as conn:
            store.add_relation(conn, ana.id, "knows", 4, provenance="message:3")
            store.add_relation(conn, 3, "knows", 4, provenance="message:4")
            fact = store.add_fact(conn, "Ana likes tea.", entity_ids=[ana.id])
            merged = store.consolidate(conn)
        assert merged == [(2, 1), (ana.id, 3)]
        assert [e.name for e in store.entities(limit=10)] == ["user", "Rex", "Dr. Silva"]
        with pytest.raises(NotFound):
            store.entity(ana.id)
        user = store.entity(3)
        assert user.aliases == ["Ana"]
        rex = store.entity(1)
        assert rex.aliases == []  # "rex " is the same name, not an alias
        assert rex.attributes == {"row": 1}  # the survivor's attributes win
        assert store.provenance("entity", 1) == ["message:2", "message:1"]
        assert set(store.provenance("entity", 3)) == {"message:3", "message:4"}

        triples = {(r.source_id, r.relation, r.target_id): r for r in store.relations_of(1)}
        assert set(triples) == {(3, "has_dog", 1), (1, "treated_by", 4)}  # no self-loop
        assert triples[(3, "has_dog", 1)].weight == 2.0  # the two old rows, one triple
        knows = [r for r in store.relations_of(3) if r.relation == "knows"]
        assert [(r.target_id, r.weight, r.provenance) for r in knows] == [
            (4, 2.0, ["message:3", "message:4"])
        ]
        assert store.fact(1).entity_ids == [1]
        assert store.fact(fact.id).entity_ids == [3]
        assert ("delete", "entity", 2) in outbox_rows(db)
        assert ("delete", "entity", ana.id) in outbox_rows(db)
        assert store.stats()["pending_merges"] == 0
        with db.transaction() as conn:
            assert store.consolidate(conn) == []  # nothing left to merge
            with pytest.raises(BadRequest):
                store.merge(conn, 1, 1)
    finally:
        db.close()


def test_consolidate_repairs_keys_the_migration_could_not_normalise(tmp_path: Path) -> None:
    """SQLite's lower() is ASCII-only: "ÉMILE" and "émile" get different keys in SQL."""
    path = tmp_path / "knowledge.db"
    old = open_db(path, MIGRATIONS[:1])
    with old.transaction() as conn:
        for name in ("ÉMILE", "émile"):
            conn.execute(
                "INSERT INTO entities(name, type, created_at, updated_at)"
                " VALUES (?, 'person', 0, 0)",
                (name,),
            )
    old.close()
    db = open_db(path)
    try:
        store = KnowledgeStore(db)
        assert len(store.entities()) == 2
        with db.transaction() as conn:
            assert store.consolidate(conn) == [(2, 1)]
        assert upsert(store, "Émile", "person").id == 1
    finally:
        db.close()


# ---- extraction -----------------------------------------------------------------------------


def triples(found: Extraction) -> set[tuple[str, str, str]]:
    return {(r.source, r.relation, r.target) for r in found.relations}


@pytest.mark.parametrize(
    ("text", "entities", "relation", "fact"),
    [
        (
            "My dog's name is Rex.",
            {("user", "person"), ("Rex", "dog")},
            ("user", "has_dog", "Rex"),
            "The user's dog is named Rex.",
        ),
        (
            "my dog is called rex",
            {("user", "person"), ("Rex", "dog")},
            ("user", "has_dog", "Rex"),
            "The user's dog is named Rex.",
        ),
        (
            "I live in Paris.",
            {("user", "person"), ("Paris", "place")},
            ("user", "lives_in", "Paris"),
            "The user lives in Paris.",
        ),
        (
            "I work for Acme Corp, since May.",
            {("user", "person"), ("Acme Corp", "organization")},
            ("user", "works_at", "Acme Corp"),
            "The user works at Acme Corp.",
        ),
        (
            "I really love green tea because it is calming.",
            {("user", "person"), ("green tea", "thing")},
            ("user", "likes", "green tea"),
            "The user likes green tea.",
        ),
        (
            "Lisbon is the capital of Portugal.",
            {("Lisbon", "thing"), ("Portugal", "thing")},
            ("Lisbon", "capital_of", "Portugal"),
            "Lisbon is the capital of Portugal.",
        ),
        (
            "Rex is a labrador.",
            {("Rex", "thing"), ("labrador", "concept")},
            ("Rex", "is_a", "labrador"),
            "Rex is a labrador.",
        ),
    ],
)
async def test_rules_extract_entities_relations_and_facts(
    text: str, entities: set[tuple[str, str]], relation: tuple[str, str, str], fact: str
) -> None:
    found = await extract(text)
    assert found.method == "rules"
    assert {(e.name, e.type) for e in found.entities} == entities
    assert triples(found) == {relation}
    first_person = text.lower().startswith(("my ", "i "))
    assert found.facts == ([fact, text] if first_person else [fact])  # + the user's own words


async def test_rules_give_the_user_a_name_and_find_capitalised_names() -> None:
    found = await extract("My name is Ana. Yesterday I met John Smith at the Bank of America.")
    [user] = [e for e in found.entities if e.name == "user"]
    assert (user.aliases, user.attributes) == (["Ana"], {"name": "Ana"})
    others = {(e.name, e.type) for e in found.entities if e.name != "user"}
    assert others == {("John Smith", "thing"), ("Bank of America", "thing")}  # not "Yesterday"
    assert "The user's name is Ana." in found.facts


@pytest.mark.parametrize(
    "text",
    ["The weather is nice today.", "What is my dog called?", "I live in the city.", ""],
)
async def test_rules_find_nothing_where_there_is_nothing(text: str) -> None:
    found = await extract(text)
    assert (found.entities, found.relations) == ([], [])
    assert found.facts == ([text] if text == "I live in the city." else [])


async def test_a_usable_model_answer_is_used_and_cleaned() -> None:
    prompts: list[str] = []

    async def generate(prompt: str) -> str:
        prompts.append(prompt)
        answer = {
            "entities": [
                {"name": "I", "type": "person"},
                {"name": "Rex", "type": "Dog"},
                {"name": "Atlantis", "type": "place"},  # not in the text: invented
                {"name": "", "type": "thing"},
            ],
            "relations": [
                {"source": "user", "relation": "has dog", "target": "rex"},
                {"source": "Rex", "relation": "lives_in", "target": "Atlantis"},
            ],
            "facts": ["The user has a dog named Rex.", "Bananas are yellow."],
        }
        return f"Sure! Here it is:\n```json\n{json.dumps(answer)}\n```\n{{not json}}"

    found = await extract("My dog's name is Rex.", generate)
    assert found.method == "llm"
    assert "My dog's name is Rex." in prompts[0]
    assert {(e.name, e.type) for e in found.entities} == {("user", "person"), ("Rex", "dog")}
    assert triples(found) == {("user", "has_dog", "Rex")}
    assert found.facts == ["The user has a dog named Rex.", "My dog's name is Rex."]


async def _garbage(prompt: str) -> str:
    return "Rex Rex Rex dog dog { not json at all"


async def _invented(prompt: str) -> str:
    return '{"entities": [{"name": "Zorg", "type": "alien"}], "facts": ["Zorg rules."]}'


async def _wrong_shape(prompt: str) -> str:
    return '{"entities": "Rex", "relations": 3}'


async def _failing(prompt: str) -> str:
    raise RuntimeError("the model is not loaded")


@pytest.mark.parametrize("generate", [_garbage, _invented, _wrong_shape, _failing])
async def test_an_unusable_model_answer_falls_back_to_the_rules(generate: object) -> None:
    found = await extract("My dog's name is Rex.", generate)  # type: ignore[arg-type]
    assert found.method == "rules"
    assert triples(found) == {("user", "has_dog", "Rex")}


def test_the_first_json_object_is_found_among_prose() -> None:
    assert first_json_object('x {"a": [1, {"b": 2}]} {"c": 3}') == {"a": [1, {"b": 2}]}
    assert first_json_object('[1, 2] {bad} {"ok": true}') == {"ok": True}
    assert first_json_object("no object") is None
