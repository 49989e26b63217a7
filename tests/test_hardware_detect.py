"""Hardware detection on recorded machines — fixture trees under ``tests/fixtures/hardware``,
recorded system_profiler and CIM output, a fake ``pynvml`` — and on this machine itself.

No GPU is attached where these tests run, so NVML is faked at its true edge: the module that
``Probe.nvml`` hands over. Everything else is the production code reading the fixture files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tabagent.hardware import macos, windows
from tabagent.hardware.cpu import INFERENCE_FLAGS
from tabagent.hardware.detect import HardwareCache, detect
from tabagent.hardware.model import HardwareInfo
from tabagent.hardware.pci import intel_is_discrete
from tabagent.hardware.run import Probe, run_command

FIXTURES = Path(__file__).parent / "fixtures" / "hardware"
GIB = 1024**3
MIB = 1024**2
RAM = (32 * GIB, 20 * GIB)
NO_FILES = FIXTURES / "no_files"  # a root without /proc or /sys, as on macOS and Windows

Runner = Callable[[Sequence[str], float], str | None]


# --- a fake pynvml --------------------------------------------------------------------------


class NVMLError(Exception):
    """Stands for pynvml.NVMLError; its subclasses (NotSupported…) are NVMLErrors too."""


@dataclass
class FakeGpu:
    name: str | bytes
    total: int
    used: int
    capability: tuple[int, int]
    pci_device_id: int
    temperature: int | None = 41
    utilization: int | None = 7


@dataclass
class Reading:
    """The shape of NVML's c_nvmlMemory_t / c_nvmlUtilization_t / c_nvmlPciInfo_t answers."""

    total: int = 0
    free: int = 0
    used: int = 0
    gpu: int = 0
    pciDeviceId: int = 0


def fake_nvml(*gpus: FakeGpu, init_error: str | None = None) -> ModuleType:
    """A ``pynvml`` describing ``gpus``; ``init_error`` makes nvmlInit fail like a missing driver.

    ``calls`` on the module records nvmlInit / nvmlShutdown.
    """
    module = ModuleType("pynvml")
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error:
            raise NVMLError(init_error)

    def supported(value: int | None) -> int:
        if value is None:
            raise NVMLError("Not Supported")
        return value

    vars(module).update(
        NVMLError=NVMLError,
        NVML_TEMPERATURE_GPU=0,
        calls=calls,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlSystemGetDriverVersion=lambda: "550.54.15",
        nvmlSystemGetCudaDriverVersion_v2=lambda: 12040,
        nvmlDeviceGetHandleByIndex=lambda i: gpus[i],
        nvmlDeviceGetName=lambda g: g.name,
        nvmlDeviceGetMemoryInfo=lambda g: Reading(
            total=g.total, used=g.used, free=g.total - g.used
        ),
        nvmlDeviceGetCudaComputeCapability=lambda g: g.capability,
        nvmlDeviceGetUtilizationRates=lambda g: Reading(gpu=supported(g.utilization)),
        nvmlDeviceGetTemperature=lambda g, sensor: supported(g.temperature),
        nvmlDeviceGetPciInfo=lambda g: Reading(pciDeviceId=g.pci_device_id),
    )
    return module


RTX_4090 = FakeGpu("NVIDIA GeForce RTX 4090", 24 * GIB, 1 * GIB, (8, 9), 0x268410DE)
# nvidia-ml-py before 11.5 answered bytes; this board reports no temperature
RTX_A4000 = FakeGpu(b"NVIDIA RTX A4000", 16 * GIB, 0, (8, 6), 0x24B010DE, temperature=None)
NO_DRIVER = fake_nvml(init_error="Driver Not Loaded")


# --- machines -------------------------------------------------------------------------------


def no_commands(args: Sequence[str], timeout: float) -> str | None:
    raise AssertionError(f"unexpected command {args}")


def answering(
    command: Sequence[str], output: str | None, seen: list[float] | None = None
) -> Runner:
    """A runner that knows one command; ``seen`` collects the timeouts it was given."""

    def run(args: Sequence[str], timeout: float) -> str | None:
        assert tuple(args) == tuple(command)
        if seen is not None:
            seen.append(timeout)
        return output

    return run


