"""Turn what a user typed into a safe FTS5 query.

FTS5 has its own query language (``AND``, ``NEAR``, column filters, ``*``); user text must not
be parsed as such (``"dog's"`` is a syntax error, ``title:x`` a column filter). Every word is
quoted and the words are OR-ed, so BM25 ranks documents by how many rare words they share.
Common function words are dropped unless nothing else is left.
"""

from __future__ import annotations

import re
import sqlite3

_WORD = re.compile(r"\w+", re.UNICODE)
_MAX_TERMS = 32
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "he",
        "her",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "me",
        "my",
        "no",
        "not",
        "of",
        "on",
        "or",
        "our",
        "she",
        "so",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
    ]
)


def terms(text: str) -> list[str]:
    words = [w.lower() for w in _WORD.findall(text)]
    content = [w for w in words if w not in STOPWORDS]
    chosen = content or words
    seen: dict[str, None] = {}
    for word in chosen:
        seen.setdefault(word, None)
    return list(seen)[:_MAX_TERMS]


def ranked(conn: sqlite3.Connection, table: str, text: str, limit: int) -> list[tuple[int, float]]:
    """(rowid, score: higher is better) of an FTS5 ``table``, best first, by FTS5's own
    ``rank`` (BM25), which lets it stop early instead of scoring twice."""
    expr = match_expression(text)
    if expr is None:
        return []
    rows = conn.execute(
        f"SELECT rowid, -rank FROM {table} WHERE {table} MATCH ? ORDER BY rank LIMIT ?",
        (expr, limit),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def match_expression(text: str) -> str | None:
    """``"what is my dog called?"`` → ``"dog" OR "called"``; None when there is no word."""
    words = terms(text)
    if not words:
        return None
    return " OR ".join(f'"{w}"' for w in words)
