"""``tabagent-server db``: back up, restore and inspect the memory databases (server stopped
for restore; backup and stats open the databases themselves, so they need it stopped too, and
say so; a running server backs up through ``POST /v1/memory/backup``)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from tabagent.config import Settings
from tabagent.errors import TabAgentError


def _fail(exc: TabAgentError) -> None:
    hint = ""
    if exc.code == "database_in_use":
        hint = (
            "\n(a server is running: back up with "
            "`curl -X POST http://127.0.0.1:3000/v1/memory/backup`, stats with "
            "`curl http://127.0.0.1:3000/v1/memory/stats`)"
        )
    click.echo(f"tabagent-server db: {exc.message}{hint}", err=True)
    sys.exit(1)


async def _with_memory(settings: Settings, action: Any) -> Any:
    from tabagent.storage.memory import Memory

    memory = Memory(settings.db_path)  # no embedder: backup, stats and recovery need none
    await memory.open()
    try:
        return await action(memory)
    finally:
        await memory.close()


def db_group(settings_of: Any) -> click.Group:
    @click.group("db")
    def db() -> None:
        """Back up, restore and inspect the seven memory databases."""

    @db.command("backup")
    @click.argument("path", type=click.Path(path_type=Path))
    @click.pass_context
    def backup(ctx: click.Context, path: Path) -> None:
        """Write one consistent archive (.tar) of all seven stores to PATH (a file or folder)."""
        settings: Settings = settings_of(ctx)
        try:
            info = asyncio.run(_with_memory(settings, lambda m: m.backup(path)))
        except TabAgentError as exc:
            _fail(exc)
        click.echo(f"backed up {info.files} files ({info.bytes:,} bytes) to {info.path}")

    @db.command("restore")
    @click.argument("path", type=click.Path(path_type=Path, exists=True, dir_okay=False))
    @click.pass_context
    def restore(ctx: click.Context, path: Path) -> None:
        """Verify the archive at PATH, then replace the databases with it (server stopped).

        The current databases are kept beside, as <db>.before-restore-<time>.
        """
        from tabagent.storage.backup import restore as do_restore
        from tabagent.storage.memory import Memory

        settings: Settings = settings_of(ctx)
        known = Memory(settings.db_path).versions
        try:
            previous = do_restore(path, settings.db_path, known)
            # open once: recovery brings the vector index in step with the restored LanceDB
            asyncio.run(_with_memory(settings, lambda m: asyncio.sleep(0)))
        except TabAgentError as exc:
            _fail(exc)
        click.echo(f"restored {path} into {settings.db_path}")
        if previous is not None:
            click.echo(f"the previous databases are kept at {previous}")

    @db.command("stats")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_context
    def stats(ctx: click.Context, as_json: bool) -> None:
        """Rows, vectors, sizes and schema versions of each store."""
        settings: Settings = settings_of(ctx)
        try:
            data = asyncio.run(_with_memory(settings, lambda m: m.stats()))
        except TabAgentError as exc:
            _fail(exc)
        if as_json:
            click.echo(json.dumps(data, indent=2))
            return
        table = Table(title=f"memory at {settings.db_path}")
        table.add_column("store")
        table.add_column("contents")
        table.add_column("bytes", justify="right")
        for store, values in data.items():
            size = values.pop("bytes", 0)
            contents = ", ".join(f"{k} {v}" for k, v in values.items())
            table.add_row(store, contents, f"{size:,}")
        Console().print(table)

    return db