def machine(
    root: Path,
    *,
    system: str = "Linux",
    arch: str = "x86_64",
    nvml: ModuleType | None = NO_DRIVER,
    run: Runner = no_commands,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    cpu_info: dict[str, Any] | None = None,
    cpu_counts: tuple[int | None, int | None] = (None, None),
    registry: dict[str, int] | None = None,
) -> Probe:
    return Probe(
        root=root,
        system=system,
        release="test",
        version="test",
        machine=arch,
        run=run,
        nvml=lambda: nvml,
        onnxruntime_providers=lambda: list(providers),
        llama_gpu_offload=lambda: False,
        cpu_info=lambda: cpu_info or {},
        cpu_counts=lambda: cpu_counts,
        memory=lambda: RAM,
        module_installed=lambda name: False,
        windows_adapter_memory=lambda: registry,
    )


def notes_about(info: HardwareInfo, word: str) -> list[str]:
    return [note for note in info.notes if word in note]


# --- NVIDIA ---------------------------------------------------------------------------------


def test_nvml_describes_each_nvidia_gpu_and_sysfs_does_not_repeat_them() -> None:
    nvml = fake_nvml(RTX_4090, RTX_A4000)
    info = detect(machine(FIXTURES / "nvidia_workstation", nvml=nvml))

    first, second = info.gpus
    assert first.model_dump() == {
        "index": 0,
        "vendor": "nvidia",
        "name": "NVIDIA GeForce RTX 4090",
        "kind": "discrete",
        "memory_total_bytes": 24 * GIB,
        "memory_free_bytes": 23 * GIB,
        "memory_used_bytes": 1 * GIB,
        "unified_memory": False,
        "driver": "nvidia",
        "driver_version": "550.54.15",
        "cuda_version": "12.4",
        "compute_capability": "8.9",
        "utilization_percent": 7.0,
        "temperature_c": 41.0,
        "pci_id": "10de:2684",
        "source": "nvml",
    }
    assert (second.index, second.name, second.memory_total_bytes) == (
        1,
        "NVIDIA RTX A4000",
        16 * GIB,
    )
    assert (second.compute_capability, second.pci_id) == ("8.6", "10de:24b0")
    assert second.temperature_c is None  # not supported on this board: that field only
    assert nvml.calls == ["init", "shutdown"]
    assert info.accelerators.cuda
    assert info.accelerators.vulkan
    assert notes_about(info, "card0") == [
        "Linux: card0 (1a03:2000, ast) is a display adapter only; skipped"
    ]


def test_without_the_nvidia_driver_sysfs_still_lists_the_cards_and_a_note_says_why() -> None:
    info = detect(machine(FIXTURES / "nvidia_workstation", nvml=NO_DRIVER))

    assert [(g.name, g.source, g.driver, g.kind) for g in info.gpus] == [
        ("NVIDIA GPU 10de:2684", "sysfs", "nvidia", "discrete"),
        ("NVIDIA GPU 10de:24b0", "sysfs", "nvidia", "discrete"),
    ]
    assert all(g.memory_total_bytes is None for g in info.gpus)
    assert notes_about(info, "NVIDIA") == [
        "NVIDIA: no driver answered through NVML (Driver Not Loaded)"
    ]
    assert not info.accelerators.cuda


def test_without_pynvml_nvidia_is_not_asked_and_a_note_says_so() -> None:
    info = detect(machine(FIXTURES / "amd_laptop", nvml=None))

    assert notes_about(info, "pynvml") == [
        "NVIDIA: pynvml (nvidia-ml-py) is not installed, so NVML was not asked"
    ]
    assert [g.vendor for g in info.gpus] == ["amd", "amd"]


def test_workstation_cpu_reports_avx512_and_amx_under_canonical_names() -> None:
    cpu = detect(machine(FIXTURES / "nvidia_workstation", nvml=fake_nvml())).cpu

    assert cpu.brand == "Intel(R) Xeon(R) w5-3435X"
    assert (cpu.vendor, cpu.arch) == ("GenuineIntel", "x86_64")
    assert (cpu.physical_cores, cpu.logical_cores) == (16, 32)
    assert (cpu.base_mhz, cpu.max_mhz) == (3100.0, 4700.0)
    assert (cpu.l2_cache_bytes, cpu.l3_cache_bytes) == (2 * MIB, 45 * MIB)
    assert cpu.flags == [
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
    ]


