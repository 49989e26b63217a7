"""The onnxruntime execution-provider order (see :mod:`ml_service.backends.onnx_embed` for why
this order). Kept apart so the server's hardware report can apply it without importing
onnxruntime."""

from __future__ import annotations

from collections.abc import Sequence

CPU_PROVIDER = "CPUExecutionProvider"
PROVIDER_PREFERENCE: tuple[str, ...] = (
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "DmlExecutionProvider",
    "CoreMLExecutionProvider",
    "OpenVINOExecutionProvider",
)


def choose_providers(available: Sequence[str]) -> list[str]:
    """The preferred providers among ``available``, best first, ending with the CPU provider.

    The CPU provider is included even when ``available`` does not list it: every onnxruntime
    build has it, and it is the fallback for operators an accelerator lacks.
    """
    offered = set(available)
    return [name for name in PROVIDER_PREFERENCE if name in offered] + [CPU_PROVIDER]
