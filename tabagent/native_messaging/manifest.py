"""Register TabAgent as a native-messaging host with Chromium-family browsers.

A host is a JSON manifest (name, description, absolute path of the program, ``type: stdio``,
the extension origins allowed to start it). Where a browser looks for it (REFERENCE.md):

- Linux: ``$XDG_CONFIG_HOME/<browser dir>/NativeMessagingHosts/<name>.json``;
- macOS: ``~/Library/Application Support/<browser dir>/NativeMessagingHosts/<name>.json``;
- Windows: any file, named by the default value of
  ``HKCU\\Software\\<browser key>\\NativeMessagingHosts\\<name>``;
- a browser started with ``--user-data-dir=DIR``: ``DIR/NativeMessagingHosts/<name>.json``.

Where each file goes is computed by :func:`targets` from the platform and folders it is given,
so every platform's layout is checked by unit tests on any machine; only the registry writes
themselves need Windows.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any, Literal

HOST_NAME = "com.tabagent.host"
DESCRIPTION = "TabAgent local AI server (models, memory, browser integration)"
# The id that extension/manifest.json's "key" pins: the unpacked development extension.
DEV_EXTENSION_ID = "okolnnnnfjepfcofpjlnfjfpldbgljen"
EXTENSION_ID = re.compile(r"^[a-p]{32}$")

Browser = Literal["chrome", "chromium", "edge", "brave"]
BROWSERS: tuple[Browser, ...] = ("chrome", "chromium", "edge", "brave")
Platform = Literal["linux", "darwin", "win32"]

_LINUX_DIRS = {
    "chrome": "google-chrome",
    "chromium": "chromium",
    "edge": "microsoft-edge",
    "brave": "BraveSoftware/Brave-Browser",
}
_MAC_DIRS = {
    "chrome": "Google/Chrome",
    "chromium": "Chromium",
    "edge": "Microsoft Edge",
    "brave": "BraveSoftware/Brave-Browser",
}
# Registry keys under HKCU\Software; Brave also reads Chrome's key, so it gets both.
_WIN_KEYS = {
    "chrome": ("Google\\Chrome",),
    "chromium": ("Chromium",),
    "edge": ("Microsoft\\Edge",),
    "brave": ("BraveSoftware\\Brave-Browser", "Google\\Chrome"),
}
_CHROME = "Software\\Google\\Chrome\\"
# Where each browser keeps its profiles on Windows (under %LOCALAPPDATA%), to tell if it is there.
_WIN_DATA = {
    "chrome": "Google\\Chrome\\User Data",
    "chromium": "Chromium\\User Data",
    "edge": "Microsoft\\Edge\\User Data",
    "brave": "BraveSoftware\\Brave-Browser\\User Data",
}


class ManifestError(ValueError):
    """A bad extension id, an unknown browser, nothing to install into."""


@dataclass(frozen=True)
class Target:
    """One place a browser looks for the host."""

    browser: str  # chrome, chromium, edge, brave, or "profile" for --profile-dir
    manifest_path: PurePath
    registry_keys: tuple[str, ...] = ()  # HKCU-relative, Windows only
    profile_root: PurePath | None = None  # the browser's data folder: present = browser used

    @property
    def browser_present(self) -> bool:
        return self.profile_root is None or Path(self.profile_root).is_dir()


@dataclass(frozen=True)
class Folders:
    """The folders :func:`targets` needs, read from the environment by :meth:`current`."""

    platform: Platform
    home: PurePath
    config_home: PurePath | None = None  # Linux: $XDG_CONFIG_HOME
    appdata: PurePath | None = None  # Windows: %APPDATA% (the manifest file)
    local_appdata: PurePath | None = None  # Windows: %LOCALAPPDATA% (browser profiles)

    @classmethod
    def current(cls, environ: Mapping[str, str] | None = None) -> Folders:
        env = os.environ if environ is None else environ
        platform: Platform = (
            "win32"
            if sys.platform == "win32"
            else "darwin"
            if sys.platform == "darwin"
            else "linux"
        )
        home = Path.home()
        config = env.get("XDG_CONFIG_HOME")
        return cls(
            platform=platform,
            home=home,
            config_home=Path(config) if config else home / ".config",
            appdata=Path(env["APPDATA"]) if env.get("APPDATA") else None,
            local_appdata=Path(env["LOCALAPPDATA"]) if env.get("LOCALAPPDATA") else None,
        )


def targets(
    folders: Folders, browsers: Iterable[str], profile_dir: Path | None = None
) -> list[Target]:
    """Where the manifest goes for each browser (or only into ``profile_dir``)."""
    name = f"{HOST_NAME}.json"
    if profile_dir is not None:
        return [Target("profile", PurePath(profile_dir) / "NativeMessagingHosts" / name)]
    found = []
    for browser in browsers:
        if browser not in BROWSERS:
            raise ManifestError(f"unknown browser {browser!r}; choose from {', '.join(BROWSERS)}")
        if folders.platform == "linux":
            base = PurePosixPath(folders.config_home or folders.home / ".config")
            root = base.joinpath(*_LINUX_DIRS[browser].split("/"))
            found.append(Target(browser, root / "NativeMessagingHosts" / name, profile_root=root))
        elif folders.platform == "darwin":
            support = PurePosixPath(folders.home) / "Library" / "Application Support"
            root = support.joinpath(*_MAC_DIRS[browser].split("/"))
            found.append(Target(browser, root / "NativeMessagingHosts" / name, profile_root=root))
        else:
            appdata = PureWindowsPath(folders.appdata or folders.home / "AppData" / "Roaming")
            local = PureWindowsPath(folders.local_appdata or folders.home / "AppData" / "Local")
            keys = tuple(
                f"Software\\{key}\\NativeMessagingHosts\\{HOST_NAME}" for key in _WIN_KEYS[browser]
            )
            found.append(
                Target(
                    browser,
                    appdata / "TabAgent" / "native-host" / name,
                    registry_keys=keys,
                    profile_root=local / _WIN_DATA[browser],
                )
            )
    return found


def check_extension_ids(ids: Sequence[str]) -> tuple[str, ...]:
    if not ids:
        raise ManifestError("give at least one --extension-id")
    for ext_id in ids:
        if not EXTENSION_ID.match(ext_id):
            raise ManifestError(
                f"{ext_id!r} is not an extension id: 32 letters a-p, as shown on "
                "chrome://extensions with Developer mode on"
            )
    return tuple(dict.fromkeys(ids))


def manifest(program: PurePath, extension_ids: Sequence[str]) -> dict[str, Any]:
    """The host manifest: Chrome needs the origin exactly, trailing slash included."""
    return {
        "name": HOST_NAME,
        "description": DESCRIPTION,
        "path": str(program),
        "type": "stdio",
        "allowed_origins": [f"chrome-extension://{i}/" for i in check_extension_ids(extension_ids)],
    }


def launcher() -> Path:
    """The program the browser should start: the frozen binary, or this installation's
    ``tabagent-server`` script (the one beside the running interpreter, in a venv)."""
    if getattr(sys, "frozen", False):
        return Path(sys.executable).resolve()
    scripts = Path(sys.executable).parent
    for candidate in ("tabagent-server", "tabagent-server.exe"):
        path = scripts / candidate
        if path.exists():
            return path.absolute()
    found = shutil.which("tabagent-server")
    if found is None:
        raise ManifestError("cannot find the tabagent-server program to register")
    return Path(found).absolute()


@dataclass
class Wrapper:
    """A small launcher that sets the settings given at install time, since a browser starts
    the host with its own environment (not the shell's that had TABAGENT_* set)."""

    path: Path
    program: Path
    environment: dict[str, str] = field(default_factory=dict)

    def text(self, platform: str) -> str:
        if platform == "win32":
            lines = ["@echo off", "rem Written by 'tabagent-server native install'."]
            lines += [f'set "{k}={v}"' for k, v in self.environment.items()]
            lines.append(f'"{self.program}" %*')
            return "\r\n".join(lines) + "\r\n"
        lines = ["#!/bin/sh", "# Written by 'tabagent-server native install'."]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.environment.items()]
        lines.append(f'exec {shlex.quote(str(self.program))} "$@"')
        return "\n".join(lines) + "\n"

    def write(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.text(sys.platform), encoding="utf-8")
        self.path.chmod(0o755)
        return self.path


