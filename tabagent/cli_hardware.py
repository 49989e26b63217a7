"""``tabagent-server hardware``: what this machine has and how each local chat model will run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tabagent.config import Settings

GIB = 1 << 30


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.1f} GiB"


def local_gguf_models(settings: Settings) -> list[tuple[str, Path]]:
    """(model id, file) of the embedded chat model and every pulled GGUF model."""
    from tabagent.ml.orchestrator import embedded_models, pulled_specs
    from tabagent.models.cache import ModelCache

    specs = embedded_models() + pulled_specs(ModelCache(settings.model_cache_path))
    return [(s.id, Path(s.path)) for s in specs if s.kind == "chat" and s.path.endswith(".gguf")]


def hardware_command(settings_of: Any) -> click.Command:
    @click.command("hardware")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
    @click.pass_context
    def hardware(ctx: click.Context, as_json: bool) -> None:
        """Show detected CPU, GPUs, NPUs and acceleration, and how local models will run."""
        from tabagent.hardware.detect import detect
        from tabagent.hardware.recommend import onnx_providers
        from tabagent.ops.hardware import plan_gguf

        settings: Settings = settings_of(ctx)
        hw = detect()
        plans = {
            model_id: plan_gguf(hw, path, settings)
            for model_id, path in local_gguf_models(settings)
        }
        if as_json:
            report = {
                "hardware": hw.model_dump(mode="json"),
                "summary": hw.summary(),
                "llama": {k: v.model_dump(mode="json") for k, v in plans.items()},
                "onnx_providers": onnx_providers(hw, settings.onnx_providers),
            }
            click.echo(json.dumps(report, indent=2))
            return
        _print_tables(hw, plans, onnx_providers(hw, settings.onnx_providers))

    return hardware


def _print_tables(hw: Any, plans: dict[str, Any], providers: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cpu = hw.cpu
    overview = Table(title="Machine", show_header=False, title_justify="left")
    overview.add_row("CPU", f"{cpu.brand} ({cpu.arch})")
    overview.add_row("Cores", f"{cpu.physical_cores} physical, {cpu.logical_cores} logical")
    if cpu.max_mhz:
        overview.add_row("Clock", f"{cpu.max_mhz:.0f} MHz max")
    overview.add_row("Instruction sets", ", ".join(cpu.flags) or "-")
    overview.add_row(
        "RAM", f"{_gib(hw.memory.total_bytes)} total, {_gib(hw.memory.available_bytes)} available"
    )
    overview.add_row("OS", f"{hw.os.system} {hw.os.release} ({hw.os.machine})")
    acc = hw.accelerators
    names = ("cuda", "rocm", "vulkan", "metal", "directml", "openvino")
    overview.add_row("Acceleration", ", ".join(n for n in names if getattr(acc, n)) or "none")
    overview.add_row("llama.cpp GPU offload", "yes" if acc.llama_gpu_offload else "no (CPU build)")
    overview.add_row("onnxruntime providers", ", ".join(providers))
    overview.add_row(
        "NPUs", ", ".join(f"{n.name} ({n.driver or n.source})" for n in hw.npus) or "-"
    )
    console.print(overview)

    gpus = Table(title="GPUs", title_justify="left")
    for column in ("#", "GPU", "kind", "VRAM", "free", "driver", "source"):
        gpus.add_column(column)
    for g in hw.gpus:
        total = "shared" if g.unified_memory else _gib(g.memory_total_bytes)
        driver = " ".join(x for x in (g.driver, g.driver_version) if x) or "-"
        free = _gib(g.memory_free_bytes)
        gpus.add_row(str(g.index), g.name, g.kind, total, free, driver, g.source)
    console.print(gpus if hw.gpus else "GPUs: none found")

    models = Table(title="Local chat models", title_justify="left")
    for column in ("model", "GPU layers", "threads", "context", "needs", "fits"):
        models.add_column(column, no_wrap=column == "model")
    for model_id, p in plans.items():
        layers = {"all": "all", "none": "none"}.get(p.offload, str(p.n_gpu_layers))
        models.add_row(
            model_id, layers, str(p.n_threads), str(p.n_ctx), _gib(p.needed_bytes),
            "yes" if p.fits else "no",
        )  # fmt: skip
    console.print(models)
    for model_id, p in plans.items():
        console.print(f"{model_id}: " + "; ".join(p.reasons), highlight=False)
    for note in hw.notes:
        console.print(f"note: {note}")
    console.print(f"detected in {hw.detect_ms:.0f} ms")
