"""How to run a model on this machine: GPU offload, threads, onnxruntime providers, and whether
it fits at all.

A GGUF model needs its weights, a KV cache of ``2 * layers * n_ctx * kv_width`` f16 values and a
compute buffer (estimated as 5 % of the weights plus 256 MiB). The GPU with the most free memory
takes all layers when the whole model fits in that memory less a safety margin (10 % of the
card, at least 512 MiB: the desktop and other programs use VRAM too); otherwise it takes as many
whole layers as fit and the rest run on the CPU; with no usable GPU (none, no free-memory
figure, or a llama.cpp build without GPU support) everything runs on the CPU. Apple Silicon
shares RAM with its GPU: Metal may use about three quarters of it. Other integrated GPUs are
not chosen automatically: they share the CPU's memory bandwidth and seldom beat it.
Generation threads: the physical cores, which llama.cpp runs fastest on (hyper-threads contend
for the same units).

Every figure can be overridden by the user's settings; the plan says which were.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from ml_service.backends.providers import CPU_PROVIDER, choose_providers
from tabagent.hardware.gguf_meta import GgufError, read_metadata
from tabagent.hardware.model import Gpu, HardwareInfo

log = logging.getLogger(__name__)

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_CTX = 4096  # what the worker uses when the model allows more and no n_ctx is set
_KEYS = (
    "{arch}.block_count",
    "{arch}.context_length",
    "{arch}.embedding_length",
    "{arch}.attention.head_count",
    "{arch}.attention.head_count_kv",
)


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What sizing needs to know about a model; unknown fields are None."""

    file_bytes: int
    n_layers: int | None = None
    context_length: int | None = None
    embedding_length: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None

    @classmethod
    def from_gguf(cls, path: Path) -> ModelFacts:
        size = path.stat().st_size
        try:
            meta = read_metadata(path, _KEYS)
        except (OSError, GgufError) as exc:
            log.warning("cannot read the metadata of %s: %s", path.name, exc)
            return cls(file_bytes=size)
        return cls(
            file_bytes=size,
            n_layers=meta.get("{arch}.block_count"),
            context_length=meta.get("{arch}.context_length"),
            embedding_length=meta.get("{arch}.embedding_length"),
            head_count=meta.get("{arch}.attention.head_count"),
            head_count_kv=meta.get("{arch}.attention.head_count_kv"),
        )

    def kv_cache_bytes(self, n_ctx: int) -> int:
        if not (self.n_layers and self.embedding_length):
            return int(self.file_bytes * 0.1)  # no shape: a tenth of the weights, roughly
        width = self.embedding_length
        if self.head_count and self.head_count_kv:  # grouped-query attention shares K/V heads
            width = self.embedding_length * self.head_count_kv // self.head_count
        return 2 * self.n_layers * n_ctx * width * 2  # K and V, f16


class LlamaPlan(BaseModel):
    """How a GGUF model will be loaded here, and why."""

    offload: Literal["all", "some", "none"]
    n_gpu_layers: int = Field(description="-1: all layers on the GPU, 0: none.")
    gpu: int | None = Field(None, description="Index of the GPU used.")
    n_threads: int
    n_ctx: int
    weights_bytes: int
    kv_cache_bytes: int
    needed_bytes: int = Field(description="Weights + KV cache + compute buffer.")
    fits: bool = Field(description="The CPU part fits in available RAM and the GPU part in VRAM.")
    reasons: list[str]