# --- AMD, Intel and ARM on Linux ------------------------------------------------------------


def test_amd_laptop_has_a_discrete_card_and_an_apu_with_a_small_carve_out() -> None:
    info = detect(machine(FIXTURES / "amd_laptop"))

    dgpu, igpu = info.gpus
    assert (dgpu.index, dgpu.name, dgpu.kind, dgpu.unified_memory) == (
        0,
        "AMD GPU 1002:73df",  # product_name exists but is empty, as on most consumer boards
        "discrete",
        False,
    )
    assert (dgpu.memory_total_bytes, dgpu.memory_used_bytes) == (12 * GIB, 310378496)
    assert dgpu.memory_free_bytes == 12 * GIB - 310378496
    assert (dgpu.driver, dgpu.pci_id, dgpu.source) == ("amdgpu", "1002:73df", "sysfs")
    assert (igpu.index, igpu.kind, igpu.unified_memory) == (1, "integrated", True)
    assert igpu.memory_total_bytes == 512 * MIB
    assert info.accelerators.rocm
    assert info.accelerators.vulkan
    assert not info.accelerators.cuda


def test_amd_laptop_cpu() -> None:
    cpu = detect(machine(FIXTURES / "amd_laptop")).cpu

    assert (cpu.brand, cpu.vendor) == ("AMD Ryzen 9 6900HX with Radeon Graphics", "AuthenticAMD")
    assert (cpu.physical_cores, cpu.logical_cores) == (8, 16)
    # cpufreq is there, so /proc's "cpu MHz" is a momentary clock, not the base
    assert (cpu.base_mhz, cpu.max_mhz) == (None, 4935.0)
    assert (cpu.l2_cache_bytes, cpu.l3_cache_bytes) == (512 * 1024, 16 * MIB)
    assert cpu.flags == ["avx", "avx2", "f16c", "fma"]


def test_intel_arc_is_discrete_the_arrow_lake_igpu_integrated_and_the_npu_found() -> None:
    info = detect(machine(FIXTURES / "intel_arc_npu"))

    igpu, arc = info.gpus
    assert (igpu.name, igpu.kind, igpu.unified_memory, igpu.driver) == (
        "Intel GPU 8086:7d67",
        "integrated",
        True,
        "i915",
    )
    assert (arc.name, arc.kind, arc.unified_memory, arc.pci_id) == (
        "Intel GPU 8086:56a0",
        "discrete",
        False,
        "8086:56a0",
    )
    assert arc.memory_total_bytes is None  # i915 publishes no VRAM size
    assert [npu.model_dump() for npu in info.npus] == [
        {"vendor": "intel", "name": "Intel NPU", "driver": "intel_vpu", "source": "sysfs"}
    ]
    assert info.accelerators.vulkan
    assert not info.accelerators.rocm


def test_arrow_lake_cpu_has_avx_vnni_and_no_smt() -> None:
    cpu = detect(machine(FIXTURES / "intel_arc_npu")).cpu

    assert (cpu.physical_cores, cpu.logical_cores) == (20, 20)
    assert (cpu.base_mhz, cpu.max_mhz) == (3900.0, 5500.0)
    assert cpu.flags == ["avx", "avx2", "avx_vnni", "f16c", "fma"]


@pytest.mark.parametrize(
    ("device", "discrete"),
    [
        (0x56A0, True),  # Arc A770
        (0x5690, True),  # Arc A770M
        (0x56C0, True),  # Data Center Flex 170
        (0xE20B, True),  # Arc B580
        (0x4905, True),  # Iris Xe MAX (DG1)
        (0x0BD5, True),  # Data Center Max (Ponte Vecchio)
        (0x7D55, False),  # Meteor Lake "Arc Graphics"
        (0x7D67, False),  # Arrow Lake-S
        (0x64A0, False),  # Lunar Lake
        (0x9A60, False),  # Tiger Lake UHD
        (0x3E9B, False),  # Coffee Lake UHD 630
    ],
)
def test_intel_discrete_rule(device: int, discrete: bool) -> None:
    assert intel_is_discrete(device) is discrete


