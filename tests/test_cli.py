"""The installed ``tabagent-server`` command, run as a user runs it (subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tabagent import __version__
from tests.helpers import SERVER_BIN, free_port, http_get, running_server


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SERVER_BIN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def test_help_lists_modes_flags_and_subcommands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for text in ("--mode", "native|http|webrtc|web|all", "--db-path", "--model-cache-path",
                 "--api-key", "--get", "TABAGENT_PORT", "config", "models", "hardware",
                 "native", "db", "ml-service"):  # fmt: skip
        assert text in result.stdout, text


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"tabagent-server {__version__}"


def test_settings_precedence_flag_over_env_over_default(isolated_home: Path) -> None:
    env = {"TABAGENT_PORT": "4100", "TABAGENT_LOG_LEVEL": "debug"}
    result = run_cli("--port", "4200", "config", "--json", env=env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["port"] == {"value": "4200", "source": "flag"}
    assert shown["log_level"] == {"value": "DEBUG", "source": "env TABAGENT_LOG_LEVEL"}
    assert shown["host"] == {"value": "127.0.0.1", "source": "default"}
    # platformdirs defaults, under the isolated HOME/XDG folders
    data_home = os.environ["XDG_DATA_HOME"]
    assert shown["db_path"]["value"] == f"{data_home}/TabAgent/tabagent_db"
    assert shown["model_cache_path"]["value"] == f"{data_home}/TabAgent/models"


def test_config_table_masks_the_api_key() -> None:
    result = run_cli("config", env={"TABAGENT_API_KEY": "s3cret-key"})
    assert result.returncode == 0
    assert "s3cret-key" not in result.stdout
    api_key_line = next(line for line in result.stdout.splitlines() if line.startswith("api_key"))
    assert "********" in api_key_line
    assert "env TABAGENT_API_KEY" in api_key_line


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (("--port", "70000"), {}, "--port / TABAGENT_PORT (flag)"),
        ((), {"TABAGENT_MAX_BODY_BYTES": "12"}, "--max-body-bytes / TABAGENT_MAX_BODY_BYTES (env"),
        ((), {"TABAGENT_EXTENSION_IDS": "not-an-id"}, "is not a Chrome extension id"),
        ((), {"TABAGENT_MODE": "sideways"}, "--mode / TABAGENT_MODE"),
        (("--stream-interval-ms", "1001"), {}, "--stream-interval-ms / TABAGENT_STREAM_INTERVAL"),
        ((), {"TABAGENT_STREAM_INTERVAL_MS": "-1"}, "--stream-interval-ms / TABAGENT_STREAM_INT"),
    ],
)
def test_invalid_settings_are_refused_with_the_flag_and_variable_named(
    args: tuple[str, ...], env: dict[str, str], needle: str
) -> None:
    result = run_cli(*args, "config", env=env)
    assert result.returncode == 2
    assert needle in result.stderr


def test_get_health_prints_body_and_exits_zero() -> None:
    result = run_cli("--get", "/v1/health")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["status"] == "ok"
    assert body["version"] == __version__


def test_get_missing_path_exits_non_zero_with_json_error() -> None:
    result = run_cli("--get", "/v1/does-not-exist")
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["code"] == "not_found"


def test_get_sends_the_configured_api_key() -> None:
    result = run_cli("--api-key", "k1", "--get", "/v1/system")
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["mode"] == "http"


def test_webrtc_mode_serves_signaling_and_health_only(isolated_home: Path) -> None:
    with running_server(("--mode", "webrtc"), env={"TABAGENT_ML_WORKER": "false"}) as server:
        status, body = http_get(f"{server.base_url}/v1/webrtc/sessions")
        assert status == 200
        assert json.loads(body)["data"] == []
        assert http_get(f"{server.base_url}/v1/system")[0] == 404  # the REST API is mode http
        assert "live: webrtc" in server.stderr()


def test_browser_launch_picks_native_mode_and_keeps_stdout_clean() -> None:
    """Chrome's arguments alone select native mode; the browser closing the port at once (EOF
    on stdin) ends the host cleanly, and nothing but frames (here: none) reaches stdout."""
    result = run_cli(
        "chrome-extension://abcdefghijklmnopabcdefghijklmnop/",
        "--parent-window=0",
        env={"TABAGENT_ML_WORKER": "false"},
    )
    assert result.returncode == 0, result.stderr
    assert "serving native messaging" in result.stderr
    assert result.stdout == ""  # stdout belongs to native-messaging frames
    log_file = Path(os.environ["XDG_STATE_HOME"]) / "TabAgent" / "log" / "tabagent-native.log"
    assert "serving native messaging" in log_file.read_text()


def test_refuses_non_loopback_bind_without_api_key() -> None:
    result = run_cli("--mode", "http", "--host", "0.0.0.0", "--port", str(free_port()))
    assert result.returncode == 1
    assert "--api-key" in result.stderr


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("--mode", "http", "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_web_mode_serves_until_sigterm_then_exits_zero(isolated_home: Path) -> None:
    with running_server(("--mode", "web")) as server:
        status, body = http_get(
            f"{server.base_url}/v1/health", headers={"X-Request-Id": "trace-42"}
        )
        assert status == 200
        health = json.loads(body)
        assert health["components"]["http"]["state"] == "ok"
        # web = REST + WebRTC signaling
        assert health["components"]["webrtc"]["state"] == "ok"
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=20) == 0
        assert server.proc.stdout is not None
        assert server.proc.stdout.read() == b""
        stderr = server.stderr()
    assert f"listening on http://127.0.0.1:{server.port}" in stderr
    assert "live: http, webrtc" in stderr
    assert "stopped" in stderr
    log_file = Path(os.environ["XDG_STATE_HOME"]) / "TabAgent" / "log" / "tabagent.log"
    assert "listening on" in log_file.read_text()


def test_all_mode_from_a_terminal_serves_http_without_native(isolated_home: Path) -> None:
    with running_server(("--mode", "all")) as server:
        _, body = http_get(f"{server.base_url}/v1/system")
        info = json.loads(body)
        assert info["mode"] == "all"
        assert info["transports"] == ["http", "webrtc"]
        _, body = http_get(f"{server.base_url}/v1/health")
        assert "native" not in json.loads(body)["components"]


def test_a_second_server_on_the_same_databases_refuses_cleanly_and_get_still_answers() -> None:
    env = {"TABAGENT_ML_WORKER": "false"}
    with running_server(("--mode", "http"), env=env):
        second = run_cli("--mode", "http", "--port", str(free_port()), env=env)
        assert second.returncode != 0
        assert "in use by another TabAgent process" in second.stderr
        assert "Traceback" not in second.stderr
        smoke = run_cli("--get", "/v1/health", env=env)
        assert smoke.returncode == 0, smoke.stderr
        assert json.loads(smoke.stdout)["components"]["memory"]["state"] == "unavailable"
