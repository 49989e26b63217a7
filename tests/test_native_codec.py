"""Chrome's native-messaging framing, in and out, including property tests of arbitrary splits."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tabagent.native_messaging.codec import (
    CHROME_MAX_INCOMING,
    MAX_OUTGOING,
    FrameDecoder,
    FrameError,
    Reassembler,
    decode_json,
    dumps,
    frame,
    frames_for,
    split_text,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def decode_all(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list[bytes | FrameError]:
    """Feed ``data`` cut at ``cuts`` (as a pipe might deliver it)."""
    out: list[bytes | FrameError] = []
    start = 0
    for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
        out.extend(decoder.feed(data[start:cut]))
        start = cut
    return out


@given(messages=st.lists(json_values, max_size=6), cuts=st.lists(st.integers(0, 4000)))
def test_any_messages_survive_any_split(messages: list[Any], cuts: list[int]) -> None:
    wire = b"".join(frame(dumps(m).encode()) for m in messages)
    decoder = FrameDecoder()
    payloads = decode_all(decoder, wire, cuts)
    assert [decode_json(p) for p in payloads if isinstance(p, bytes)] == messages
    assert decoder.eof() is None  # ended on a frame boundary


def test_header_is_native_byte_order_and_counts_utf8_bytes() -> None:
    encoded = frames_for({"text": "é€😀"})[0]
    body = dumps({"text": "é€😀"}).encode("utf-8")
    assert encoded[:4] == struct.pack("=I", len(body))  # bytes, not characters
    assert len(body) > len('{"text":"é€😀"}')


def test_zero_length_frame_is_an_invalid_message_not_a_hang() -> None:
    decoder = FrameDecoder()
    (payload,) = decoder.feed(struct.pack("=I", 0))
    error = decode_json(payload)  # type: ignore[arg-type]
    assert isinstance(error, FrameError)
    assert error.code == "invalid_json"
    assert error.in_sync


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"\xff\xfe{}", "invalid_utf8"),
        (b"{not json", "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
    ],
)
def test_bad_payloads_are_errors_and_leave_the_stream_in_sync(body: bytes, code: str) -> None:
    decoder = FrameDecoder()
    out = list(decoder.feed(frame(body) + frame(b'{"ok":1}')))
    assert len(out) == 2
    error = decode_json(out[0])  # type: ignore[arg-type]
    assert isinstance(error, FrameError)
    assert error.code == code
    assert error.in_sync
    assert decode_json(out[1]) == {"ok": 1}  # type: ignore[arg-type]


def test_message_over_the_limit_is_skipped_without_being_stored() -> None:
    decoder = FrameDecoder(limit=1024)
    big = b"x" * 100_000
    out = decode_all(decoder, frame(big) + frame(b'{"after":true}'), list(range(0, 100_010, 997)))
    assert isinstance(out[0], FrameError)
    assert out[0].code == "message_too_large"
    assert out[0].in_sync
    assert decode_json(out[1]) == {"after": True}  # type: ignore[arg-type]
    assert len(decoder._buffer) == 0  # nothing of the big body was kept


@pytest.mark.parametrize("length", [CHROME_MAX_INCOMING + 1, 4 * 1024**3 - 1])
def test_absurd_length_breaks_the_stream_without_allocating(length: int) -> None:
    decoder = FrameDecoder()
    out = list(decoder.feed(struct.pack("=I", length) + b"garbage that follows"))
    assert len(out) == 1
    assert isinstance(out[0], FrameError)
    assert out[0].code == "frame_too_large"
    assert not out[0].in_sync
    assert decoder.broken
    assert list(decoder.feed(frame(b"{}"))) == []  # nothing more is decoded
    assert len(decoder._buffer) == 0


@pytest.mark.parametrize(
    "wire",
    [b"\x05\x00", frame(b'{"a": 1}')[:-2], frame(b"x" * 2000)[:100]],
    ids=["header", "body", "skip"],
)
def test_truncated_frame_at_eof_is_reported(wire: bytes) -> None:
    decoder = FrameDecoder(limit=1024)
    list(decoder.feed(wire))
    error = decoder.eof()
    assert error is not None
    assert error.code == "truncated_frame"
    assert not error.in_sync


def test_clean_eof_is_no_error() -> None:
    decoder = FrameDecoder()
    list(decoder.feed(frame(b"{}")))
    assert decoder.eof() is None


def test_limit_must_be_within_what_chrome_sends() -> None:
    with pytest.raises(ValueError, match="limit must be"):
        FrameDecoder(limit=CHROME_MAX_INCOMING + 1)


# -- outgoing: the 1 MiB boundary ---------------------------------------------------------


def _message_of_size(size: int) -> dict[str, Any]:
    """A message whose JSON encoding is exactly ``size`` bytes."""
    base = {"id": "r1", "event": "done", "data": ""}
    overhead = len(dumps(base).encode())
    return {**base, "data": "a" * (size - overhead)}


@pytest.mark.parametrize("size", [MAX_OUTGOING - 1, MAX_OUTGOING])
def test_messages_up_to_one_mib_go_as_one_frame(size: int) -> None:
    frames = frames_for(_message_of_size(size))
    assert len(frames) == 1
    assert len(frames[0]) == 4 + size


@pytest.mark.parametrize("size", [MAX_OUTGOING + 1, 3 * MAX_OUTGOING + 12345])
def test_larger_messages_are_chunked_and_every_frame_fits(size: int) -> None:
    message = _message_of_size(size)
    frames = frames_for(message)
    assert len(frames) >= 2
    assembler = Reassembler()
    whole = None
    for index, raw in enumerate(frames):
        (length,) = struct.unpack("=I", raw[:4])
        assert length == len(raw) - 4 <= MAX_OUTGOING
        chunk = json.loads(raw[4:])
        assert chunk["id"] == "r1"
        assert chunk["event"] == "chunk"
        assert chunk["chunk"] == {"index": index, "count": len(frames)}
        whole = assembler.add(chunk)
    assert whole == message


@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(
    alphabet=st.sampled_from(['"', "\\", "\n", "\x01", "é", "😀", "a", "€"]),
    extra=st.integers(1, 50_000),
)
def test_chunking_holds_for_text_that_grows_when_escaped(alphabet: str, extra: int) -> None:
    """Quotes and control characters double or sextuple when escaped; 4-byte emoji; all fit."""
    text = alphabet * ((MAX_OUTGOING // max(1, len(alphabet.encode()))) + extra)
    message = {"id": 7, "event": "done", "data": {"text": text}}
    frames = frames_for(message)
    assert all(len(f) - 4 <= MAX_OUTGOING for f in frames)
    assembler = Reassembler()
    results = [assembler.add(json.loads(f[4:])) for f in frames]
    assert results[-1] == message
    assert all(r is None for r in results[:-1])


def test_split_text_pieces_join_back_and_fit() -> None:
    text = '"quoted"\\' * 1000 + "plain" * 1000
    pieces = list(split_text(text, 4096))
    assert "".join(pieces) == text
    assert all(len(dumps(p).encode()) <= 4096 for p in pieces)


def test_reassembler_rejects_chunks_out_of_order() -> None:
    frames = frames_for(_message_of_size(MAX_OUTGOING * 2))
    chunks = [json.loads(f[4:]) for f in frames]
    assembler = Reassembler()
    with pytest.raises(ValueError, match="chunk 1 arrived when 0 was expected"):
        assembler.add(chunks[1])


def test_protocol_doc_names_every_method_and_error_code() -> None:
    """PROTOCOL.md is the contract: each operation and each error code the code can send is in
    it (a new one fails here until it is documented)."""
    import re
    from pathlib import Path

    from tabagent.ops import default_registry

    root = Path(__file__).parents[1]
    doc = (root / "tabagent" / "native_messaging" / "PROTOCOL.md").read_text()
    for op in default_registry():
        _, _, name = op.name.partition(".")
        assert op.name in doc or f"`.{name}`" in doc, f"{op.name} is not in PROTOCOL.md"
    source = "\n".join(
        p.read_text() for d in ("tabagent", "ml_service") for p in (root / d).rglob("*.py")
    )
    codes = set(re.findall(r'code ?= ?"([a-z_]+)"', source))
    codes |= set(re.findall(r'FrameError\(\s*"([a-z_]+)"', source))
    assert len(codes) > 40
    missing = sorted(c for c in codes if f"`{c}`" not in doc)
    assert not missing, f"error codes missing from PROTOCOL.md: {missing}"
