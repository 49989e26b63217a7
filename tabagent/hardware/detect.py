"""``detect()``: one look at this machine's CPU, RAM, OS, GPUs, NPUs and acceleration stacks.

Detection never fails because hardware is missing or odd: it returns what it found, and each
gap is explained in ``HardwareInfo.notes``. Everything it reads goes through a ``Probe``
(``run.py``), so tests describe other machines with fixture trees and recorded output.

A cold ``detect()`` is dominated by importing onnxruntime and llama_cpp to ask what they
support; ``HardwareCache`` keeps the answer, and a refresh re-probes (free VRAM changes).
"""

from __future__ import annotations

import logging
import threading
import time

from tabagent.hardware.accel import probe_accelerators
from tabagent.hardware.cpu import probe_cpu
from tabagent.hardware.gpus import probe_gpus
from tabagent.hardware.model import HardwareInfo, MemoryInfo, OsInfo
from tabagent.hardware.npus import probe_npus
from tabagent.hardware.run import Probe

log = logging.getLogger(__name__)


def detect(probe: Probe | None = None) -> HardwareInfo:
    probe = probe or Probe()
    detected_at, started = time.time(), time.perf_counter()
    notes: list[str] = []
    total, available = probe.memory()
    gpus, metal = probe_gpus(probe, (total, available), notes)
    info = HardwareInfo(
        cpu=probe_cpu(probe),
        memory=MemoryInfo(total_bytes=total, available_bytes=available),
        os=OsInfo(
            system=probe.system, release=probe.release, version=probe.version, machine=probe.machine
        ),
        gpus=gpus,
        npus=probe_npus(probe, notes),
        accelerators=probe_accelerators(probe, gpus, metal),
        notes=notes,
        detected_at=detected_at,
        detect_ms=0.0,
    )
    info.detect_ms = (time.perf_counter() - started) * 1000
    log.debug("hardware: %s (%.0f ms)", info.summary(), info.detect_ms)
    return info


class HardwareCache:
    """The last detection, shared by threads; the first ``get()`` detects."""

    def __init__(self, probe: Probe | None = None) -> None:
        self._probe = probe or Probe()
        self._lock = threading.Lock()
        self._info: HardwareInfo | None = None

    def get(self, refresh: bool = False) -> HardwareInfo:
        """The cached detection; ``refresh=True`` probes again and keeps the new answer."""
        with self._lock:  # held while detecting: concurrent first callers wait, not re-probe
            if self._info is None or refresh:
                self._info = detect(self._probe)
            return self._info