def test_arm64_server_cores_from_sysfs_topology_and_neon_sve_from_features() -> None:
    info = detect(machine(FIXTURES / "arm64_server", arch="aarch64"))

    cpu = info.cpu
    assert (cpu.arch, cpu.vendor, cpu.brand) == ("arm64", "ARM", "ARM CPU part 0xd40")
    assert (cpu.physical_cores, cpu.logical_cores) == (4, 4)
    assert cpu.flags == ["neon", "sve"]  # svei8mm and svebf16 are not SVE2
    assert (cpu.l2_cache_bytes, cpu.l3_cache_bytes) == (1 * MIB, 32 * MIB)
    assert info.gpus == []
    assert notes_about(info, "/sys/class/drm") == [
        "Linux: /sys/class/drm lists no GPU (no GPU driver loaded, or /sys hidden)"
    ]


def test_a_driver_entry_may_be_the_real_symlink_or_a_plain_file(tmp_path: Path) -> None:
    device = tmp_path / "sys/class/drm/card0/device"
    device.mkdir(parents=True)
    (device / "vendor").write_text("0x1002\n")
    (device / "device").write_text("0x744c\n")
    (device / "driver").symlink_to("../../../../bus/pci/drivers/amdgpu")

    gpu = detect(machine(tmp_path)).gpus[0]

    assert (gpu.driver, gpu.kind) == ("amdgpu", "unknown")  # no VRAM file: kind not guessed


def test_lavapipe_alone_is_not_a_vulkan_gpu(tmp_path: Path) -> None:
    icd = tmp_path / "usr/share/vulkan/icd.d"
    icd.mkdir(parents=True)
    (icd / "lvp_icd.x86_64.json").write_text("{}")
    assert not detect(machine(tmp_path)).accelerators.vulkan

    (icd / "radeon_icd.x86_64.json").write_text("{}")
    assert detect(machine(tmp_path)).accelerators.vulkan


# --- macOS ----------------------------------------------------------------------------------

M2_PRO_CPUINFO = {"arch": "ARM_8", "bits": 64, "count": 12, "brand_raw": "Apple M2 Pro"}
I9_9880H_CPUINFO = {
    "arch": "X86_64",
    "count": 16,
    "vendor_id_raw": "GenuineIntel",
    "brand_raw": "Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz",
    "hz_advertised": [2300000000, 0],
    "l2_cache_size": 262144,
    "l3_cache_size": 16777216,
    "flags": ["avx1.0", "avx2", "fma", "f16c", "sse4.2", "bmi2", "aes"],
}


def test_apple_silicon_gpu_uses_unified_memory_and_has_a_neural_engine() -> None:
    timeouts: list[float] = []
    output = (FIXTURES / "macos_apple_silicon.json").read_text()
    probe = machine(
        NO_FILES,
        system="Darwin",
        arch="arm64",
        nvml=fake_nvml(RTX_4090),  # never asked on macOS
        run=answering(macos.COMMAND, output, timeouts),
        cpu_info=M2_PRO_CPUINFO,
        cpu_counts=(12, 12),
    )
    info = detect(probe)

    (gpu,) = info.gpus
    assert (gpu.vendor, gpu.name, gpu.kind, gpu.unified_memory) == (
        "apple",
        "Apple M2 Pro",
        "integrated",
        True,
    )
    assert (gpu.memory_total_bytes, gpu.memory_free_bytes) == RAM
    assert gpu.source == "system_profiler"
    assert info.accelerators.metal
    assert not info.accelerators.cuda
    assert [(n.vendor, n.name) for n in info.npus] == [("apple", "Apple Neural Engine")]
    assert (info.cpu.brand, info.cpu.arch, info.cpu.flags) == ("Apple M2 Pro", "arm64", ["neon"])
    assert (info.cpu.physical_cores, info.cpu.logical_cores) == (12, 12)
    assert timeouts == [5.0]
    assert info.notes == []


