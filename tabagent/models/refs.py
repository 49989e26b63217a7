"""Model references and the path rules that keep every file inside the cache.

A reference names what to fetch from the Hub:

* ``org/repo`` — the files a model needs (one GGUF quantisation, or an ONNX model with its
  tokenizer and config),
* ``org/repo:QUANT`` — the GGUF of that quantisation (``Q4_K_M``, ``q8_0``…), as llama.cpp's
  ``-hf`` and Ollama's ``hf.co/`` names do; multi-part shards come together,
* ``org/repo/path/to/file`` — one file,
* any of these with ``@revision`` (a branch, tag or commit).

Names and paths are validated before anything touches the disk. A file path from a Hub answer
is data from the network: :func:`safe_relative_path` refuses absolute paths, ``..``, backslashes,
drive letters and control characters, so no listing can place a file outside the cache (the
class of Ollama's "Probllama", CVE-2024-37032).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from tabagent.errors import BadRequest

# Hugging Face's rules: letters, digits, '-', '_', '.'; no '-'/'.' at either end, no '--' or '..'
_NAME = re.compile(r"^(?![-.])(?!.*(?:--|\.\.))[A-Za-z0-9._-]{1,96}(?<![-.])$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/\-]{0,127}$")
_QUANT = re.compile(r"^[A-Za-z0-9_]{1,32}$")
_MAX_PATH = 512


@dataclass(frozen=True)
class ModelRef:
    repo_id: str
    revision: str = "main"
    quant: str | None = None
    file: str | None = None

    def __str__(self) -> str:
        text = self.repo_id
        if self.file:
            text += f"/{self.file}"
        if self.quant:
            text += f":{self.quant}"
        if self.revision != "main":
            text += f"@{self.revision}"
        return text


def safe_relative_path(path: str) -> str:
    """``path`` if it is a plain relative POSIX path inside its root, else BadRequest."""
    if not path or len(path) > _MAX_PATH:
        raise BadRequest(f"file path {path[:80]!r} is empty or too long", code="unsafe_path")
    if any(ord(c) < 32 or c in '\\:*?"<>|' for c in path):
        raise BadRequest(
            f"file path {path!r} has characters a path may not have", code="unsafe_path"
        )
    pure = PurePosixPath(path)
    if pure.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise BadRequest(f"file path {path!r} leaves its folder", code="unsafe_path")
    return str(pure)


def check_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_NAME.match(part) for part in parts):
        raise BadRequest(
            f"{repo_id!r} is not a Hugging Face repository name (org/name)", code="bad_model_ref"
        )
    return repo_id


def check_revision(revision: str) -> str:
    if not _REVISION.match(revision) or ".." in revision:
        raise BadRequest(f"{revision!r} is not a valid revision", code="bad_model_ref")
    return revision


def parse_ref(text: str) -> ModelRef:
    """Parse ``org/repo[/path][:QUANT][@revision]``; raises BadRequest with the reason."""
    text = text.strip()
    if text.startswith(("hf.co/", "huggingface.co/")):
        text = text.split("/", 1)[1]
    revision = "main"
    if "@" in text:
        text, revision = text.rsplit("@", 1)
        check_revision(revision)
    quant = None
    head, sep, tail = text.rpartition(":")
    if sep and "/" not in tail:
        if not _QUANT.match(tail):
            raise BadRequest(f"{tail!r} is not a quantisation tag", code="bad_model_ref")
        text, quant = head, tail
    parts = text.split("/")
    if len(parts) < 2:
        raise BadRequest(
            f"{text!r} is not a model reference: use org/repo, org/repo:QUANT or "
            "org/repo/path/to/file",
            code="bad_model_ref",
        )
    repo_id = check_repo_id("/".join(parts[:2]))
    file = safe_relative_path("/".join(parts[2:])) if len(parts) > 2 else None
    if file and quant:
        raise BadRequest("give either a file path or a :QUANT tag, not both", code="bad_model_ref")
    return ModelRef(repo_id=repo_id, revision=revision, quant=quant, file=file)


_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.gguf$")
_QUANT_IN_NAME = re.compile(
    r"(?:^|[-_.])((?:I?Q\d[A-Z0-9_]*)|F16|BF16|F32)(?=[-_.])", re.IGNORECASE
)
# When a repo holds several quantisations and none is asked for: the common best trade-off first.
QUANT_PREFERENCE = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q4_0", "Q8_0", "Q6_K", "Q5_K_S", "Q3_K_M")


def quant_of(filename: str) -> str | None:
    match = _QUANT_IN_NAME.search(PurePosixPath(filename).name)
    return match.group(1).upper() if match else None


def choose_files(ref: ModelRef, files: list[str]) -> list[str]:
    """Which files of a repo listing the reference needs (all validated as safe paths)."""
    for name in files:
        safe_relative_path(name)
    if ref.file:
        wanted = [f for f in files if f == ref.file or f.startswith(ref.file.rstrip("/") + "/")]
        if not wanted:
            raise BadRequest(f"{ref.repo_id} has no file {ref.file!r}", code="file_not_found")
        return wanted
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if ggufs:
        return _choose_gguf(ref, ggufs)
    if ref.quant:
        raise BadRequest(f"{ref.repo_id} has no GGUF files to pick {ref.quant} from")
    onnx = [f for f in files if f.lower().endswith(".onnx")]
    if onnx:
        model = min(onnx, key=lambda f: (f.count("/"), "quant" in f.lower(), len(f)))
        folder = str(PurePosixPath(model).parent)
        support = [
            f for f in files
            if PurePosixPath(f).name in _ONNX_SUPPORT
            and str(PurePosixPath(f).parent) in (".", folder)
        ]  # fmt: skip
        data = [f for f in files if f.startswith(model) and f != model]  # external weights
        pooling = [f for f in files if f in _ONNX_SUPPORT_PATHS]
        return sorted({model, *data, *support, *pooling})
    raise BadRequest(
        f"{ref.repo_id} has neither GGUF nor ONNX files; name a file: {ref.repo_id}/<path>",
        code="unsupported_model",
    )


_ONNX_SUPPORT = {
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "modules.json", "sentence_bert_config.json", "generation_config.json",
}  # fmt: skip
_ONNX_SUPPORT_PATHS = {"1_Pooling/config.json"}  # sentence-transformers' pooling settings


def _choose_gguf(ref: ModelRef, ggufs: list[str]) -> list[str]:
    by_quant: dict[str, list[str]] = {}
    for name in ggufs:
        if "mmproj" in name.lower():
            continue  # vision projectors are not chat models
        by_quant.setdefault(quant_of(name) or "", []).append(name)
    if ref.quant:
        picked = by_quant.get(ref.quant.upper())
        if not picked:
            available = ", ".join(sorted(q for q in by_quant if q)) or "none"
            raise BadRequest(
                f"{ref.repo_id} has no {ref.quant} GGUF (available: {available})",
                code="quant_not_found",
            )
    else:
        quant = next((q for q in QUANT_PREFERENCE if q in by_quant), None)
        picked = by_quant[quant] if quant else sorted(ggufs, key=len)[:1]
    return _with_shards(picked, ggufs)


def _with_shards(picked: list[str], ggufs: list[str]) -> list[str]:
    """A split model (``x-00001-of-00003.gguf``) needs all its parts; a plain one stands alone."""
    first = sorted(picked)[0]
    match = _SHARD.match(first)
    if not match:
        return [first]
    stem, total = match.group("stem"), match.group("total")
    shards = sorted(f for f in ggufs if (m := _SHARD.match(f)) and m.group("stem") == stem)
    if len(shards) != int(total):
        raise BadRequest(f"{stem}: {len(shards)} of {int(total)} GGUF parts are listed")
    return shards
