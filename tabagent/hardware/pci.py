"""PCI ids and the integrated-or-discrete rules that sysfs (Linux) and CIM (Windows) share.

Neither source says whether a GPU is integrated, so the kind follows from who made it:

* NVIDIA: discrete (their PC GPUs all are).
* Intel: integrated, except the Arc and data-center families that have their own memory,
  recognised by device id — DG1 ``0x490x``, Ponte Vecchio ``0x0bdx``, Alchemist (DG2, Arc
  A-series and Pro/Flex) ``0x56xx``, Battlemage (Arc B-series) ``0xe2xx``. Meteor Lake's and
  Lunar Lake's "Arc Graphics" (``0x7dxx``, ``0x64xx``) share system RAM and read integrated.
* AMD: integrated when its dedicated memory is at most 1 GiB — an APU's firmware carve-out;
  every Radeon card since 2015 has more (Ollama draws the same line). An APU given a larger
  carve-out in its firmware settings reads as discrete.

GPU names are not looked up in an id table (which would go stale); when the driver publishes
none, the name is the vendor and the ids, e.g. "AMD GPU 1002:73df".
"""

from __future__ import annotations

from tabagent.hardware.model import GpuKind, GpuVendor

GIB = 1024**3

VENDORS: dict[int, GpuVendor] = {0x10DE: "nvidia", 0x1002: "amd", 0x8086: "intel"}
VENDOR_NAMES: dict[GpuVendor, str] = {
    "nvidia": "NVIDIA",
    "amd": "AMD",
    "intel": "Intel",
    "apple": "Apple",
    "other": "Unknown",
}


def intel_is_discrete(device: int) -> bool:
    return device >> 8 in (0x56, 0xE2) or device >> 4 in (0x490, 0x0BD)


def kind_of(vendor: GpuVendor, device: int, dedicated_bytes: int | None) -> GpuKind:
    if vendor == "nvidia":
        return "discrete"
    if vendor == "intel":
        return "discrete" if intel_is_discrete(device) else "integrated"
    if vendor == "amd" and dedicated_bytes is not None:
        return "integrated" if dedicated_bytes <= GIB else "discrete"
    return "unknown"


def pci_id(vendor: int, device: int) -> str:
    return f"{vendor:04x}:{device:04x}"


def fallback_name(vendor: GpuVendor, vendor_id: int, device: int) -> str:
    return f"{VENDOR_NAMES[vendor]} GPU {pci_id(vendor_id, device)}"
