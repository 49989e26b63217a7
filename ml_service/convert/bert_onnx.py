"""Build an ONNX graph of a BERT encoder straight from its safetensors weights, without torch.

Why by hand: the usual route (``torch.onnx.export`` or optimum) needs torch, a multi-gigabyte
dependency the server must not carry just to run a 22M-parameter embedding model once converted.
A BERT encoder is a short, fixed recipe (embeddings, then N identical blocks of self-attention and
a feed-forward network, each followed by a residual add and LayerNorm), so this module writes that
recipe with ``onnx.helper`` from standard opset-17 operators and the checkpoint's own numbers.
onnxruntime's graph optimiser later fuses the plain operators (attention, bias + GELU, skip +
LayerNorm) into its fast kernels, so nothing is lost by writing them out plainly.

Every hyperparameter comes from the model's ``config.json``; nothing is specific to MiniLM.

The graph:

* inputs ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 ``[batch, sequence]``;
* output ``last_hidden_state``: float32 ``[batch, sequence, hidden_size]`` (pooling is left to the
  caller, which reads the sentence-transformers pooling config).

The file is written atomically (temporary file in the same folder, fsync, ``os.replace``), so a
crash mid-write never leaves a truncated model under the final name, and it records the SHA-256 of
the source ``model.safetensors`` (and this converter's version) in ``metadata_props``, so a cache
can tell a stale conversion from a current one (:func:`read_conversion_metadata`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

OPSET = 17  # first opset with a native LayerNormalization operator
# Bump when the emitted graph changes, so caches built by an older converter are rebuilt.
CONVERTER_VERSION = "1"
META_SOURCE_SHA256 = "tabagent.source_sha256"
META_CONVERTER = "tabagent.converter"
WEIGHTS_FILE = "model.safetensors"
# What HF transformers adds to the attention scores of padding positions: the most negative
# float32, so exp() of a masked score is exactly 0 whatever the real scores are.
_MASK_VALUE = float(np.finfo(np.float32).min)
_SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class BertConfig:
    """The hyperparameters of ``config.json`` that shape the graph."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int
    vocab_size: int

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        """Read and validate ``config.json``; refuse what this converter would get wrong."""
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        model_type = raw.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"{path}: model_type {model_type!r} is not 'bert'")
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"{path}: position_embedding_type {position_type!r} is unsupported")
        config = cls(
            hidden_size=int(raw["hidden_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            hidden_act=str(raw.get("hidden_act", "gelu")),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            max_position_embeddings=int(raw["max_position_embeddings"]),
            type_vocab_size=int(raw.get("type_vocab_size", 2)),
            vocab_size=int(raw["vocab_size"]),
        )
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"{path}: hidden_size is not a multiple of num_attention_heads")
        if config.hidden_act not in _SUPPORTED_ACTIVATIONS:
            raise ValueError(f"{path}: hidden_act {config.hidden_act!r} is unsupported")
        return config


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (weights can be larger than we want in memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_conversion_metadata(onnx_path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (its weights are parsed too: protobuf reads whole)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


class _Weights:
    """The checkpoint's tensors by their BertModel names, whatever prefix the checkpoint used.

    Checkpoints saved from a task model (``BertForMaskedLM``...) prefix every name with ``bert.``;
    sentence-transformers checkpoints such as all-MiniLM-L6-v2 have no prefix.
    """

    def __init__(self, path: Path) -> None:
        self._tensors = load_file(str(path))
        self._prefix = "" if "embeddings.word_embeddings.weight" in self._tensors else "bert."
        if f"{self._prefix}embeddings.word_embeddings.weight" not in self._tensors:
            raise ValueError(f"{path}: no BERT word embeddings (embeddings.word_embeddings.weight)")

    def __call__(self, name: str) -> FloatArray:
        key = self._prefix + name
        if key not in self._tensors:
            raise KeyError(f"checkpoint has no tensor {key!r}")
        return np.asarray(self._tensors[key], dtype=np.float32)  # float16 checkpoints too

    def linear(self, name: str) -> tuple[FloatArray, FloatArray]:
        """A torch ``nn.Linear`` as (W transposed to [in, out], bias): ``x @ W + b`` in ONNX."""
        weight = self(f"{name}.weight")
        return np.ascontiguousarray(weight.T), self(f"{name}.bias")


class _GraphBuilder:
    """Collects nodes and initializers; each ``op`` call returns the name of its output."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def tensor(self, name: str, value: npt.ArrayLike, dtype: type[Any] = np.float32) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, output: str = "", **attrs: Any) -> str:
        self._count += 1
        node_name = f"{name}/{op_type}_{self._count}"
        out = output or node_name
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=node_name, **attrs))
        return out

    def dense(self, x: str, weights: _Weights, source: str, name: str) -> str:
        """``x @ W + b`` for the ``nn.Linear`` named ``source`` in the checkpoint."""
        weight, bias = weights.linear(source)
        w = self.tensor(f"{source}.weight_t", weight)
        b = self.tensor(f"{source}.bias", bias)
        return self.op("Add", [self.op("MatMul", [x, w], name), b], name)

    def layer_norm(
        self, x: str, weights: _Weights, source: str, eps: float, name: str, output: str = ""
    ) -> str:
        scale = self.tensor(f"{source}.weight", weights(f"{source}.weight"))
        bias = self.tensor(f"{source}.bias", weights(f"{source}.bias"))
        return self.op(
            "LayerNormalization", [x, scale, bias], name, output=output, axis=-1, epsilon=eps
        )

    def activation(self, x: str, kind: str, name: str) -> str:
        """The feed-forward activation; ``gelu`` is the exact erf form HF BERT uses."""
        if kind == "relu":
            return self.op("Relu", [x], name)
        half = self.tensor(f"{name}/half", 0.5)
        one = self.tensor(f"{name}/one", 1.0)
        if kind == "gelu":  # 0.5 * x * (1 + erf(x / sqrt(2)))
            inv_sqrt2 = self.tensor(f"{name}/inv_sqrt2", 1.0 / math.sqrt(2.0))
            inner = self.op("Erf", [self.op("Mul", [x, inv_sqrt2], name)], name)
        else:  # gelu_new / gelu_pytorch_tanh: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
            coeff = self.tensor(f"{name}/coeff", 0.044715)
            scale = self.tensor(f"{name}/sqrt_2_over_pi", math.sqrt(2.0 / math.pi))
            cube = self.op("Mul", [self.op("Mul", [x, x], name), x], name)
            poly = self.op("Add", [x, self.op("Mul", [cube, coeff], name)], name)
            inner = self.op("Tanh", [self.op("Mul", [poly, scale], name)], name)
        gate = self.op("Mul", [self.op("Add", [inner, one], name), half], name)
        return self.op("Mul", [x, gate], name)


def _attention(
    g: _GraphBuilder, x: str, mask: str, weights: _Weights, cfg: BertConfig, layer: int
) -> str:
    """Multi-head self-attention of one layer, before its output projection."""
    source = f"encoder.layer.{layer}.attention.self"
    name = f"layer{layer}/attention"
    heads = g.tensor(
        f"{name}/heads_shape", [0, 0, cfg.num_attention_heads, cfg.head_size], np.int64
    )
    merged = g.tensor(f"{name}/merged_shape", [0, 0, cfg.hidden_size], np.int64)

    def split(which: str, perm: list[int]) -> str:
        # [batch, seq, hidden] -> [batch, seq, heads, head_size] -> perm
        projected = g.dense(x, weights, f"{source}.{which}", f"{name}/{which}")
        return g.op("Transpose", [g.op("Reshape", [projected, heads], name)], name, perm=perm)

    query = split("query", [0, 2, 1, 3])  # [batch, heads, seq, head_size]
    key_t = split("key", [0, 2, 3, 1])  # [batch, heads, head_size, seq]
    value = split("value", [0, 2, 1, 3])  # [batch, heads, seq, head_size]

    scale = g.tensor(f"{name}/scale", 1.0 / math.sqrt(cfg.head_size))
    scores = g.op("Mul", [g.op("MatMul", [query, key_t], name), scale], name)
    probs = g.op("Softmax", [g.op("Add", [scores, mask], name)], name, axis=-1)
    context = g.op("MatMul", [probs, value], name)  # [batch, heads, seq, head_size]
    context = g.op("Transpose", [context], name, perm=[0, 2, 1, 3])
    return g.op("Reshape", [context, merged], name)  # [batch, seq, hidden]


def _encoder_layer(
    g: _GraphBuilder, x: str, mask: str, weights: _Weights, cfg: BertConfig, layer: int
) -> str:
    """One post-LayerNorm BERT block: attention + residual + LN, then FFN + residual + LN."""
    source = f"encoder.layer.{layer}"
    name = f"layer{layer}"
    context = _attention(g, x, mask, weights, cfg, layer)
    projected = g.dense(context, weights, f"{source}.attention.output.dense", f"{name}/attn_out")
    attended = g.layer_norm(
        g.op("Add", [projected, x], f"{name}/attn_out"),
        weights,
        f"{source}.attention.output.LayerNorm",
        cfg.layer_norm_eps,
        f"{name}/attn_out",
    )
    hidden = g.dense(attended, weights, f"{source}.intermediate.dense", f"{name}/ffn_in")
    hidden = g.activation(hidden, cfg.hidden_act, f"{name}/ffn_act")
    out = g.dense(hidden, weights, f"{source}.output.dense", f"{name}/ffn_out")
    is_last = layer == cfg.num_hidden_layers - 1
    return g.layer_norm(
        g.op("Add", [out, attended], f"{name}/ffn_out"),
        weights,
        f"{source}.output.LayerNorm",
        cfg.layer_norm_eps,
        f"{name}/ffn_out",
        output="last_hidden_state" if is_last else "",
    )


def _embeddings(g: _GraphBuilder, weights: _Weights, cfg: BertConfig) -> str:
    """Word + position + token-type embeddings, then LayerNorm."""
    name = "embeddings"
    words = g.tensor(
        "embeddings.word_embeddings.weight", weights("embeddings.word_embeddings.weight")
    )
    types = g.tensor(
        "embeddings.token_type_embeddings.weight",
        weights("embeddings.token_type_embeddings.weight"),
    )
    positions = g.tensor(
        "embeddings.position_embeddings.weight", weights("embeddings.position_embeddings.weight")
    )
    # Positions are 0..seq-1 (the checkpoint's position_ids buffer is exactly that), so the rows
    # are a slice of the table. Slice clamps at the table's end, so a sequence longer than
    # max_position_embeddings fails in the Add below (shape mismatch) instead of reading garbage.
    seq_len = g.op("Shape", ["input_ids"], name, start=1, end=2)
    zero = g.tensor(f"{name}/zero", [0], np.int64)
    axis0 = g.tensor(f"{name}/axis0", [0], np.int64)
    position_rows = g.op("Slice", [positions, zero, seq_len, axis0], name)  # [seq, hidden]
    summed = g.op(
        "Add",
        [
            g.op(
                "Add",
                [
                    g.op("Gather", [words, "input_ids"], name),
                    g.op("Gather", [types, "token_type_ids"], name),
                ],
                name,
            ),
            position_rows,
        ],
        name,
    )
    return g.layer_norm(summed, weights, "embeddings.LayerNorm", cfg.layer_norm_eps, name)


def _additive_mask(g: _GraphBuilder) -> str:
    """attention_mask [batch, seq] (1 = token, 0 = padding) -> [batch, 1, 1, seq] score bias."""
    name = "mask"
    as_float = g.op("Cast", ["attention_mask"], name, to=TensorProto.FLOAT)
    one = g.tensor(f"{name}/one", 1.0)
    lowest = g.tensor(f"{name}/lowest", _MASK_VALUE)
    bias = g.op("Mul", [g.op("Sub", [one, as_float], name), lowest], name)
    axes = g.tensor(f"{name}/axes", [1, 2], np.int64)
    return g.op("Unsqueeze", [bias, axes], name)


def build_bert_model(model_dir: Path) -> onnx.ModelProto:
    """The ONNX model (in memory) for the BERT checkpoint in ``model_dir``."""
    cfg = BertConfig.from_file(model_dir / "config.json")
    weights_path = model_dir / WEIGHTS_FILE
    weights = _Weights(weights_path)
    vocab_rows = weights("embeddings.word_embeddings.weight").shape[0]
    if vocab_rows != cfg.vocab_size:
        raise ValueError(f"config vocab_size {cfg.vocab_size} != {vocab_rows} embedding rows")

    g = _GraphBuilder()
    mask = _additive_mask(g)
    hidden = _embeddings(g, weights, cfg)
    for layer in range(cfg.num_hidden_layers):
        hidden = _encoder_layer(g, hidden, mask, weights, cfg, layer)

    dims = ["batch", "sequence"]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, dims)
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    output = helper.make_tensor_value_info(
        "last_hidden_state", TensorProto.FLOAT, [*dims, cfg.hidden_size]
    )
    graph = helper.make_graph(g.nodes, "bert_encoder", inputs, [output], g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="tabagent.bert_onnx",
        producer_version=CONVERTER_VERSION,
    )
    # IR 8 is what opset 17 needs; newer onnx defaults to an IR that older runtimes refuse.
    model.ir_version = 8
    helper.set_model_props(
        model,
        {META_SOURCE_SHA256: file_sha256(weights_path), META_CONVERTER: CONVERTER_VERSION},
    )
    onnx.checker.check_model(model)
    return model


def _write_atomically(data: bytes, out_path: Path) -> None:
    """Write ``data`` to ``out_path`` so readers see the old file or the complete new one."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def build_bert_onnx(model_dir: Path, out_path: Path) -> Path:
    """Convert the BERT checkpoint in ``model_dir`` to an ONNX file at ``out_path``.

    The file is self-contained (weights inside, fine below protobuf's 2 GiB limit for
    BERT-base-sized models) and replaces any previous file at ``out_path`` atomically.
    """
    model = build_bert_model(Path(model_dir))
    _write_atomically(model.SerializeToString(), Path(out_path))
    return Path(out_path)
