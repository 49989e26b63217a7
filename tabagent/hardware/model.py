"""What hardware detection finds: the records every probe fills and every consumer reads.

Sizes are bytes, frequencies MHz, temperatures °C. A field a probe could not learn is ``None``
(never a made-up zero); why something is missing goes into ``HardwareInfo.notes`` in words.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

GpuVendor = Literal["nvidia", "amd", "intel", "apple", "other"]
GpuKind = Literal["discrete", "integrated", "unknown"]


class CpuInfo(BaseModel):
    brand: str = Field(description="e.g. 'AMD Ryzen 9 7950X 16-Core Processor'")
    vendor: str | None = None
    arch: str = Field(description="x86_64, arm64…")
    physical_cores: int = Field(ge=1)
    logical_cores: int = Field(ge=1)
    base_mhz: float | None = None
    max_mhz: float | None = None
    l2_cache_bytes: int | None = None
    l3_cache_bytes: int | None = None
    flags: list[str] = Field(
        default_factory=list,
        description="Instruction sets that matter for inference, lower-case: avx, avx2, "
        "avx512f, avx512_vnni, avx512_bf16, avx_vnni, f16c, fma, amx_tile, amx_bf16, amx_int8, "
        "neon, sve, sve2.",
    )


class MemoryInfo(BaseModel):
    total_bytes: int
    available_bytes: int


class OsInfo(BaseModel):
    system: str = Field(description="Linux, Darwin or Windows")
    release: str
    version: str
    machine: str


class Gpu(BaseModel):
    index: int
    vendor: GpuVendor
    name: str
    kind: GpuKind = "unknown"
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_used_bytes: int | None = None
    unified_memory: bool = Field(False, description="Shares system RAM (Apple Silicon, iGPUs).")
    driver: str | None = Field(None, description="Kernel/OS driver: nvidia, amdgpu, i915, xe…")
    driver_version: str | None = None
    cuda_version: str | None = None
    compute_capability: str | None = Field(None, description="NVIDIA only, e.g. '8.9'.")
    utilization_percent: float | None = None
    temperature_c: float | None = None
    pci_id: str | None = Field(None, description="vendor:device, hex, e.g. '10de:2684'.")
    source: str = Field(description="Where this came from: nvml, sysfs, system_profiler, cim.")


class Npu(BaseModel):
    vendor: str
    name: str
    driver: str | None = None
    source: str


class Accelerators(BaseModel):
    cuda: bool = False
    rocm: bool = False
    vulkan: bool = False
    metal: bool = False
    directml: bool = False
    openvino: bool = False
    onnxruntime_providers: list[str] = Field(
        default_factory=list, description="onnxruntime.get_available_providers(), in its order."
    )
    llama_gpu_offload: bool = Field(
        False, description="This llama-cpp-python build can offload layers to a GPU."
    )


class HardwareInfo(BaseModel):
    cpu: CpuInfo
    memory: MemoryInfo
    os: OsInfo
    gpus: list[Gpu] = Field(default_factory=list)
    npus: list[Npu] = Field(default_factory=list)
    accelerators: Accelerators = Field(default_factory=Accelerators)
    notes: list[str] = Field(
        default_factory=list, description="What could not be probed, and why (no driver…)."
    )
    detected_at: float = Field(description="Unix time of the probe.")
    detect_ms: float = Field(description="How long detection took.")

    def summary(self) -> str:
        """One line for health and logs."""
        cpu = f"{self.cpu.physical_cores}c/{self.cpu.logical_cores}t {self.cpu.brand}"
        ram = f"{self.memory.total_bytes / 2**30:.1f} GiB RAM"
        gpus = ", ".join(
            g.name + (f" {g.memory_total_bytes / 2**30:.0f} GiB" if g.memory_total_bytes else "")
            for g in self.gpus
        )
        return "; ".join(part for part in (cpu, ram, gpus or "no GPU") if part)
