"""``tabagent-server models``: pull, list, remove and clean cached models (no server needed)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from tabagent.config import Settings
from tabagent.errors import TabAgentError
from tabagent.models.refs import parse_ref

if TYPE_CHECKING:
    from tabagent.models.cache import CachedModel, ModelCache


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _fail(exc: TabAgentError) -> None:
    click.echo(f"tabagent-server models: {exc.message}", err=True)
    sys.exit(1)


def _cache(settings: Settings) -> ModelCache:
    from tabagent.models.cache import ModelCache  # the downloader imports aiohttp: on use only

    return ModelCache(settings.model_cache_path)


def _loaded_on_server(settings: Settings) -> set[str] | None:
    """The models the server running for this user has loaded now; None when none answers."""
    import urllib.request

    from tabagent.discovery import find

    server = find(settings.run_dir)
    if server is None:
        return None
    request = urllib.request.Request(f"{server.url}/v1/models")
    if settings.api_key is not None:
        request.add_header("Authorization", f"Bearer {settings.api_key.get_secret_value()}")
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            cards = json.load(response)["data"]
        return {card["id"] for card in cards if card.get("loaded")}
    except (OSError, ValueError, KeyError, TypeError):  # busy, another version, or going away
        return None


def models_group(settings_of: Any) -> click.Group:
    """The group; ``settings_of(ctx)`` resolves the server's settings (flags, env, defaults)."""

    @click.group("models")
    def models() -> None:
        """Pull models from the Hugging Face Hub and manage the model cache."""

    @models.command("pull")
    @click.argument("ref")
    @click.option("--refresh", is_flag=True, help="Ask the Hub even if the pull is complete.")
    @click.pass_context
    def pull(ctx: click.Context, ref: str, refresh: bool) -> None:
        """Download REF (org/repo, org/repo:QUANT, org/repo/file, each with @revision).

        Parallel, verified, resumable: Ctrl-C keeps what arrived, pull again to continue.
        """
        from tabagent.models.pull import Puller, PullEvent, model_paths

        cache = _cache(settings_of(ctx))
        console = Console(stderr=True)
        try:
            parsed = parse_ref(ref)
        except TabAgentError as exc:
            _fail(exc)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            tasks: dict[str, TaskID] = {}
            cached = False

            def on_event(event: PullEvent) -> None:
                nonlocal cached
                cached = cached or event.cached
                if event.kind == "resolved":
                    tasks["total"] = progress.add_task("total", total=event.total)
                elif event.kind in ("progress", "file_done") and event.file:
                    task = tasks.get(event.file)
                    if task is None:
                        task = tasks[event.file] = progress.add_task(event.file, total=None)
                    progress.update(task, completed=event.file_done, total=event.file_total)
                    progress.update(tasks["total"], completed=event.done)

            started = time.monotonic()
            seconds = 0.0  # until the model is complete; set once it is

            async def pull_and_flush() -> CachedModel:
                nonlocal seconds
                puller = Puller(cache)
                model = await puller.pull(parsed, on_event, refresh=refresh)
                seconds = time.monotonic() - started
                await puller.durable()  # the flush to the disk; Ctrl-C here costs a re-hash
                return model

            try:
                model = asyncio.run(pull_and_flush())
            except TabAgentError as exc:
                progress.stop()
                _fail(exc)
            except KeyboardInterrupt:
                progress.stop()
                if seconds:
                    click.echo(
                        "interrupted while flushing to the disk: the model is complete (it is "
                        "checked again at its next use)",
                        err=True,
                    )
                else:
                    click.echo("interrupted: run the same pull again to resume", err=True)
                sys.exit(130)
        for path in model_paths(cache, model):
            click.echo(str(path))
        if cached:
            console.print(f"{model.ref}: {_human(model.size)}, already in the cache (no network)")
        else:
            console.print(f"{model.ref}: {_human(model.size)} in {seconds:.1f} s")

    @models.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_context
    def list_(ctx: click.Context, as_json: bool) -> None:
        """Pulled models: size, last use, and whether the running server has them loaded."""
        settings = settings_of(ctx)
        found = sorted(_cache(settings).models(), key=lambda m: m.ref)
        loaded = _loaded_on_server(settings)  # None: no server running (or none answered)
        if as_json:
            rows = [
                {"model": m.ref, "repo": m.repo_id, "commit": m.commit, "size_bytes": m.size,
                 "last_used": m.last_used, "pulled_at": m.pulled_at,
                 "files": [f.path for f in m.files],
                 "loaded": None if loaded is None else m.ref in loaded}
                for m in found
            ]  # fmt: skip
            click.echo(json.dumps(rows, indent=2))
            return
        table = Table("model", "size", "last used", "files", "loaded")
        for m in found:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.last_used))
            state = "-" if loaded is None else "yes" if m.ref in loaded else "no"
            table.add_row(m.ref, _human(m.size), used, str(len(m.files)), state)
        Console().print(table)
        if loaded is None:
            click.echo("loaded: - (no TabAgent server is running)", err=True)

    @models.command("rm")
    @click.argument("ref")
    @click.pass_context
    def rm(ctx: click.Context, ref: str) -> None:
        """Remove a pulled model and the files no other pull uses."""
        cache = _cache(settings_of(ctx))
        try:
            parsed = parse_ref(ref)
            freed = cache.remove(str(parsed), parsed.repo_id)
        except TabAgentError as exc:
            _fail(exc)
        click.echo(f"removed {parsed}, freed {_human(freed)}")

    @models.command("gc")
    @click.pass_context
    def gc(ctx: click.Context) -> None:
        """Delete unreferenced files and abandoned partial downloads (older than a week)."""
        freed = _cache(settings_of(ctx)).gc()
        click.echo(f"freed {_human(freed)}")

    return models
