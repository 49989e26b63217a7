"""GPUs on macOS from ``system_profiler SPDisplaysDataType -json``.

macOS has no sysfs and NVML has not shipped for it since 2019; system_profiler is the
supported way to list GPUs without compiling against IOKit. Each ``SPDisplaysDataType`` item
is one GPU. Apple Silicon's GPU shares the machine's RAM, so its memory is the RAM total and
what is available of it; an Intel Mac reports its iGPU's shared ceiling
(``spdisplays_vram_shared``) and a Radeon's own VRAM (``spdisplays_vram``).

Key names and values have drifted over macOS releases (vendor "sppci_vendor_amd", "Intel",
"AMD (0x1002)"; Metal as ``spdisplays_mtlgpufamilysupport`` since Ventura, ``spdisplays_metal``
or ``spdisplays_metalfamily`` before), so each is read loosely.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tabagent.hardware.model import Gpu, GpuKind, GpuVendor
from tabagent.hardware.run import Probe

COMMAND = ("system_profiler", "SPDisplaysDataType", "-json")
TIMEOUT_S = 5.0

_METAL_KEYS = ("spdisplays_mtlgpufamilysupport", "spdisplays_metal", "spdisplays_metalfamily")
_VENDOR_HEX = {"amd": "1002", "intel": "8086", "nvidia": "10de"}
_UNITS = {"MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def probe_system_profiler(
    probe: Probe, ram: tuple[int, int], notes: list[str]
) -> tuple[list[Gpu], bool]:
    """The GPUs, and whether any of them runs Metal."""
    output = probe.run(COMMAND, TIMEOUT_S)
    if output is None:
        notes.append("macOS: system_profiler did not answer (missing, failed or over 5 s)")
        return [], False
    return parse_displays(output, ram, notes)


def parse_displays(text: str, ram: tuple[int, int], notes: list[str]) -> tuple[list[Gpu], bool]:
    try:
        items = json.loads(text)["SPDisplaysDataType"]
    except (ValueError, KeyError, TypeError):
        items = None
    if not isinstance(items, list):
        notes.append("macOS: system_profiler's output is not the expected SPDisplaysDataType JSON")
        return [], False
    items = [item for item in items if isinstance(item, dict)]
    gpus = [_gpu(index, item, ram) for index, item in enumerate(items)]
    return gpus, any(_supports_metal(item) for item in items)


def _gpu(index: int, item: dict[str, Any], ram: tuple[int, int]) -> Gpu:
    name = str(item.get("sppci_model") or item.get("_name") or "GPU")
    vendor = _vendor(f"{item.get('spdisplays_vendor', '')} {name}".lower())
    dedicated = _bytes(item.get("spdisplays_vram"))
    shared = _bytes(item.get("spdisplays_vram_shared"))
    kind = _kind(vendor, item.get("sppci_bus"), dedicated, shared)
    total, free = (ram[0], ram[1]) if vendor == "apple" else (dedicated or shared, None)
    device = str(item.get("spdisplays_device-id", "")).lower().removeprefix("0x")
    return Gpu(
        index=index,
        vendor=vendor,
        name=name,
        kind=kind,
        memory_total_bytes=total,
        memory_free_bytes=free,
        unified_memory=kind == "integrated",
        pci_id=f"{_VENDOR_HEX[vendor]}:{device}" if vendor in _VENDOR_HEX and device else None,
        source="system_profiler",
    )


def _vendor(text: str) -> GpuVendor:
    if "apple" in text:
        return "apple"
    if "nvidia" in text:
        return "nvidia"
    if "amd" in text or "radeon" in text or "0x1002" in text:
        return "amd"
    if "intel" in text or "0x8086" in text:
        return "intel"
    return "other"


def _kind(vendor: GpuVendor, bus: Any, dedicated: int | None, shared: int | None) -> GpuKind:
    """Built into the SoC or the chipset (or only shared memory): integrated; with its own
    VRAM, on PCIe or Thunderbolt: discrete."""
    if vendor == "apple" or bus == "spdisplays_builtin" or (shared and not dedicated):
        return "integrated"
    return "discrete" if dedicated or bus == "spdisplays_pcie_device" else "unknown"


def _bytes(text: Any) -> int | None:
    """ "4 GB", "1536 MB", "Dynamic, Max: 1536 MB"."""
    match = re.search(r"(\d+(?:\.\d+)?)\s*([MGT]B)", str(text or ""))
    return int(float(match.group(1)) * _UNITS[match.group(2)]) if match else None


def _supports_metal(item: dict[str, Any]) -> bool:
    values = (str(item.get(key, "")).lower() for key in _METAL_KEYS)
    return any(value and "not" not in value for value in values)
