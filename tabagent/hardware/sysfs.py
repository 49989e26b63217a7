"""GPUs on Linux from ``/sys/class/drm/card<N>/device``: what the kernel driver publishes.

This is the only vendor-neutral source: no userland library, no subprocess, a few small file
reads. It names the PCI ids and the kernel driver; amdgpu adds its VRAM (``mem_info_vram_*``).
i915 and xe publish no VRAM size readable without root, so an Intel card's memory is None.

Only PCI cards from NVIDIA, AMD and Intel count as GPUs: the others in ``/sys/class/drm`` are
display-only (server BMCs, virtual adapters) and are named in a note. Cards on the ``nvidia``
driver are left out when NVML already reported them, with more detail. ``cardN-DP-1`` and the
like are connectors and ``renderD128`` render nodes of the same cards; both are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

from tabagent.hardware.model import Gpu
from tabagent.hardware.pci import VENDORS, fallback_name, kind_of, pci_id
from tabagent.hardware.run import Probe


def probe_drm(probe: Probe, nvml_listed: bool, notes: list[str]) -> list[Gpu]:
    drm = probe.path("/sys/class/drm")
    cards = sorted(
        (card for card in drm.glob("card*") if re.fullmatch(r"card\d+", card.name)),
        key=lambda card: int(card.name[4:]),
    )
    gpus = [gpu for card in cards if (gpu := _card(probe, card, nvml_listed, notes))]
    if not cards and not nvml_listed:
        notes.append("Linux: /sys/class/drm lists no GPU (no GPU driver loaded, or /sys hidden)")
    return gpus


def _card(probe: Probe, card: Path, nvml_listed: bool, notes: list[str]) -> Gpu | None:
    device = card / "device"
    vendor_id, device_id = _hex(probe.read(device / "vendor")), _hex(probe.read(device / "device"))
    driver = probe.link_name(device / "driver")
    if vendor_id is None or device_id is None:
        return None  # not a PCI device: a firmware framebuffer (simpledrm) or an SoC display
    vendor = VENDORS.get(vendor_id)
    if vendor is None:
        ids = pci_id(vendor_id, device_id)
        notes.append(f"Linux: {card.name} ({ids}, {driver}) is a display adapter only; skipped")
        return None
    if vendor == "nvidia" and driver == "nvidia" and nvml_listed:
        return None
    total = _int(probe.read(device / "mem_info_vram_total"))
    used = _int(probe.read(device / "mem_info_vram_used"))
    kind = kind_of(vendor, device_id, total)
    return Gpu(
        index=int(card.name[4:]),
        vendor=vendor,
        # amdgpu publishes product_name only where the board's FRU EEPROM has one (often empty)
        name=probe.read(device / "product_name") or fallback_name(vendor, vendor_id, device_id),
        kind=kind,
        memory_total_bytes=total,
        memory_used_bytes=used,
        memory_free_bytes=total - used if total is not None and used is not None else None,
        unified_memory=kind == "integrated",
        driver=driver,
        pci_id=pci_id(vendor_id, device_id),
        source="sysfs",
    )


def _hex(text: str | None) -> int | None:
    try:
        return int(text, 16) if text else None
    except ValueError:
        return None


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None
