"""NVIDIA GPUs through NVML, the driver's own library (the ``pynvml`` module of nvidia-ml-py).

NVML answers wherever NVIDIA's driver is installed, on Linux and Windows alike, and knows what
sysfs and CIM do not: free memory, compute capability, the CUDA version the driver supports.
Without the driver ``nvmlInit`` fails with a reason, which becomes a note. A query one GPU
does not support (temperature on some boards, utilisation under MIG…) leaves only that field
None.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from tabagent.hardware.model import Gpu
from tabagent.hardware.run import Probe


def probe_nvml(probe: Probe, notes: list[str]) -> list[Gpu]:
    nvml = probe.nvml()
    if nvml is None:
        notes.append("NVIDIA: pynvml (nvidia-ml-py) is not installed, so NVML was not asked")
        return []
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        notes.append(f"NVIDIA: no driver answered through NVML ({error})")
        return []
    try:
        return _devices(nvml, notes)
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()


def _devices(nvml: ModuleType, notes: list[str]) -> list[Gpu]:
    count = _ask(nvml, nvml.nvmlDeviceGetCount)
    if count is None:
        notes.append("NVIDIA: NVML started but would not count the GPUs")
        return []
    driver_version = _text(_ask(nvml, nvml.nvmlSystemGetDriverVersion))
    cuda_version = _cuda_version(_ask(nvml, nvml.nvmlSystemGetCudaDriverVersion_v2))
    gpus = []
    for index in range(count):
        handle = _ask(nvml, nvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            notes.append(f"NVIDIA: GPU {index} is listed by NVML but does not answer")
            continue
        gpus.append(_device(nvml, index, handle, driver_version, cuda_version))
    return gpus


def _device(
    nvml: ModuleType, index: int, handle: Any, driver_version: str | None, cuda: str | None
) -> Gpu:
    memory = _ask(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
    capability = _ask(nvml, nvml.nvmlDeviceGetCudaComputeCapability, handle)
    utilization = _ask(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
    temperature = _ask(nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
    pci = _ask(nvml, nvml.nvmlDeviceGetPciInfo, handle)
    return Gpu(
        index=index,
        vendor="nvidia",
        name=_text(_ask(nvml, nvml.nvmlDeviceGetName, handle)) or f"NVIDIA GPU {index}",
        kind="discrete",
        memory_total_bytes=memory.total if memory else None,
        memory_free_bytes=memory.free if memory else None,
        memory_used_bytes=memory.used if memory else None,
        driver="nvidia",
        driver_version=driver_version,
        cuda_version=cuda,
        compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
        utilization_percent=float(utilization.gpu) if utilization else None,
        temperature_c=float(temperature) if temperature is not None else None,
        # pciDeviceId packs the device id above the vendor id: 0x268410de is 10de:2684
        pci_id=f"{pci.pciDeviceId & 0xFFFF:04x}:{pci.pciDeviceId >> 16:04x}" if pci else None,
        source="nvml",
    )


def _ask(nvml: ModuleType, call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)``, or None when NVML says this GPU or driver cannot answer it."""
    try:
        return call(*args)
    except nvml.NVMLError:
        return None


def _text(value: str | bytes | None) -> str | None:
    """NVML strings; nvidia-ml-py before 11.5 returned bytes."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _cuda_version(encoded: int | None) -> str | None:
    """NVML's 1000 * major + 10 * minor: 12040 is "12.4"."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}" if encoded else None
