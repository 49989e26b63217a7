"""Hardware detection where a user meets it: ``tabagent-server hardware``, the
``system.hardware`` operation, health's summary, and the plan reaching the ML worker when it
loads the embedded model (threads from the physical cores, GPU layers from the hardware)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import RunningServer, http_get, post_json, running_server
from tests.test_cli import run_cli


def physical_cores() -> int:
    """What the kernel says: one entry per distinct set of sibling hyper-threads."""
    cpus = Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/core_cpus_list")
    return len({p.read_text().strip() for p in cpus}) or os.cpu_count() or 1


def get_json(url: str) -> tuple[int, Any]:
    status, body = http_get(url)
    return status, json.loads(body)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("home")
    with running_server(("--mode", "http"), log_dir=home) as srv:
        yield srv


def test_cli_prints_the_machine_and_the_plan_for_the_embedded_model() -> None:
    shown = run_cli("hardware")
    assert shown.returncode == 0, shown.stderr
    assert "Machine" in shown.stdout
    assert "smollm2-135m-instruct" in shown.stdout
    assert "detected in" in shown.stdout

    as_json = run_cli("hardware", "--json")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["hardware"]["cpu"]["logical_cores"] == os.cpu_count()
    assert report["hardware"]["cpu"]["physical_cores"] == physical_cores()
    plan = report["llama"]["smollm2-135m-instruct"]
    assert plan["n_threads"] == physical_cores()
    assert plan["offload"] == "none"  # no GPU here, and a CPU build of llama.cpp
    assert plan["fits"] is True
    assert report["onnx_providers"][-1] == "CPUExecutionProvider"


def test_settings_override_the_plan() -> None:
    result = run_cli("hardware", "--json", env={"TABAGENT_N_THREADS": "1",
                                                "TABAGENT_N_GPU_LAYERS": "0"})  # fmt: skip
    plan = json.loads(result.stdout)["llama"]["smollm2-135m-instruct"]
    assert plan["n_threads"] == 1
    assert any("by the user" in r for r in plan["reasons"])


def test_the_operation_health_and_the_loaded_model(server: RunningServer) -> None:
    status, report = get_json(f"{server.base_url}/v1/system/hardware")
    assert status == 200
    assert report["hardware"]["memory"]["total_bytes"] > 0
    assert report["summary"].startswith(f"{physical_cores()}c/{os.cpu_count()}t")
    assert set(report["llama"]) == {"smollm2-135m-instruct"}
    again = get_json(f"{server.base_url}/v1/system/hardware?refresh=true")[1]
    assert again["hardware"]["detected_at"] > report["hardware"]["detected_at"]
    cached = get_json(f"{server.base_url}/v1/system/hardware")[1]
    assert cached["hardware"]["detected_at"] == again["hardware"]["detected_at"]
    bad, error = get_json(f"{server.base_url}/v1/system/hardware?refresh=maybe")
    assert bad == 422
    assert error["error"]["param"] == "refresh"

    deadline = time.monotonic() + 30
    while (health := get_json(f"{server.base_url}/v1/health")[1])["components"]["hardware"][
        "detail"
    ] == "detecting":  # in the background after start-up; health stays ok meanwhile
        assert health["status"] == "ok"
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    assert health["components"]["hardware"] == {"state": "ok", "detail": report["summary"]}
    # what onnxruntime and llama.cpp support was asked of the worker program: the server
    # itself never loads them (they would stay in its memory for one answer)
    assert report["hardware"]["accelerators"]["onnxruntime_providers"][-1:] == [
        "CPUExecutionProvider"
    ]
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "onnxruntime" not in maps
    assert "libllama" not in maps

    # the orchestrator loads the model with the plan's figures
    status, _ = post_json(f"{server.base_url}/v1/models/load", {"model": "smollm2-135m-instruct"})
    assert status == 200
    status, card = get_json(f"{server.base_url}/v1/models/smollm2-135m-instruct")
    assert status == 200
    assert card["loaded"] is True
    assert card["n_threads"] == physical_cores()
    assert card["n_gpu_layers"] == 0
    log = server.stderr_path.read_text()
    assert "loading smollm2-135m-instruct: " in log
    assert "CPU only" in log
