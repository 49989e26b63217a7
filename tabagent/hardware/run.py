"""The machine as detection sees it: one injectable ``Probe`` through which every probe reads.

Detection touches the outside world in only a few ways — files under ``/proc`` and ``/sys``,
a handful of commands, and a few optional libraries. ``Probe`` names each of them, so a test
can describe another machine (a fixture tree as ``root``, recorded command output, a fake
``pynvml``) and run the very code that runs in production.

The defaults import ``psutil``, ``cpuinfo``, ``pynvml``, ``onnxruntime`` and ``llama_cpp``
inside the functions that need them: importing this module costs nothing, and a command that
never detects (``tabagent-server --help``) never loads them.
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any


def run_command(args: Sequence[str], timeout: float) -> str | None:
    """Stdout of ``args`` (never through a shell), or None if missing, failing or too slow."""
    try:
        done = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def load_nvml() -> ModuleType | None:
    try:
        import pynvml  # type: ignore[import-untyped]
    except ImportError:
        return None
    module: ModuleType = pynvml
    return module


def list_onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except Exception:  # a broken wheel fails in many ways; any of them means "no providers"
        return []


def llama_supports_gpu_offload() -> bool:
    """Whether the installed llama-cpp-python build can offload layers to a GPU.

    Importing ``llama_cpp`` takes about 90 ms (numpy, jinja2) to ask its shared library one
    question, so on Linux and macOS the library is opened directly, from where ``llama_cpp``
    itself loads it. Windows needs the package's DLL search-path set-up: there it is imported.
    """
    try:
        if sys.platform == "win32" or "llama_cpp" in sys.modules:
            import llama_cpp

            return bool(llama_cpp.llama_supports_gpu_offload())
        library = _llama_library()
        if library is None:
            return False
        supports = ctypes.CDLL(str(library)).llama_supports_gpu_offload
        supports.restype = ctypes.c_bool
        return bool(supports())
    except Exception:  # a library that does not load, or lacks the symbol: no offload
        return False


def _llama_library() -> Path | None:
    """libllama as ``llama_cpp/llama_cpp.py`` finds it (LLAMA_CPP_LIB_PATH, else its lib/)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    folder = Path(override) if override else Path(spec.submodule_search_locations[0]) / "lib"
    candidates = [folder / "libllama.so", folder / "libllama.dylib"]
    return next((path for path in candidates if path.exists()), None)


def py_cpuinfo() -> dict[str, Any]:
    """py-cpuinfo's dict, gathered in this process.

    Its public ``get_cpu_info()`` re-runs the module in a fresh interpreter (about a second),
    to dodge a multiprocessing pitfall on Windows; ``_get_cpu_info_internal()`` is the same
    gathering without that hop. Only macOS and Windows come here: Linux reads /proc itself.
    """
    from cpuinfo import cpuinfo  # type: ignore[import-untyped]

    gather = getattr(cpuinfo, "_get_cpu_info_internal", cpuinfo.get_cpu_info)
    info: dict[str, Any] = gather()
    return info


def psutil_cpu_counts() -> tuple[int | None, int | None]:
    """(logical, physical) core counts from psutil; either is None when the OS won't say."""
    psutil = _psutil()
    return psutil.cpu_count(logical=True), psutil.cpu_count(logical=False)


def psutil_memory() -> tuple[int, int]:
    """(total, available) RAM in bytes."""
    vm = _psutil().virtual_memory()
    return vm.total, vm.available


def _psutil() -> Any:
    import psutil  # type: ignore[import-untyped]  # no type stubs installed

    return psutil


def is_installed(name: str) -> bool:
    """Whether ``name`` could be imported, found without importing it."""
    return importlib.util.find_spec(name) is not None


_DISPLAY_CLASS = r"SYSTEM\CurrentControlSet\Control\Class\{4d36e968-e325-11ce-bfc1-08002be10318}"


def registry_adapter_memory() -> dict[str, int] | None:
    """Dedicated memory per display adapter name (``DriverDesc``) from the registry.

    ``Win32_VideoController.AdapterRAM`` is a uint32, so it tops out at 4 GiB; the display
    driver's ``HardwareInformation.qwMemorySize`` is the full 64-bit size. None off Windows.
    """
    if sys.platform != "win32":
        return None
    import winreg

    sizes: dict[str, int] = {}
    try:
        display_class = winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, _DISPLAY_CLASS)
    except OSError:
        return sizes
    with display_class:
        for i in itertools.count():
            try:
                subkey = winreg.EnumKey(display_class, i)
            except OSError:  # no more subkeys
                break
            try:  # "0000", "0001"…; "Properties" is not readable, and not every key has a size
                with winreg.OpenKey(display_class, subkey) as adapter:
                    name, _ = winreg.QueryValueEx(adapter, "DriverDesc")
                    size, _ = winreg.QueryValueEx(adapter, "HardwareInformation.qwMemorySize")
            except OSError:
                continue
            sizes[str(name)] = int(size)
    return sizes


@dataclass(frozen=True)
class Probe:
    """Everything detection reads from the machine; the defaults read this one."""

    root: Path = Path("/")
    system: str = field(default_factory=platform.system)
    release: str = field(default_factory=platform.release)
    version: str = field(default_factory=platform.version)
    machine: str = field(default_factory=platform.machine)
    run: Callable[[Sequence[str], float], str | None] = run_command
    nvml: Callable[[], ModuleType | None] = load_nvml
    onnxruntime_providers: Callable[[], list[str]] = list_onnxruntime_providers
    llama_gpu_offload: Callable[[], bool] = llama_supports_gpu_offload
    cpu_info: Callable[[], dict[str, Any]] = py_cpuinfo
    cpu_counts: Callable[[], tuple[int | None, int | None]] = psutil_cpu_counts
    memory: Callable[[], tuple[int, int]] = psutil_memory
    module_installed: Callable[[str], bool] = is_installed
    windows_adapter_memory: Callable[[], dict[str, int] | None] = registry_adapter_memory

    def path(self, absolute: str) -> Path:
        """``absolute`` (e.g. "/proc/cpuinfo") under ``root``."""
        return self.root / absolute.lstrip("/")

    def read(self, absolute: str | Path) -> str | None:
        """A small text file under ``root``, stripped; None when absent or unreadable."""
        target = absolute if isinstance(absolute, Path) else self.path(absolute)
        try:
            return target.read_text(errors="replace").strip()
        except OSError:
            return None

    def link_name(self, link: Path) -> str | None:
        """The name a sysfs symlink such as ``device/driver`` points to.

        Fixture trees may hold a plain file containing the name instead of the symlink, so
        that they survive copies and archives that drop links.
        """
        if link.is_symlink():
            return Path(link.readlink()).name
        return self.read(link)
