"""NPUs: the neural engines beside the CPU that ONNX Runtime's OpenVINO/Ryzen AI/Core ML
providers can target.

Linux exposes them in the compute-accelerator class, ``/sys/class/accel/accel<N>``, and the
bound driver names the part. Every Apple Silicon Mac has a Neural Engine, and Intel Macs none.
Windows lists NPUs under CIM's "ComputeAccelerator" class only on recent builds with a vendor
driver; that is not probed yet, and a note says so.
"""

from __future__ import annotations

from tabagent.hardware.cpu import normalize_arch
from tabagent.hardware.model import Npu
from tabagent.hardware.run import Probe

_LINUX_DRIVERS = {
    "intel_vpu": ("intel", "Intel NPU"),
    "amdxdna": ("amd", "AMD Ryzen AI NPU"),
}


def probe_npus(probe: Probe, notes: list[str]) -> list[Npu]:
    if probe.system == "Darwin":
        if normalize_arch(probe.machine) != "arm64":
            return []
        return [Npu(vendor="apple", name="Apple Neural Engine", source="platform")]
    if probe.system == "Windows":
        notes.append("Windows: NPUs are not detected yet")
        return []
    npus = []
    for accel in sorted(probe.path("/sys/class/accel").glob("accel*")):
        driver = probe.link_name(accel / "device" / "driver")
        vendor, name = _LINUX_DRIVERS.get(driver or "", ("other", f"Accelerator ({driver})"))
        npus.append(Npu(vendor=vendor, name=name, driver=driver, source="sysfs"))
    return npus
