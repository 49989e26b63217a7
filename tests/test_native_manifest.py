"""``tabagent-server native install|uninstall|status`` for real in a temporary HOME on Linux;
the macOS and Windows layouts (files and registry keys) computed and checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import pytest

from tabagent import __version__
from tabagent.native_messaging import manifest as nm
from tests.helpers import SERVER_BIN

LINUX_DIRS = {
    "chrome": "google-chrome",
    "chromium": "chromium",
    "edge": "microsoft-edge",
    "brave": "BraveSoftware/Brave-Browser",
}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SERVER_BIN, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def host_file(home: Path, browser: str) -> Path:
    """Where Linux browsers look: under $XDG_CONFIG_HOME (the tests' own, inside ``home``)."""
    config = Path(os.environ["XDG_CONFIG_HOME"])
    assert config.is_relative_to(home)
    return config / LINUX_DIRS[browser] / "NativeMessagingHosts" / f"{nm.HOST_NAME}.json"


@pytest.mark.parametrize("browser", nm.BROWSERS)
def test_install_status_uninstall_for_each_browser(isolated_home: Path, browser: str) -> None:
    ext = "abcdefghijklmnopabcdefghijklmnop"
    result = cli("native", "install", "--browser", browser, "--extension-id", ext)
    assert result.returncode == 0, result.stderr
    path = host_file(isolated_home, browser)
    doc = json.loads(path.read_text())
    assert doc == {
        "name": "com.tabagent.host",
        "description": nm.DESCRIPTION,
        "path": doc["path"],
        "type": "stdio",
        "allowed_origins": [f"chrome-extension://{ext}/"],
    }
    program = Path(doc["path"])
    assert program.is_absolute()
    assert os.access(program, os.X_OK)
    assert re.fullmatch(r"[a-z0-9._]+", doc["name"])

    status = json.loads(cli("native", "status", "--json").stdout)
    row = next(r for r in status if r["browser"] == browser)
    assert row["installed"]
    assert row["program_exists"]
    assert row["extension_ids"] == [ext]
    assert all(not r["installed"] for r in status if r["browser"] != browser)

    removed = cli("native", "uninstall", "--browser", browser)
    assert removed.returncode == 0
    assert str(path) in removed.stdout
    assert not path.exists()
    assert "was not installed" in cli("native", "uninstall", "--browser", browser).stdout


def test_all_means_the_browsers_this_user_has(isolated_home: Path) -> None:
    none_yet = cli("native", "install")
    assert none_yet.returncode == 2
    assert "--browser" in none_yet.stderr
    for browser in ("chromium", "brave"):
        (Path(os.environ["XDG_CONFIG_HOME"]) / LINUX_DIRS[browser]).mkdir(parents=True)
    result = cli("native", "install")  # default id: the unpacked extension in extension/
    assert result.returncode == 0, result.stderr
    assert host_file(isolated_home, "chromium").exists()
    assert host_file(isolated_home, "brave").exists()
    assert not host_file(isolated_home, "chrome").exists()
    assert not host_file(isolated_home, "edge").exists()
    doc = json.loads(host_file(isolated_home, "brave").read_text())
    assert doc["allowed_origins"] == [f"chrome-extension://{nm.DEV_EXTENSION_ID}/"]


def test_the_dev_extension_id_is_the_one_its_manifest_key_pins() -> None:
    import base64
    import hashlib

    manifest = json.loads((Path(__file__).parents[1] / "extension" / "manifest.json").read_text())
    digest = hashlib.sha256(base64.b64decode(manifest["key"])).hexdigest()[:32]
    assert "".join(chr(ord("a") + int(c, 16)) for c in digest) == nm.DEV_EXTENSION_ID


def test_profile_dir_install_and_several_extension_ids(tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    ids = ["abcdefghijklmnopabcdefghijklmnop", "ponmlkjihgfedcbaponmlkjihgfedcba"]
    args = ["native", "install", "--profile-dir", str(profile)]
    for ext in ids:
        args += ["--extension-id", ext]
    assert cli(*args).returncode == 0
    doc = json.loads((profile / "NativeMessagingHosts" / f"{nm.HOST_NAME}.json").read_text())
    assert doc["allowed_origins"] == [f"chrome-extension://{i}/" for i in ids]


@pytest.mark.parametrize("bad", ["short", "ABCDEFGHIJKLMNOPABCDEFGHIJKLMNOP", "q" * 32])
def test_bad_extension_ids_are_refused(bad: str, tmp_path: Path) -> None:
    result = cli("native", "install", "--profile-dir", str(tmp_path), "--extension-id", bad)
    assert result.returncode == 2
    assert "is not an extension id" in result.stderr
    assert not (tmp_path / "NativeMessagingHosts").exists()


def test_settings_given_at_install_are_kept_in_a_launcher(isolated_home: Path) -> None:
    """The browser starts the host with its own environment: settings given to `install`
    travel in a small launcher script; secrets never do."""
    db = isolated_home / "elsewhere" / "db"
    result = cli(
        "--db-path", str(db), "--memory-budget-tokens", "128", "native", "install",
        "--browser", "chromium",
        env={"TABAGENT_API_KEY": "secret-key", "TABAGENT_LOG_LEVEL": "DEBUG"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    program = Path(json.loads(host_file(isolated_home, "chromium").read_text())["path"])
    script = program.read_text()
    assert f"TABAGENT_DB_PATH={db}" in script
    assert "TABAGENT_MEMORY_BUDGET_TOKENS=128" in script
    assert "TABAGENT_LOG_LEVEL=DEBUG" in script
    assert "secret-key" not in script
    # the launcher really starts this installation, with those settings
    shown = subprocess.run(
        [str(program), "config", "--json"], capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("TABAGENT_")},
    )  # fmt: skip
    config = json.loads(shown.stdout)
    assert config["db_path"] == {"value": str(db), "source": "env TABAGENT_DB_PATH"}
    version = subprocess.run([str(program), "--version"], capture_output=True, text=True)
    assert __version__ in version.stdout


def test_status_says_when_the_program_is_gone(isolated_home: Path) -> None:
    assert cli("native", "install", "--browser", "edge").returncode == 0
    path = host_file(isolated_home, "edge")
    doc = json.loads(path.read_text())
    doc["path"] = str(isolated_home / "moved-away" / "tabagent-server")
    path.write_text(json.dumps(doc))
    result = cli("native", "status")
    assert result.returncode == 1
    assert "BROKEN" in result.stdout
    assert "no longer exists" in result.stdout


def test_macos_locations() -> None:
    folders = nm.Folders(platform="darwin", home=PurePosixPath("/Users/ada"))
    found = {t.browser: str(t.manifest_path) for t in nm.targets(folders, nm.BROWSERS)}
    support = "/Users/ada/Library/Application Support"
    name = "NativeMessagingHosts/com.tabagent.host.json"
    assert found == {
        "chrome": f"{support}/Google/Chrome/{name}",
        "chromium": f"{support}/Chromium/{name}",
        "edge": f"{support}/Microsoft Edge/{name}",
        "brave": f"{support}/BraveSoftware/Brave-Browser/{name}",
    }


def test_windows_files_and_registry_keys() -> None:
    folders = nm.Folders(
        platform="win32",
        home=PureWindowsPath("C:/Users/ada"),
        appdata=PureWindowsPath("C:/Users/ada/AppData/Roaming"),
        local_appdata=PureWindowsPath("C:/Users/ada/AppData/Local"),
    )
    found = {t.browser: t for t in nm.targets(folders, nm.BROWSERS)}
    expected_file = PureWindowsPath(
        "C:/Users/ada/AppData/Roaming/TabAgent/native-host/com.tabagent.host.json"
    )
    keys: dict[str, Any] = {b: t.registry_keys for b, t in found.items()}
    assert all(t.manifest_path == expected_file for t in found.values())
    suffix = "NativeMessagingHosts\\com.tabagent.host"
    assert keys == {
        "chrome": (f"Software\\Google\\Chrome\\{suffix}",),
        "chromium": (f"Software\\Chromium\\{suffix}",),
        "edge": (f"Software\\Microsoft\\Edge\\{suffix}",),
        "brave": (
            f"Software\\BraveSoftware\\Brave-Browser\\{suffix}",
            f"Software\\Google\\Chrome\\{suffix}",
        ),
    }
    assert found["edge"].profile_root == PureWindowsPath(
        "C:/Users/ada/AppData/Local/Microsoft/Edge/User Data"
    )
    wrapper = nm.Wrapper(Path("x.bat"), Path("C:/TabAgent/tabagent-server.exe"), {"A": "b c"})
    text = wrapper.text("win32")
    assert text.startswith("@echo off\r\n")
    assert 'set "A=b c"' in text
    assert text.rstrip().endswith('"C:/TabAgent/tabagent-server.exe" %*')


def test_linux_honours_xdg_config_home() -> None:
    folders = nm.Folders(
        platform="linux", home=PurePosixPath("/home/ada"), config_home=PurePosixPath("/cfg")
    )
    (target,) = nm.targets(folders, ["chromium"])
    assert str(target.manifest_path) == "/cfg/chromium/NativeMessagingHosts/com.tabagent.host.json"
