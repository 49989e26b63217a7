"""GPUs on Windows from CIM's ``Win32_VideoController``, through PowerShell.

``wmic`` is gone from current Windows 11 and WMI bindings would be another dependency, while
PowerShell ships everywhere. ``ConvertTo-Json`` writes one adapter as an object and several
as a list. ``AdapterRAM`` is a uint32 and stops at 4 GiB, so the display driver's
``HardwareInformation.qwMemorySize`` in the registry (``Probe.windows_adapter_memory``, keyed
by adapter name) wins where present.

Only PCI adapters from NVIDIA, AMD and Intel count: "Microsoft Basic Display Adapter",
remote-desktop and virtual adapters are display-only. NVIDIA adapters are left out when NVML
already described them, with more detail than CIM has.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tabagent.hardware.model import Gpu
from tabagent.hardware.pci import VENDORS, kind_of, pci_id
from tabagent.hardware.run import Probe

COMMAND = (
    "powershell",
    "-NoProfile",
    "-NonInteractive",
    "-Command",
    "Get-CimInstance Win32_VideoController | Select-Object Name,AdapterCompatibility,AdapterRAM,"
    "DriverVersion,PNPDeviceID,VideoProcessor | ConvertTo-Json",
)
TIMEOUT_S = 10.0

_PCI = re.compile(r"^PCI\\VEN_([0-9A-F]{4})&DEV_([0-9A-F]{4})", re.IGNORECASE)


def probe_cim(probe: Probe, nvml_listed: bool, notes: list[str]) -> list[Gpu]:
    output = probe.run(COMMAND, TIMEOUT_S)
    if output is None:
        notes.append("Windows: PowerShell's Get-CimInstance did not answer (failed or over 10 s)")
        return []
    registry = probe.windows_adapter_memory()
    if registry is None:
        notes.append("Windows: GPU memory is CIM's AdapterRAM, which stops at 4 GiB")
    return parse_cim(output, registry or {}, nvml_listed, notes)


def parse_cim(
    text: str, registry: dict[str, int], nvml_listed: bool, notes: list[str]
) -> list[Gpu]:
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    adapters = [parsed] if isinstance(parsed, dict) else parsed
    if not isinstance(adapters, list):
        notes.append("Windows: Win32_VideoController's output is not the expected JSON")
        return []
    gpus = [gpu for a in adapters if isinstance(a, dict) and (gpu := _adapter(a, registry, notes))]
    return [gpu for gpu in gpus if not (gpu.vendor == "nvidia" and nvml_listed)]


def _adapter(adapter: dict[str, Any], registry: dict[str, int], notes: list[str]) -> Gpu | None:
    name = str(adapter.get("Name") or "GPU")
    match = _PCI.match(str(adapter.get("PNPDeviceID") or ""))
    vendor = VENDORS.get(int(match.group(1), 16)) if match else None
    if match is None or vendor is None:
        notes.append(f"Windows: {name} is a display adapter only; skipped")
        return None
    vendor_id, device_id = int(match.group(1), 16), int(match.group(2), 16)
    adapter_ram = adapter.get("AdapterRAM")
    memory = registry.get(name) or (adapter_ram if isinstance(adapter_ram, int) else None)
    kind = kind_of(vendor, device_id, memory)
    return Gpu(
        index=0,
        vendor=vendor,
        name=name,
        kind=kind,
        memory_total_bytes=memory or None,
        unified_memory=kind == "integrated",
        driver_version=adapter.get("DriverVersion") or None,
        pci_id=pci_id(vendor_id, device_id),
        source="cim",
    )