def test_intel_mac_has_an_integrated_uhd_and_a_discrete_radeon() -> None:
    output = (FIXTURES / "macos_intel.json").read_text()
    probe = machine(
        NO_FILES,
        system="Darwin",
        run=answering(macos.COMMAND, output),
        cpu_info=I9_9880H_CPUINFO,
        cpu_counts=(16, 8),
    )
    info = detect(probe)

    uhd, radeon = info.gpus
    assert (uhd.vendor, uhd.name, uhd.kind, uhd.unified_memory) == (
        "intel",
        "Intel UHD Graphics 630",
        "integrated",
        True,
    )
    assert (uhd.memory_total_bytes, uhd.pci_id) == (1536 * MIB, "8086:3e9b")
    assert (radeon.index, radeon.vendor, radeon.kind, radeon.unified_memory) == (
        1,
        "amd",
        "discrete",
        False,
    )
    assert (radeon.memory_total_bytes, radeon.pci_id) == (4 * GIB, "1002:7340")
    assert info.accelerators.metal
    assert info.npus == []
    cpu = info.cpu
    assert (cpu.physical_cores, cpu.logical_cores, cpu.base_mhz) == (8, 16, 2300.0)
    assert (cpu.l2_cache_bytes, cpu.l3_cache_bytes) == (256 * 1024, 16 * MIB)
    assert cpu.flags == ["avx", "avx2", "f16c", "fma"]


# --- Windows --------------------------------------------------------------------------------


def windows_machine(output: str | None, **kwargs: Any) -> Probe:
    return machine(
        NO_FILES,
        system="Windows",
        arch="AMD64",
        run=answering(windows.COMMAND, output),
        cpu_info=I9_9880H_CPUINFO,
        cpu_counts=(16, 8),
        **kwargs,
    )


def test_windows_cim_list_without_registry_keeps_the_capped_adapter_ram() -> None:
    output = (FIXTURES / "windows_cim.json").read_text()
    info = detect(
        windows_machine(output, providers=["DmlExecutionProvider", "CPUExecutionProvider"])
    )

    assert [(g.index, g.vendor, g.name, g.kind, g.memory_total_bytes) for g in info.gpus] == [
        (0, "intel", "Intel(R) UHD Graphics", "integrated", 1 * GIB),
        (1, "nvidia", "NVIDIA GeForce RTX 3060 Laptop GPU", "discrete", 4293918720),
    ]
    assert [g.pci_id for g in info.gpus] == ["8086:9a60", "10de:2520"]
    assert info.gpus[1].driver_version == "32.0.15.6094"
    assert all(g.source == "cim" for g in info.gpus)
    assert info.accelerators.directml
    assert not info.accelerators.cuda
    assert notes_about(info, "Windows") == [
        "Windows: GPU memory is CIM's AdapterRAM, which stops at 4 GiB",
        "Windows: Microsoft Remote Display Adapter is a display adapter only; skipped",
        "Windows: NPUs are not detected yet",
    ]
    assert info.cpu.arch == "x86_64"


def test_windows_registry_size_wins_and_nvml_replaces_cim_for_nvidia() -> None:
    output = (FIXTURES / "windows_cim.json").read_text()
    rtx_3060 = FakeGpu("NVIDIA GeForce RTX 3060 Laptop GPU", 6 * GIB, 0, (8, 6), 0x252010DE)
    registry = {"Intel(R) UHD Graphics": 128 * MIB}
    info = detect(windows_machine(output, nvml=fake_nvml(rtx_3060), registry=registry))

    assert [(g.index, g.source, g.memory_total_bytes) for g in info.gpus] == [
        (0, "nvml", 6 * GIB),
        (1, "cim", 128 * MIB),
    ]
    assert info.accelerators.cuda
    assert notes_about(info, "AdapterRAM") == []


