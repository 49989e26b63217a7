"""Settings: one typed schema, resolved once.

Every field is a CLI flag (``--db-path``), an environment variable (``TABAGENT_DB_PATH``) and a
default, in that order of precedence. :func:`resolve` records where each value came from so
``tabagent-server config`` can show it. Defaults for paths come from platformdirs:

* Linux: ``~/.local/share/TabAgent/{tabagent_db,models}``, logs in ``~/.local/state/TabAgent/log``
* macOS: ``~/Library/Application Support/TabAgent/...``, logs in ``~/Library/Logs/TabAgent``
* Windows: ``%APPDATA%/TabAgent/...``
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

APP_NAME = "TabAgent"
ENV_PREFIX = "TABAGENT_"

Mode = Literal["native", "http", "webrtc", "web", "all"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

_MIB = 1024 * 1024
_LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def data_dir() -> Path:
    """TabAgent's per-user data folder (databases, models and the host launcher go under it)."""
    # roaming=True gives %APPDATA% on Windows (the seed's layout); no effect elsewhere.
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False, roaming=True))


def _default_run_dir() -> Path:
    # Holds the worker's Unix socket and the lock file that names a running server. On Linux that
    # is $XDG_RUNTIME_DIR/TabAgent; without XDG_RUNTIME_DIR platformdirs would fall back to a
    # shared /tmp folder (and warn), so we use the private state folder instead.
    if sys.platform.startswith("linux") and not os.environ.get("XDG_RUNTIME_DIR"):
        return Path(platformdirs.user_state_dir(APP_NAME, appauthor=False)) / "run"
    return Path(platformdirs.user_runtime_dir(APP_NAME, appauthor=False))


