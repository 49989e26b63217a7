"""The CPU: brand, cores, clocks, caches and the instruction sets inference kernels choose from.

On Linux everything comes from ``/proc/cpuinfo`` and ``/sys/devices/system/cpu``, read
directly: py-cpuinfo's public ``get_cpu_info()`` starts a second interpreter (about a second),
which alone would blow a cold ``detect()``'s budget of a few hundred milliseconds. macOS and
Windows have no ``/proc``; there py-cpuinfo gathers in-process (``run.py_cpuinfo``) and psutil
counts the cores.

Caches are those the first CPU sees: its own L2 and the L3 it shares, not sums over the chip.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from tabagent.hardware.model import CpuInfo
from tabagent.hardware.run import Probe

#: The instruction sets that matter for inference, in the order they are reported.
INFERENCE_FLAGS = (
    "avx",
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "f16c",
    "fma",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "neon",
    "sve",
    "sve2",
)

# Other spellings of the same sets: py-cpuinfo's CPUID names, macOS sysctl, AArch64 Linux.
_FLAG_ALIASES = {
    "avx1.0": "avx",
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "avxvnni": "avx_vnni",
    "amxtile": "amx_tile",
    "amxbf16": "amx_bf16",
    "amxint8": "amx_int8",
    "asimd": "neon",
}

_SCALE = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}

# "CPU implementer" in AArch64 /proc/cpuinfo (the MIDR implementer byte).
_ARM_IMPLEMENTERS = {
    "0x41": "ARM",
    "0x4e": "NVIDIA",
    "0x51": "Qualcomm",
    "0x61": "Apple",
    "0xc0": "Ampere",
}


def normalize_flags(raw: Iterable[str], arch: str) -> list[str]:
    """The inference flags among ``raw``, canonically named, in ``INFERENCE_FLAGS`` order."""
    names = {_FLAG_ALIASES.get(flag.lower(), flag.lower()) for flag in raw}
    if arch == "arm64":
        names.add("neon")  # AArch64 mandates Advanced SIMD; macOS lists no flags at all
    return [flag for flag in INFERENCE_FLAGS if flag in names]


def normalize_arch(machine: str) -> str:
    return _ARCH_ALIASES.get(machine.lower(), machine.lower())


def probe_cpu(probe: Probe) -> CpuInfo:
    arch = normalize_arch(probe.machine)
    text = probe.read("/proc/cpuinfo")
    return _from_proc(probe, text, arch) if text else _from_py_cpuinfo(probe, arch)


def _from_proc(probe: Probe, text: str, arch: str) -> CpuInfo:
    blocks = [_fields(block) for block in text.split("\n\n") if block.strip()]
    processors = [b for b in blocks if "processor" in b] or blocks
    first = processors[0]
    vendor = first.get("vendor_id") or _ARM_IMPLEMENTERS.get(first.get("CPU implementer", ""))
    brand = (
        first.get("model name")
        or first.get("Hardware")
        or (f"{vendor} CPU part {first['CPU part']}" if vendor and "CPU part" in first else None)
        or f"{arch} CPU"
    )
    logical = len(processors)
    base_mhz, max_mhz = _linux_clocks(probe, brand, first.get("cpu MHz"))
    l2, l3 = _linux_caches(probe)
    return CpuInfo(
        brand=brand,
        vendor=vendor,
        arch=arch,
        physical_cores=_linux_physical_cores(probe, processors, logical),
        logical_cores=logical,
        base_mhz=base_mhz,
        max_mhz=max_mhz,
        l2_cache_bytes=l2,
        l3_cache_bytes=l3,
        flags=normalize_flags((first.get("flags") or first.get("Features") or "").split(), arch),
    )


def _fields(block: str) -> dict[str, str]:
    pairs = (line.partition(":") for line in block.splitlines())
    return {key.strip(): value.strip() for key, sep, value in pairs if sep}


def _linux_physical_cores(probe: Probe, processors: list[dict[str, str]], logical: int) -> int:
    """Distinct (package, core) pairs; else distinct SMT sibling sets; else psutil; else half.

    AArch64 /proc/cpuinfo has no core ids, hence sysfs; kernels before 5.7 call
    ``core_cpus_list`` ``thread_siblings_list``.
    """
    if all("core id" in p for p in processors):
        return len({(p.get("physical id"), p["core id"]) for p in processors})
    cpus = probe.path("/sys/devices/system/cpu")
    for name in ("core_cpus_list", "thread_siblings_list"):
        siblings = {probe.read(path) for path in cpus.glob(f"cpu[0-9]*/topology/{name}")}
        if siblings - {None}:
            return len(siblings - {None})
    return probe.cpu_counts()[1] or max(1, logical // 2)


def _linux_clocks(
    probe: Probe, brand: str, current: str | None
) -> tuple[float | None, float | None]:
    """(base, max) MHz. Base: intel_pstate's base_frequency, else the "@ 2.40GHz" in the brand,
    else — only where there is no cpufreq at all (VMs) — the clock /proc reports, which the
    kernel then never scales."""
    cpufreq = probe.path("/sys/devices/system/cpu/cpu0/cpufreq")
    max_khz = _int(probe.read(cpufreq / "cpuinfo_max_freq"))
    base_khz = _int(probe.read(cpufreq / "base_frequency"))
    base = base_khz / 1000 if base_khz else _brand_mhz(brand)
    if base is None and current and not cpufreq.exists():
        base = float(current)
    return base, (max_khz / 1000 if max_khz else None)


def _brand_mhz(brand: str) -> float | None:
    match = re.search(r"@\s*([\d.]+)\s*GHz", brand)
    return float(match.group(1)) * 1000 if match else None


def _linux_caches(probe: Probe) -> tuple[int | None, int | None]:
    sizes: dict[int, int] = {}
    for index in probe.path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        level, kind = _int(probe.read(index / "level")), probe.read(index / "type")
        size = _cache_bytes(probe.read(index / "size"))
        if level in (2, 3) and kind in ("Unified", "Data") and size:
            sizes[level] = size
    return sizes.get(2), sizes.get(3)


def _cache_bytes(text: str | None) -> int | None:
    """sysfs cache sizes: "512K", "32768K", sometimes "1M"."""
    match = re.fullmatch(r"(\d+)([KMG]?)", text or "")
    if not match:
        return None
    return int(match.group(1)) * _SCALE[match.group(2)]


def _int(text: str | None) -> int | None:
    try:
        return int(text, 0) if text else None
    except ValueError:
        return None


def _from_py_cpuinfo(probe: Probe, arch: str) -> CpuInfo:
    info = probe.cpu_info()
    counted_logical, counted_physical = probe.cpu_counts()
    logical = counted_logical or _positive(info.get("count")) or 1
    hz = info.get("hz_advertised")
    return CpuInfo(
        brand=info.get("brand_raw") or f"{arch} CPU",
        vendor=info.get("vendor_id_raw") or None,
        arch=arch,
        physical_cores=counted_physical or max(1, logical // 2),
        logical_cores=logical,
        base_mhz=hz[0] / 1e6 if isinstance(hz, list | tuple) and hz and hz[0] else None,
        l2_cache_bytes=_positive(info.get("l2_cache_size")),
        l3_cache_bytes=_positive(info.get("l3_cache_size")),
        flags=normalize_flags(info.get("flags", []), arch),
    )


def _positive(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and value > 0 else None
