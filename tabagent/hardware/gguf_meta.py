"""The few GGUF metadata values that size a model in memory, read without loading it.

Layer count, trained context and the attention shape give the KV cache's size, which with the
file's size is what a model needs in RAM or VRAM. ``gguf.GGUFReader`` (llama.cpp's package)
parses every tensor and the whole tokenizer (seconds for a small model); this reads key/value
pairs only, skipping arrays, and stops once it has what it was asked for.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

_SCALARS = {  # GGUF value type -> struct format (little-endian)
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9


class GgufError(ValueError):
    pass


def _read(fh: IO[bytes], fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = fh.read(size)
    if len(data) != size:
        raise GgufError("file ends inside its metadata")
    return struct.unpack(fmt, data)[0]


def _string(fh: IO[bytes]) -> str:
    length = _read(fh, "<Q")
    if length > 1 << 24:
        raise GgufError(f"implausible string length {length}")
    return fh.read(length).decode("utf-8", errors="replace")


def _skip(fh: IO[bytes], kind: int) -> None:
    if kind in _SCALARS:
        fh.seek(struct.calcsize(_SCALARS[kind]), 1)
    elif kind == _STRING:
        fh.seek(_read(fh, "<Q"), 1)
    elif kind == _ARRAY:
        item, count = _read(fh, "<I"), _read(fh, "<Q")
        if item in _SCALARS:
            fh.seek(struct.calcsize(_SCALARS[item]) * count, 1)
        else:
            for _ in range(count):
                _skip(fh, item)
    else:
        raise GgufError(f"unknown GGUF value type {kind}")


def read_metadata(path: Path, wanted: Iterable[str]) -> dict[str, Any]:
    """Scalar metadata values among ``wanted`` (``{arch}`` in a key is the file's architecture,
    from ``general.architecture``). Missing keys are left out."""
    patterns = list(wanted)
    found: dict[str, Any] = {}
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise GgufError(f"{path.name} is not a GGUF file")
        version = _read(fh, "<I")
        if version < 2:
            raise GgufError(f"GGUF version {version} is too old")
        _read(fh, "<Q")  # tensor count
        arch = None
        for _ in range(_read(fh, "<Q")):
            key, kind = _string(fh), _read(fh, "<I")
            keys = {p.replace("{arch}", arch or "\0") for p in patterns}
            if kind == _STRING and key == "general.architecture":
                arch = found[key] = _string(fh)
            elif key in keys and kind in _SCALARS:
                found[key] = _read(fh, _SCALARS[kind])
            elif key in keys and kind == _STRING:
                found[key] = _string(fh)
            else:
                _skip(fh, kind)
            if arch and all(p.replace("{arch}", arch) in found for p in patterns):
                break
    if arch is not None:
        found = {k.replace(f"{arch}.", "{arch}.", 1): v for k, v in found.items()}
    return found