class Settings(BaseModel):
    """Everything the server can be told. Each field's description is its ``--help`` text."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = Field(
        "all",
        description="Transports to run: http (REST API), webrtc (signaling), web (both), "
        "native (native messaging on stdin/stdout), all (everything available).",
    )
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        max_length=253,
        description="Address to bind. Anything but loopback requires --api-key.",
    )
    port: int = Field(3000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    db_path: Path = Field(
        default_factory=lambda: data_dir() / "tabagent_db",
        description="Folder of the seven memory databases.",
    )
    model_cache_path: Path = Field(
        default_factory=lambda: data_dir() / "models",
        description="Folder of downloaded models (Hugging Face cache layout).",
    )
    log_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_log_dir(APP_NAME, appauthor=False)),
        description="Folder of the rotating log file.",
    )
    run_dir: Path = Field(
        default_factory=_default_run_dir,
        description="Folder for sockets and the lock file of a running server.",
    )
    log_level: LogLevel = Field("INFO", description="Least severe level that is logged.")
    api_key: SecretStr | None = Field(
        None,
        description="Require 'Authorization: Bearer KEY' on the API (health stays open).",
    )
    allowed_hosts: tuple[str, ...] = Field(
        (),
        description="Host names accepted in the Host header besides localhost, 127.0.0.1 and "
        "[::1] (comma-separated in the environment).",
    )
    allowed_origins: tuple[str, ...] = Field(
        (),
        description="Web origins allowed to call the API from a browser (CORS), e.g. "
        "http://localhost:5173.",
    )
    extension_ids: tuple[str, ...] = Field(
        (),
        description="Chrome extension ids whose chrome-extension:// origin is allowed (CORS).",
    )
    max_body_bytes: int = Field(
        4 * _MIB,
        ge=1024,
        le=1024 * _MIB,
        description="Largest request body accepted on JSON routes, in bytes.",
    )
    shutdown_timeout: float = Field(
        10.0, ge=0, le=300, description="Seconds in-flight requests get to finish on shutdown."
    )
    ml_worker: bool = Field(
        True, description="Start the ML worker process (false: the API without inference)."
    )
    memory: bool = Field(
        True,
        description="Open the seven memory databases under --db-path (conversations, "
        "knowledge, search); false: stateless, nothing written.",
    )
    memory_budget_tokens: int = Field(
        256,
        ge=0,
        le=32768,
        description="Tokens of recalled memories a chat with a conversation_id may add to its "
        "prompt (0: store turns but recall nothing).",
    )
    webrtc_max_sessions: int = Field(
        16, ge=1, le=1024, description="Most WebRTC sessions (browser peers) at once."
    )
    webrtc_idle_timeout: float = Field(
        900.0,
        ge=5,
        le=86400,
        description="Seconds without a message before a WebRTC session closes.",
    )
    webrtc_ice_servers: tuple[str, ...] = Field(
        (),
        description="STUN/TURN URLs for WebRTC (comma-separated in the environment); none by "
        "default: a local server and its browser connect with host candidates.",
    )
    memory_extract: Literal["rules", "llm", "off"] = Field(
        "rules",
        description="How facts are taken from what the user says in a remembered chat: "
        "deterministic rules (fast), the chat model with the rules as fallback, or off.",
    )
    keep_alive: float = Field(
        300.0,
        ge=-1,
        le=7 * 24 * 3600,
        description="Seconds an idle model stays loaded (-1: forever, 0: unload after each use).",
    )
    max_queue: int = Field(
        8, ge=1, le=1000, description="Requests that may wait for one model before 429."
    )
    request_timeout: float = Field(
        300.0, ge=1, le=24 * 3600, description="Seconds a request may wait for and use a model."
    )
    cache_budget_mb: int = Field(
        0,
        ge=0,
        le=1 << 30,
        description="Disk budget of the model cache in MiB; least recently used pulls are "
        "evicted beyond it, never a loaded model (0: no limit).",
    )
    ram_budget_mb: int = Field(
        0, ge=0, le=16 * 1024 * 1024, description="RAM for loaded models in MiB (0: half of RAM)."
    )
    n_ctx: int = Field(
        0, ge=0, le=1_048_576, description="Context length of chat models (0: model's, max 4096)."
    )
    n_threads: int = Field(
        0, ge=0, le=1024, description="CPU threads for generation (0: the physical cores)."
    )
    n_gpu_layers: int | None = Field(
        None,
        ge=-1,
        le=10_000,
        description="Layers offloaded to the GPU (-1: all, 0: none; unset: from free VRAM).",
    )
    stream_interval_ms: int = Field(
        40,
        ge=0,
        le=1000,
        description="Streamed text comes in chunks at most this often: tokens produced faster "
        "travel together, which leaves the CPU to the model (0: one chunk per token).",
    )
    onnx_providers: tuple[str, ...] = Field(
        (),
        description="onnxruntime execution providers for embedding models, in order "
        "(comma-separated in the environment); none: the best available.",
    )

    @field_validator(
        "allowed_hosts",
        "allowed_origins",
        "extension_ids",
        "webrtc_ice_servers",
        "onnx_providers",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("log_level", "mode", mode="before")
    @classmethod
    def _normalise_case(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return (
            value.upper()
            if value.lower() in ("debug", "info", "warning", "error")
            else value.lower()
        )

    @field_validator("extension_ids")
    @classmethod
    def _check_extension_ids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for ext_id in value:
            if len(ext_id) != 32 or not all("a" <= c <= "p" for c in ext_id):
                raise ValueError(f"{ext_id!r} is not a Chrome extension id (32 letters a-p)")
        return value

    @field_validator("db_path", "model_cache_path", "log_dir", "run_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @property
    def binds_loopback(self) -> bool:
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SettingsError(ValueError):
    """Settings that cannot be used, with a message that names the flag and the variable."""


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def resolve(
    flags: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[Settings, dict[str, str]]:
    """Build Settings from CLI flags (``None`` = not given), then the environment, then defaults.

    Returns the settings and, per field, where its value came from (``flag``, ``env NAME`` or
    ``default``).
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in Settings.model_fields:
        given = flags.get(name)
        if given is not None and given != ():
            values[name], sources[name] = given, "flag"
        elif env_name(name) in environ:
            values[name], sources[name] = environ[env_name(name)], f"env {env_name(name)}"
        else:
            sources[name] = "default"
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            where = sources.get(field, "default")
            problems.append(f"{flag_name(field)} / {env_name(field)} ({where}): {err['msg']}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems)) from None
    return settings, sources


def describe(settings: Settings, sources: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(name, value, source) rows for display; secrets are masked."""
    rows = []
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            shown = "********"
        elif isinstance(value, tuple):
            shown = ",".join(value) or "(none)"
        elif value is None:
            shown = "(none)"
        else:
            shown = str(value)
        rows.append((name, shown, sources.get(name, "default")))
    return rows
