"""Recommendations from detected hardware: GPU offload (all, some, none), threads, onnxruntime
providers and whether a model fits, for small and large models on several machines; and the
GGUF metadata they are computed from, read from the real embedded model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tabagent.hardware.gguf_meta import GgufError, read_metadata
from tabagent.hardware.model import (
    Accelerators,
    CpuInfo,
    Gpu,
    HardwareInfo,
    MemoryInfo,
    OsInfo,
)
from tabagent.hardware.recommend import GIB, MIB, ModelFacts, onnx_providers, plan_llama
from tabagent.ml.orchestrator import embedded_models

# a 7-8B model at Q4_K_M: 32 layers, 4096 wide, 8 of 32 heads for K/V
LLAMA_8B = ModelFacts(
    file_bytes=int(4.9 * GIB), n_layers=32, context_length=131072, embedding_length=4096,
    head_count=32, head_count_kv=8,
)  # fmt: skip
# a 70B model at Q4_K_M
LLAMA_70B = ModelFacts(
    file_bytes=int(42.5 * GIB), n_layers=80, context_length=131072, embedding_length=8192,
    head_count=64, head_count_kv=8,
)  # fmt: skip
SMOL = ModelFacts(
    file_bytes=99 * MIB, n_layers=30, context_length=8192, embedding_length=576, head_count=9,
    head_count_kv=3,
)  # fmt: skip


def machine(
    *gpus: Gpu,
    ram_gib: float = 64,
    available_gib: float | None = None,
    cores: int = 16,
    offload: bool = True,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> HardwareInfo:
    return HardwareInfo(
        cpu=CpuInfo(brand="Test CPU", arch="x86_64", physical_cores=cores, logical_cores=2 * cores),
        memory=MemoryInfo(
            total_bytes=int(ram_gib * GIB),
            available_bytes=int((available_gib if available_gib is not None else ram_gib) * GIB),
        ),
        os=OsInfo(system="Linux", release="6.8", version="#1", machine="x86_64"),
        gpus=list(gpus),
        accelerators=Accelerators(llama_gpu_offload=offload, onnxruntime_providers=list(providers)),
        detected_at=time.time(),
        detect_ms=1.0,
    )


def nvidia(index: int, total_gib: float, free_gib: float, name: str = "RTX 4090") -> Gpu:
    return Gpu(
        index=index, vendor="nvidia", name=name, kind="discrete", source="nvml",
        memory_total_bytes=int(total_gib * GIB), memory_free_bytes=int(free_gib * GIB),
    )  # fmt: skip


def test_a_small_model_goes_entirely_on_the_gpu_with_the_most_free_memory() -> None:
    hw = machine(nvidia(0, 8, 1.0, "RTX 3050"), nvidia(1, 24, 22, "RTX 4090"))
    plan = plan_llama(hw, LLAMA_8B)
    assert (plan.offload, plan.n_gpu_layers, plan.gpu) == ("all", -1, 1)
    assert plan.n_ctx == 4096  # the model allows 128k; the default stays at 4096
    # K and V, 32 layers, 4096 positions, 1024 wide (8 of 32 heads), 2 bytes each
    assert plan.kv_cache_bytes == 2 * 32 * 4096 * 1024 * 2
    assert plan.fits
    assert plan.n_threads == 16  # physical cores, not the 32 logical ones
    assert any("RTX 4090" in r for r in plan.reasons)


def test_a_large_model_is_split_between_gpu_and_cpu() -> None:
    hw = machine(nvidia(0, 24, 23))
    plan = plan_llama(hw, LLAMA_70B)
    assert plan.offload == "some"
    assert 20 <= plan.n_gpu_layers <= 45  # about half of the 80 layers fit in ~21 GiB
    per_layer = (plan.weights_bytes + plan.kv_cache_bytes) / 80
    usable = 23 * GIB - max(512 * MIB, int(2.4 * GIB))
    assert plan.n_gpu_layers * per_layer <= usable  # what goes on the GPU fits its margin
    assert plan.fits  # the other half fits in 64 GiB of RAM


def test_the_safety_margin_keeps_a_model_off_an_almost_full_card() -> None:
    hw = machine(nvidia(0, 8, 0.6))  # the desktop and a game hold the rest
    plan = plan_llama(hw, LLAMA_8B)
    assert (plan.offload, plan.n_gpu_layers) == ("none", 0)


def test_without_a_gpu_or_a_gpu_build_everything_runs_on_the_cpu() -> None:
    assert plan_llama(machine(), LLAMA_8B).offload == "none"
    no_build = plan_llama(machine(nvidia(0, 24, 23), offload=False), LLAMA_8B)
    assert (no_build.offload, no_build.n_gpu_layers) == ("none", 0)
    assert any("no GPU support" in r for r in no_build.reasons)
    unknown_free = Gpu(index=0, vendor="intel", name="Arc A770", kind="discrete", source="sysfs")
    assert plan_llama(machine(unknown_free), LLAMA_8B).offload == "none"
    uhd = Gpu(index=0, vendor="intel", name="UHD 770", kind="integrated", unified_memory=True,
              source="sysfs")  # fmt: skip
    assert plan_llama(machine(uhd), LLAMA_8B).offload == "none"  # not faster than the CPU


def test_a_model_bigger_than_free_ram_is_flagged() -> None:
    plan = plan_llama(machine(ram_gib=16, available_gib=9), LLAMA_70B)
    assert plan.fits is False
    assert any("swap" in r for r in plan.reasons)
    assert plan_llama(machine(ram_gib=16, available_gib=9), SMOL).fits


def test_apple_silicon_shares_ram_with_its_gpu() -> None:
    m2 = Gpu(index=0, vendor="apple", name="Apple M2 Pro", kind="integrated",
             unified_memory=True, source="system_profiler")  # fmt: skip
    assert plan_llama(machine(m2, ram_gib=32, available_gib=20), LLAMA_8B).offload == "all"
    # 42 GiB of weights cannot sit in three quarters of 32 GiB
    big = plan_llama(machine(m2, ram_gib=32, available_gib=30), LLAMA_70B)
    assert big.offload == "some"
    assert big.fits is False  # the GPU's share comes out of the same 30 GiB: 46 GiB do not fit


def test_a_card_whose_free_memory_is_unknown_is_assumed_nine_tenths_free() -> None:
    radeon = Gpu(index=0, vendor="amd", name="Radeon Pro 5500M", kind="discrete",
                 memory_total_bytes=8 * GIB, source="system_profiler")  # fmt: skip
    plan = plan_llama(machine(radeon), LLAMA_8B)
    assert plan.offload == "all"  # 5.9 GiB of 8 * 0.9 - 0.8 = 6.4 GiB
    assert plan_llama(machine(radeon.model_copy(update={"memory_total_bytes": 6 * GIB})),
                      LLAMA_8B).offload == "some"  # fmt: skip


def test_the_users_settings_win() -> None:
    hw = machine(nvidia(0, 24, 23))
    plan = plan_llama(hw, LLAMA_8B, n_ctx=1024, n_threads=3, n_gpu_layers=0)
    assert (plan.offload, plan.n_gpu_layers, plan.n_threads, plan.n_ctx) == ("none", 0, 3, 1024)
    assert plan.kv_cache_bytes == 2 * 32 * 1024 * 1024 * 2
    assert plan_llama(hw, LLAMA_8B, n_gpu_layers=10).offload == "some"
    assert plan_llama(hw, LLAMA_8B, n_gpu_layers=-1).offload == "all"


def test_onnx_providers_follow_the_workers_order() -> None:
    hw = machine(providers=("OpenVINOExecutionProvider", "CPUExecutionProvider",
                            "CUDAExecutionProvider", "TensorrtExecutionProvider"))  # fmt: skip
    assert onnx_providers(hw) == [
        "CUDAExecutionProvider",
        "OpenVINOExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert onnx_providers(machine(providers=())) == ["CPUExecutionProvider"]
    # the user's choice and order win, among the providers this onnxruntime has
    chosen = ["OpenVINOExecutionProvider", "ROCMExecutionProvider", "CUDAExecutionProvider"]
    assert onnx_providers(hw, chosen) == [
        "OpenVINOExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_gguf_metadata_of_the_embedded_model() -> None:
    (chat,) = [m for m in embedded_models() if m.kind == "chat"]
    facts = ModelFacts.from_gguf(Path(chat.path))
    # SmolLM2-135M: 30 layers of 576, 9 heads sharing 3 K/V heads, trained on 8192 positions
    assert (facts.n_layers, facts.embedding_length, facts.head_count, facts.head_count_kv) == (
        30, 576, 9, 3,
    )  # fmt: skip
    assert facts.context_length == 8192
    assert facts.file_bytes == Path(chat.path).stat().st_size


def test_gguf_reader_refuses_what_is_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(GgufError, match="not a GGUF"):
        read_metadata(bad, ["{arch}.block_count"])
    (chat,) = [m for m in embedded_models() if m.kind == "chat"]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(Path(chat.path).read_bytes()[:200])
    with pytest.raises(GgufError, match="ends inside"):
        read_metadata(cut, ["{arch}.block_count", "{arch}.nonexistent"])
    # an unreadable file still gets a plan, from its size alone
    assert ModelFacts.from_gguf(bad) == ModelFacts(file_bytes=68)