@dataclass(frozen=True)
class Installed:
    target: Target
    registry_written: bool = False


def install(found: Sequence[Target], document: Mapping[str, Any]) -> list[Installed]:
    done = []
    text = json.dumps(document, indent=2) + "\n"
    for target in found:
        path = Path(target.manifest_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        written = False
        if target.registry_keys:
            _registry_set(target.registry_keys, str(path))
            written = True
        done.append(Installed(target, written))
    return done


def uninstall(found: Sequence[Target]) -> list[Target]:
    removed = []
    for target in found:
        path = Path(target.manifest_path)
        existed = path.exists()
        path.unlink(missing_ok=True)
        # Brave's entry includes Chrome's key; that one stays unless Chrome itself is removed
        keys = [k for k in target.registry_keys if target.browser == "chrome" or _CHROME not in k]
        if keys:
            existed = _registry_delete(keys) or existed
        if existed:
            removed.append(target)
    return removed


@dataclass(frozen=True)
class Status:
    browser: str
    manifest_path: str
    installed: bool
    program: str | None = None
    program_exists: bool = False
    extension_ids: tuple[str, ...] = ()
    registry: bool | None = None  # Windows: the key names this manifest
    problem: str | None = None


def status(found: Sequence[Target]) -> list[Status]:
    rows = []
    for target in found:
        path = Path(target.manifest_path)
        registry = None
        if target.registry_keys:
            registry = all(_registry_get(k) == str(path) for k in target.registry_keys)
        if not path.exists():
            rows.append(Status(target.browser, str(path), False, registry=registry))
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            program = str(doc["path"])
            origins = [str(o) for o in doc.get("allowed_origins", [])]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            rows.append(
                Status(target.browser, str(path), True, problem=f"unreadable manifest: {exc}")
            )
            continue
        ids = tuple(o.removeprefix("chrome-extension://").rstrip("/") for o in origins)
        exists = Path(program).exists()
        problem = None if exists else "the program it names no longer exists: install again"
        rows.append(
            Status(target.browser, str(path), True, program, exists, ids, registry, problem)
        )
    return rows


# -- Windows registry (HKEY_CURRENT_USER) ---------------------------------------------------

if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import winreg

    def _registry_set(keys: Iterable[str], value: str) -> None:
        for key in keys:
            with winreg.CreateKey(winreg.HKEY_CURRENT_USER, key) as handle:
                winreg.SetValueEx(handle, "", 0, winreg.REG_SZ, value)

    def _registry_delete(keys: Iterable[str]) -> bool:
        removed = False
        for key in keys:
            try:
                winreg.DeleteKey(winreg.HKEY_CURRENT_USER, key)
                removed = True
            except OSError:
                pass
        return removed

    def _registry_get(key: str) -> str | None:
        try:
            with winreg.OpenKey(winreg.HKEY_CURRENT_USER, key) as handle:
                value, _ = winreg.QueryValueEx(handle, "")
                return str(value)
        except OSError:
            return None

else:

    def _registry_set(keys: Iterable[str], value: str) -> None:
        raise ManifestError("registry entries can only be written on Windows")

    def _registry_delete(keys: Iterable[str]) -> bool:
        return False

    def _registry_get(key: str) -> str | None:
        return None
