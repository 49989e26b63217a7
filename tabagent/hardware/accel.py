"""Which acceleration stacks can run here: the GPU APIs and what the installed engines offer.

A flag means the stack's runtime is present and has something to run on, as far as can be
told without initialising it (which could take seconds, or crash in a broken driver):

* cuda — NVML found an NVIDIA GPU (so the driver is loaded), or ONNX Runtime has CUDA;
* rocm — ``/opt/rocm`` or the ``/dev/kfd`` compute node, or ONNX Runtime's ROCm/MIGraphX;
* vulkan — a Vulkan driver manifest (ICD) in the loader's system folders, lavapipe — Mesa's
  CPU rasteriser — excepted;
* metal — a GPU that system_profiler says supports Metal;
* directml, openvino — ONNX Runtime's providers (or the ``openvino`` package, found without
  importing it).
"""

from __future__ import annotations

from tabagent.hardware.model import Accelerators, Gpu
from tabagent.hardware.run import Probe

_ICD_FOLDERS = (
    "/usr/share/vulkan/icd.d",
    "/usr/local/share/vulkan/icd.d",
    "/etc/vulkan/icd.d",
    "/etc/xdg/vulkan/icd.d",
)


def probe_accelerators(probe: Probe, gpus: list[Gpu], metal: bool) -> Accelerators:
    providers = probe.onnxruntime_providers()
    return Accelerators(
        cuda=any(gpu.source == "nvml" for gpu in gpus) or "CUDAExecutionProvider" in providers,
        rocm=probe.path("/opt/rocm").exists()
        or probe.path("/dev/kfd").exists()
        or not {"ROCMExecutionProvider", "MIGraphXExecutionProvider"}.isdisjoint(providers),
        vulkan=_vulkan_driver(probe),
        metal=metal,
        directml="DmlExecutionProvider" in providers,
        openvino="OpenVINOExecutionProvider" in providers or probe.module_installed("openvino"),
        onnxruntime_providers=providers,
        llama_gpu_offload=probe.llama_gpu_offload(),
    )


def _vulkan_driver(probe: Probe) -> bool:
    return any(
        not manifest.name.startswith("lvp_icd")
        for folder in _ICD_FOLDERS
        for manifest in probe.path(folder).glob("*.json")
    )
