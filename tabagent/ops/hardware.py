"""``system.hardware``: what this machine has, and how each local model will run on it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tabagent.config import Settings
from tabagent.hardware.model import HardwareInfo
from tabagent.hardware.recommend import LlamaPlan, ModelFacts, onnx_providers, plan_llama
from tabagent.ops.registry import Http, OpContext, OperationGroup

group = OperationGroup(tag="system")


class HardwareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    refresh: bool = Field(False, description="Probe again (live VRAM, say) instead of the cache.")


class HardwareReport(BaseModel):
    hardware: HardwareInfo
    summary: str
    llama: dict[str, LlamaPlan] = Field(
        description="For each GGUF model this server has: how it will load (GPU layers, "
        "threads, context) and whether it fits."
    )
    onnx_providers: list[str] = Field(description="Execution providers for embedding models.")


def plan_gguf(hw: HardwareInfo, path: Path, settings: Settings) -> LlamaPlan:
    """The plan for one GGUF file under the user's settings (each set one wins)."""
    return plan_llama(
        hw,
        ModelFacts.from_gguf(path),
        n_ctx=settings.n_ctx,
        n_threads=settings.n_threads,
        n_gpu_layers=settings.n_gpu_layers,
    )


def llama_plans(ctx: OpContext, hw: HardwareInfo) -> dict[str, LlamaPlan]:
    specs = ctx.state.ml.orchestrator.catalog.values() if ctx.state.ml else []
    return {
        spec.id: plan_gguf(hw, Path(spec.path), ctx.state.settings)
        for spec in specs
        if spec.kind == "chat" and spec.path.endswith(".gguf") and Path(spec.path).is_file()
    }


@group.operation("system.hardware", http=Http("GET", "/v1/system/hardware"))
async def hardware(ctx: OpContext, req: HardwareRequest) -> HardwareReport:
    """CPU, RAM, GPUs, NPUs and acceleration, with how each local chat model will run here."""
    hw = await asyncio.to_thread(ctx.state.hardware.get, req.refresh)
    plans = await asyncio.to_thread(llama_plans, ctx, hw)
    return HardwareReport(
        hardware=hw,
        summary=hw.summary(),
        llama=plans,
        onnx_providers=onnx_providers(hw, ctx.state.settings.onnx_providers),
    )
