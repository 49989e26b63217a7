"""Which GPU probes run where, and one list of what they found.

NVML goes first wherever NVIDIA ships a driver (Linux, Windows): it knows the most about its
GPUs. The platform's own listing then adds everyone else — sysfs on Linux, CIM on Windows —
and is the only source on macOS. ``Gpu.index`` is the position in the final list, so NVML's
GPUs keep NVML's (and CUDA's default PCI) numbering.
"""

from __future__ import annotations

from tabagent.hardware.macos import probe_system_profiler
from tabagent.hardware.model import Gpu
from tabagent.hardware.nvidia import probe_nvml
from tabagent.hardware.run import Probe
from tabagent.hardware.sysfs import probe_drm
from tabagent.hardware.windows import probe_cim


def probe_gpus(probe: Probe, ram: tuple[int, int], notes: list[str]) -> tuple[list[Gpu], bool]:
    """The GPUs, and whether Metal runs on one of them."""
    if probe.system == "Darwin":
        gpus, metal = probe_system_profiler(probe, ram, notes)
    else:
        gpus, metal = probe_nvml(probe, notes), False
        if probe.system == "Linux":
            gpus += probe_drm(probe, bool(gpus), notes)
        elif probe.system == "Windows":
            gpus += probe_cim(probe, bool(gpus), notes)
        else:
            notes.append(f"{probe.system}: only NVIDIA GPUs (through NVML) are detected here")
    return [gpu.model_copy(update={"index": i}) for i, gpu in enumerate(gpus)], metal
