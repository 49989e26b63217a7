"""``tabagent-server native``: register the native-messaging host with the user's browsers."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import click
from pydantic import SecretStr

from tabagent.config import Settings, data_dir, env_name
from tabagent.native_messaging import manifest as nm

# Settings a host started by the browser needs to find the same data as the user's server.
# The mode, address and port are the host's own business; secrets are never written to disk.
_NOT_BAKED = frozenset({"mode", "host", "port", "api_key"})


def _fail(message: str) -> None:
    click.echo(f"tabagent-server native: {message}", err=True)
    sys.exit(2)


def _browsers(choice: str, folders: nm.Folders) -> list[str]:
    if choice != "all":
        return [choice]
    present = [t.browser for t in nm.targets(folders, nm.BROWSERS) if t.browser_present]
    if not present:
        _fail(
            "no Chrome, Chromium, Edge or Brave profile found for this user; "
            "name the browser with --browser, or a profile folder with --profile-dir"
        )
    return present


def _baked(settings: Settings, sources: dict[str, str]) -> dict[str, str]:
    baked = {}
    for name, source in sources.items():
        if source == "default" or name in _NOT_BAKED:
            continue
        value = getattr(settings, name)
        if isinstance(value, SecretStr) or value is None:
            continue
        if isinstance(value, tuple):
            value = ",".join(value)
        baked[env_name(name)] = str(value).lower() if isinstance(value, bool) else str(value)
    return baked


_BROWSER_CHOICE = click.Choice(["all", *nm.BROWSERS])
_PROFILE = click.option(
    "--profile-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Install into one browser profile folder (the browser's --user-data-dir) instead.",
)


def native_group(
    resolved: Callable[[click.Context], tuple[Settings, dict[str, str]]],
) -> click.Group:
    @click.group("native")
    def native() -> None:
        """Install the browser native-messaging host (Chrome, Chromium, Edge, Brave)."""

    @native.command("install")
    @click.option(
        "--extension-id",
        "extension_ids",
        multiple=True,
        default=(nm.DEV_EXTENSION_ID,),
        show_default=True,
        help="Extension allowed to start the host (repeat for several). The default is the "
        "id of the unpacked extension in this repository's extension/ folder.",
    )
    @click.option("--browser", type=_BROWSER_CHOICE, default="all", show_default=True,
                  help="all = every browser that has a profile for this user.")  # fmt: skip
    @_PROFILE
    @click.pass_context
    def install(
        ctx: click.Context, extension_ids: tuple[str, ...], browser: str, profile_dir: Path | None
    ) -> None:
        """Register the host, so the extension can start it (no server needs to be running)."""
        settings, sources = resolved(ctx)
        folders = nm.Folders.current()
        try:
            extension_ids = nm.check_extension_ids(extension_ids)
            browsers = [] if profile_dir is not None else _browsers(browser, folders)
            found = nm.targets(folders, browsers, profile_dir)
            program = nm.launcher()
            baked = _baked(settings, sources)
            if baked:
                suffix = ".bat" if sys.platform == "win32" else ""
                wrapper = nm.Wrapper(
                    data_dir() / "native-host" / f"tabagent-native-host{suffix}", program, baked
                )
                program = wrapper.write()
            done = nm.install(found, nm.manifest(program, extension_ids))
        except (nm.ManifestError, OSError) as exc:
            _fail(str(exc))
        for item in done:
            where = str(item.target.manifest_path)
            if item.registry_written:
                where += " (registered under HKCU\\" + item.target.registry_keys[0] + ")"
            click.echo(f"{item.target.browser:<9} {where}")
        click.echo(f"host {nm.HOST_NAME} runs {program}")
        if baked:
            click.echo("with " + ", ".join(f"{k}={v}" for k, v in baked.items()))
        click.echo("allowed: " + ", ".join(f"chrome-extension://{i}/" for i in extension_ids))

    @native.command("uninstall")
    @click.option("--browser", type=_BROWSER_CHOICE, default="all", show_default=True)
    @_PROFILE
    def uninstall(browser: str, profile_dir: Path | None) -> None:
        """Remove the host's manifest (and registry entries on Windows)."""
        choice = list(nm.BROWSERS) if browser == "all" else [browser]
        try:
            removed = nm.uninstall(nm.targets(nm.Folders.current(), choice, profile_dir))
        except (nm.ManifestError, OSError) as exc:
            _fail(str(exc))
        for target in removed:
            click.echo(f"removed {target.manifest_path}")
        if not removed:
            click.echo("the host was not installed")

    @native.command("status")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @_PROFILE
    def status(as_json: bool, profile_dir: Path | None) -> None:
        """Where the host is installed, what it runs, and whether that program still exists."""
        rows = nm.status(nm.targets(nm.Folders.current(), nm.BROWSERS, profile_dir))
        if as_json:
            click.echo(json.dumps([asdict(r) for r in rows], indent=2))
            return
        for row in rows:
            if not row.installed:
                click.echo(f"{row.browser:<9} not installed ({row.manifest_path})")
                continue
            state = "ok" if row.problem is None else f"BROKEN: {row.problem}"
            click.echo(f"{row.browser:<9} {state}: {row.manifest_path}")
            click.echo(f"{'':<9} runs {row.program}; extensions {', '.join(row.extension_ids)}")
        if any(r.problem for r in rows):
            sys.exit(1)

    return native