def test_windows_single_adapter_comes_as_an_object() -> None:
    output = (FIXTURES / "windows_cim_single.json").read_text()
    registry = {"AMD Radeon RX 7900 XTX": 24 * GIB}
    (gpu,) = detect(windows_machine(output, registry=registry)).gpus

    assert (gpu.vendor, gpu.name, gpu.kind) == ("amd", "AMD Radeon RX 7900 XTX", "discrete")
    assert (gpu.memory_total_bytes, gpu.pci_id) == (24 * GIB, "1002:744c")


# --- odd output -----------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["", "not json", "{}", '{"SPDisplaysDataType": "none"}', "[]"])
def test_unreadable_system_profiler_output_gives_no_gpu_and_a_note(output: str) -> None:
    run = answering(macos.COMMAND, output)
    info = detect(machine(NO_FILES, system="Darwin", arch="arm64", run=run))

    assert info.gpus == []
    assert not info.accelerators.metal
    assert notes_about(info, "system_profiler") == [
        "macOS: system_profiler's output is not the expected SPDisplaysDataType JSON"
    ]


@pytest.mark.parametrize("output", ["", "garbage", "42", '"text"'])
def test_unreadable_cim_output_gives_no_gpu_and_a_note(output: str) -> None:
    info = detect(windows_machine(output))

    assert info.gpus == []
    assert notes_about(info, "Win32_VideoController") == [
        "Windows: Win32_VideoController's output is not the expected JSON"
    ]


def test_commands_that_time_out_leave_notes() -> None:
    mac = detect(machine(NO_FILES, system="Darwin", run=answering(macos.COMMAND, None)))
    win = detect(windows_machine(None))

    assert mac.gpus == []
    assert win.gpus == []
    assert notes_about(mac, "system_profiler") == [
        "macOS: system_profiler did not answer (missing, failed or over 5 s)"
    ]
    assert notes_about(win, "PowerShell") == [
        "Windows: PowerShell's Get-CimInstance did not answer (failed or over 10 s)"
    ]


def test_run_command_returns_stdout_or_none() -> None:
    python = sys.executable
    assert run_command([python, "-c", "print('hello')"], 10) == "hello\n"
    assert run_command([python, "-c", "import sys; sys.exit(3)"], 10) is None
    assert run_command([str(FIXTURES / "no-such-binary")], 10) is None
    assert run_command([python, "-c", "import time; time.sleep(10)"], 0.2) is None


# --- this machine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def here() -> HardwareInfo:
    return detect()


def proc_cpuinfo_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    line = next(ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("flags", "Features"))
    return set(line.partition(":")[2].split())


linux_only = pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads /proc")


@linux_only
def test_this_machine_cpu_matches_the_kernel(here: HardwareInfo) -> None:
    assert here.cpu.logical_cores == os.cpu_count()
    topology = Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/core_cpus_list")
    cores = {path.read_text() for path in topology}
    assert here.cpu.physical_cores == len(cores)
    raw = proc_cpuinfo_flags()
    expected = [f for f in INFERENCE_FLAGS if f in raw or (f == "neon" and "asimd" in raw)]
    assert here.cpu.flags == expected


@linux_only
def test_this_machine_memory_matches_meminfo(here: HardwareInfo) -> None:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total_kib = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    assert abs(here.memory.total_bytes - total_kib * 1024) <= total_kib * 1024 / 100
    assert 0 < here.memory.available_bytes <= here.memory.total_bytes


@linux_only
@pytest.mark.skipif(Path("/proc/driver/nvidia/version").exists(), reason="an NVIDIA driver is here")
def test_this_machine_without_an_nvidia_driver_lists_no_nvml_gpu_and_says_why(
    here: HardwareInfo,
) -> None:
    assert not [gpu for gpu in here.gpus if gpu.source == "nvml"]
    assert len(notes_about(here, "NVIDIA:")) == 1
    assert "CPUExecutionProvider" in here.accelerators.onnxruntime_providers


