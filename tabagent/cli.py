"""``tabagent-server``: run the server in a mode, or one of the management subcommands.

The server's flags are generated from :class:`tabagent.config.Settings`, so a new setting is a
flag, an environment variable and a line of ``config`` output at once.
"""

from __future__ import annotations

import asyncio
import json
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
from pydantic import SecretStr

from tabagent import __version__, logs
from tabagent.cli_db import db_group
from tabagent.cli_hardware import hardware_command
from tabagent.cli_models import models_group
from tabagent.cli_native import native_group
from tabagent.config import Settings, SettingsError, describe, env_name, flag_name, resolve

PROG = "tabagent-server"
BROWSER_ORIGIN_PREFIX = "chrome-extension://"
NATIVE_LOG_FILE = "tabagent-native.log"  # hosts log apart from the server they may relay to


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"{PROG}: {message}", err=True)
    sys.exit(code)


def _click_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)], case_sensitive=False)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _click_type(inner[0])
    if annotation is bool:
        return click.BOOL
    if annotation is int:
        return click.INT
    if annotation is float:
        return click.FLOAT
    if annotation is Path:
        return click.Path(path_type=Path)
    if annotation is SecretStr:
        return click.STRING
    return click.STRING  # str, and tuples given comma-separated


def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One ``--flag`` per Settings field, defaulting to None so precedence can tell it apart."""
    for name, field in reversed(Settings.model_fields.items()):
        help_text = f"{field.description} [env: {env_name(name)}]"
        command = click.option(
            flag_name(name), name, type=_click_type(field.annotation), default=None, help=help_text
        )(command)
    return command


def _settings(flags: dict[str, Any]) -> tuple[Settings, dict[str, str]]:
    try:
        return resolve(flags)
    except SettingsError as exc:
        _fail(str(exc), 2)


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Run without a subcommand to start the server. API docs: http://127.0.0.1:3000/api-doc",
)
@settings_options
@click.option(
    "--get",
    "get_path",
    metavar="PATH",
    help="Serve one GET request in-process (e.g. /v1/health), print the body, and exit "
    "non-zero unless the status is 2xx.",
)
@click.version_option(__version__, "--version", prog_name=PROG, message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, /, get_path: str | None, **flags: Any) -> None:
    """TabAgent: a local AI server for the desktop (models, memory, browser, vision)."""
    ctx.obj = flags
    if ctx.invoked_subcommand is not None:
        return
    settings, _ = _settings(flags)
    native = settings.mode == "native"
    logs.configure(
        settings.log_level, settings.log_dir, NATIVE_LOG_FILE if native else logs.LOG_FILE_NAME
    )
    if get_path is not None:
        if not get_path.startswith("/"):
            _fail("--get takes a path that starts with '/', e.g. /v1/health", 2)
        from tabagent.app import StartupError, get_once

        try:
            status, body = asyncio.run(get_once(settings, get_path))
        except StartupError as exc:
            _fail(str(exc))
        sys.stdout.buffer.write(body + b"\n")
        sys.stdout.flush()
        sys.exit(0 if 200 <= status < 300 else 1)
    _run_server(settings)


def _run_server(settings: Settings) -> None:
    # the server's modules take a second to import: only once a server is what was asked for
    from tabagent.app import UNAVAILABLE_TRANSPORTS, StartupError, Transports, serve

    transports = Transports.for_mode(settings.mode)
    wanted = [name for name in ("http", "webrtc", "native") if getattr(transports, name)]
    missing = [UNAVAILABLE_TRANSPORTS[n] for n in wanted if n in UNAVAILABLE_TRANSPORTS]
    if missing and len(missing) == len(wanted):
        _fail(f"mode {settings.mode!r} cannot run: " + "; ".join(missing), 2)
    if transports.native and not (transports.http or transports.webrtc):
        from tabagent.native_messaging.host import run_native

        try:
            sys.exit(asyncio.run(run_native(settings)))
        except KeyboardInterrupt:
            sys.exit(0)
    try:
        asyncio.run(serve(settings, transports))
    except StartupError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        pass


@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def config_command(flags: dict[str, Any], as_json: bool) -> None:
    """Print the resolved settings and where each value came from (flag, env or default)."""
    settings, sources = _settings(flags)
    rows = describe(settings, sources)
    if as_json:
        click.echo(json.dumps({n: {"value": v, "source": s} for n, v, s in rows}, indent=2))
        return
    width = max(len(n) for n, _, _ in rows)
    value_width = max(len(v) for _, v, _ in rows)
    for name, value, source in rows:
        click.echo(f"{name:<{width}}  {value:<{value_width}}  {source}")


cli.add_command(models_group(lambda ctx: _settings(ctx.find_root().obj)[0]))
cli.add_command(db_group(lambda ctx: _settings(ctx.find_root().obj)[0]))
cli.add_command(native_group(lambda ctx: _settings(ctx.find_root().obj)))

cli.add_command(hardware_command(lambda ctx: _settings(ctx.find_root().obj)[0]))


@cli.command(
    "ml-service",
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def ml_service_command(args: tuple[str, ...]) -> None:
    """Internal: the ML worker process (the server starts it; see ml_service --help)."""
    from ml_service.server import main as worker_main

    worker_main(list(args))


def _launched_by_browser(argv: Sequence[str]) -> str | None:
    """Chrome starts a native host with the caller's origin as the first argument."""
    if argv and argv[0].startswith(BROWSER_ORIGIN_PREFIX):
        return argv[0]
    return None


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    origin = _launched_by_browser(args)
    if origin is not None:
        # Native mode without any flag. stdout is reserved for frames: report on stderr only.
        settings, _ = _settings({"mode": "native"})
        logs.configure(settings.log_level, settings.log_dir, NATIVE_LOG_FILE)
        _run_server(settings)
        return
    cli.main(args=args, prog_name=PROG)