def gpu_usable_bytes(gpu: Gpu, hw: HardwareInfo) -> int | None:
    """Memory a model may take on ``gpu`` now, after the safety margin; None when unknown."""
    if gpu.unified_memory:
        total = hw.memory.total_bytes
        return max(0, min(hw.memory.available_bytes, total * 3 // 4) - max(512 * MIB, total // 10))
    free = gpu.memory_free_bytes
    if free is None:  # only the size is known (system_profiler, Windows CIM): assume the
        if gpu.memory_total_bytes is None:  # desktop holds a tenth of it
            return None
        free = gpu.memory_total_bytes * 9 // 10
    total = gpu.memory_total_bytes or free
    return max(0, free - max(512 * MIB, total // 10))


def _best_gpu(hw: HardwareInfo) -> tuple[Gpu, int] | None:
    # Integrated GPUs other than Apple's share the memory bus with the CPU and are rarely
    # faster than it for llama.cpp: not chosen by themselves (n_gpu_layers still can).
    candidates = [g for g in hw.gpus if g.kind != "integrated" or g.vendor == "apple"]
    usable = [(g, gpu_usable_bytes(g, hw)) for g in candidates]
    known = [(g, b) for g, b in usable if b is not None]
    return max(known, key=lambda pair: pair[1]) if known else None


def plan_llama(
    hw: HardwareInfo,
    model: ModelFacts,
    *,
    n_ctx: int = 0,
    n_threads: int = 0,
    n_gpu_layers: int | None = None,
) -> LlamaPlan:
    """The plan for ``model``; ``n_ctx``/``n_threads`` 0 and ``n_gpu_layers`` None mean "choose"."""
    reasons: list[str] = []
    ctx = n_ctx or min(model.context_length or DEFAULT_CTX, DEFAULT_CTX)
    kv = model.kv_cache_bytes(ctx)
    needed = model.file_bytes + kv + model.file_bytes // 20 + 256 * MIB
    threads = n_threads or hw.cpu.physical_cores
    plural = "s" if threads > 1 else ""
    reasons.append(f"{threads} thread{plural} ({'by the user' if n_threads else 'physical cores'})")
    layers = model.n_layers or 0

    def result(offload: Literal["all", "some", "none"], gpu_layers: int, gpu: Gpu | None,
               on_gpu: int) -> LlamaPlan:  # fmt: skip
        # unified memory: what the GPU holds comes out of the same RAM
        in_ram = needed if gpu is not None and gpu.unified_memory else needed - on_gpu
        fits = in_ram <= hw.memory.available_bytes
        if not fits:
            reasons.append(
                f"needs {in_ram / GIB:.1f} GiB of RAM, {hw.memory.available_bytes / GIB:.1f} GiB "
                "available: it may swap or fail to load"
            )
        return LlamaPlan(
            offload=offload, n_gpu_layers=gpu_layers, gpu=None if gpu is None else gpu.index,
            n_threads=threads, n_ctx=ctx, weights_bytes=model.file_bytes, kv_cache_bytes=kv,
            needed_bytes=needed, fits=fits, reasons=reasons,
        )  # fmt: skip

    if n_gpu_layers is not None:
        reasons.append(f"n_gpu_layers {n_gpu_layers} set by the user")
        offload: Literal["all", "some", "none"] = (
            "none" if n_gpu_layers == 0 else "all" if n_gpu_layers < 0 or (
                layers and n_gpu_layers >= layers) else "some"
        )  # fmt: skip
        best = _best_gpu(hw)
        return result(offload, n_gpu_layers, best[0] if best and n_gpu_layers else None, 0)
    if not hw.accelerators.llama_gpu_offload:
        reasons.append("CPU only: this llama.cpp build has no GPU support")
        return result("none", 0, None, 0)
    best = _best_gpu(hw)
    if best is None:
        reasons.append("CPU only: no GPU with a known amount of memory")
        return result("none", 0, None, 0)
    gpu, usable = best
    if needed <= usable:
        reasons.append(
            f"all layers on GPU {gpu.index} ({gpu.name}): needs {needed / GIB:.2f} GiB of "
            f"{usable / GIB:.1f} GiB usable"
        )
        return result("all", -1, gpu, needed)
    per_layer = (model.file_bytes + kv) / layers if layers else 0
    fit_layers = int((usable - 256 * MIB) // per_layer) if per_layer else 0
    if fit_layers < 1:
        reasons.append(
            f"CPU only: {needed / GIB:.1f} GiB needed, GPU {gpu.index} has "
            f"{usable / GIB:.1f} GiB usable" + ("" if layers else " and the layer count is unknown")
        )
        return result("none", 0, None, 0)
    reasons.append(
        f"{fit_layers} of {layers} layers on GPU {gpu.index} ({gpu.name}), the rest on the CPU: "
        f"{needed / GIB:.1f} GiB needed, {usable / GIB:.1f} GiB usable"
    )
    return result("some", fit_layers, gpu, int(per_layer * fit_layers) + 256 * MIB)


def onnx_providers(hw: HardwareInfo, requested: Sequence[str] = ()) -> list[str]:
    """onnxruntime providers the worker uses for embeddings, best first: the user's, those of
    them this onnxruntime has, in their order; else the worker's order. CPU always ends it."""
    available = hw.accelerators.onnxruntime_providers
    if not requested:
        return choose_providers(available)
    chosen = [p for p in dict.fromkeys(requested) if p in available and p != CPU_PROVIDER]
    return [*chosen, CPU_PROVIDER]