def test_detection_imports_its_heavy_libraries_only_when_it_runs() -> None:
    code = (
        "import sys, tabagent.hardware.detect\n"
        "heavy = ('psutil', 'cpuinfo', 'pynvml', 'onnxruntime', 'llama_cpp', 'numpy')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_llama_offload_answer_matches_llama_cpp_itself() -> None:
    code = (
        "import json, sys\n"
        "from tabagent.hardware.run import llama_supports_gpu_offload\n"
        "direct = llama_supports_gpu_offload()\n"
        "assert 'llama_cpp' not in sys.modules\n"
        "import llama_cpp\n"
        "print(json.dumps([direct, bool(llama_cpp.llama_supports_gpu_offload())]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    direct, official = json.loads(done.stdout)
    assert direct == official


# --- the cache ------------------------------------------------------------------------------


def test_cache_detects_once_until_refreshed() -> None:
    detections: list[int] = []

    def memory() -> tuple[int, int]:
        detections.append(1)
        return RAM

    base = machine(FIXTURES / "amd_laptop")
    cache = HardwareCache(dataclasses.replace(base, memory=memory))
    barrier = threading.Barrier(8)
    results: list[HardwareInfo] = []

    def get() -> None:
        barrier.wait()
        results.append(cache.get())

    threads = [threading.Thread(target=get) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(detections) == 1
    assert all(result is results[0] for result in results)
    assert cache.get() is results[0]
    refreshed = cache.get(refresh=True)
    assert refreshed is not results[0]
    assert len(detections) == 2
    assert cache.get() is refreshed


# --- recommendations on each recorded machine -------------------------------------------------


def _fixture_probe(name: str) -> Probe:
    mac = {"macos_apple_silicon": ("arm64", M2_PRO_CPUINFO, (12, 12)),
           "macos_intel": ("x86_64", I9_9880H_CPUINFO, (16, 8))}  # fmt: skip
    if name in mac:
        arch, cpu_info, counts = mac[name]
        output = (FIXTURES / f"{name}.json").read_text()
        return machine(NO_FILES, system="Darwin", arch=arch, cpu_info=cpu_info,
                       cpu_counts=counts, run=answering(macos.COMMAND, output))  # fmt: skip
    if name == "windows_cim":
        return windows_machine((FIXTURES / "windows_cim.json").read_text())
    nvml = fake_nvml(RTX_4090, RTX_A4000) if name == "nvidia_workstation" else NO_DRIVER
    return machine(FIXTURES / name, nvml=nvml)


@pytest.mark.parametrize(
    ("name", "gpu", "small", "large"),
    [
        ("nvidia_workstation", "NVIDIA GeForce RTX 4090", "all", "some"),
        ("amd_laptop", "AMD GPU 1002:73df", "all", "some"),  # the 12 GiB card, not the APU
        ("intel_arc_npu", None, "none", "none"),  # i915 tells no VRAM size; the iGPU is skipped
        ("macos_apple_silicon", "Apple M2 Pro", "all", "some"),
        ("macos_intel", "AMD Radeon Pro 5500M", "all", "some"),  # not the UHD 630
        ("windows_cim", "NVIDIA GeForce RTX 3060 Laptop GPU", "all", "some"),
    ],
)
def test_recommendations_for_a_small_and_a_large_model_on_each_machine(
    name: str, gpu: str | None, small: str, large: str
) -> None:
    from tabagent.hardware.recommend import ModelFacts, plan_llama

    # a llama.cpp build with GPU support (CUDA, ROCm, Metal or Vulkan)
    info = detect(dataclasses.replace(_fixture_probe(name), llama_gpu_offload=lambda: True))
    tiny = ModelFacts(file_bytes=99 * MIB, n_layers=30, context_length=8192,
                      embedding_length=576, head_count=9, head_count_kv=3)  # fmt: skip
    huge = ModelFacts(file_bytes=int(42.5 * GIB), n_layers=80, context_length=131072,
                      embedding_length=8192, head_count=64, head_count_kv=8)  # fmt: skip
    for facts, expected in ((tiny, small), (huge, large)):
        plan = plan_llama(info, facts)
        assert plan.offload == expected, plan.reasons
        used = None if plan.gpu is None else info.gpus[plan.gpu].name
        assert used == (gpu if expected != "none" else None), plan.reasons
        assert plan.n_threads == info.cpu.physical_cores
    assert plan_llama(info, tiny).fits
    # 42.5 GiB of weights with 20 GiB of RAM free: only a GPU taking most of it would fit
    assert not plan_llama(info, huge).fits
