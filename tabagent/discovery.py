"""How a native-messaging host finds a TabAgent server already running for this user.

A running server (any mode) publishes ``server.json`` in the run directory (private to the
user: the folder is 0700, the file 0600): its loopback URL, a per-launch token that the
envelope endpoint requires, its pid and version. It holds ``.server.lock`` beside it for its
whole life; the OS drops that lock when the process dies (``kill -9`` included), so a reader
that can take the lock knows the file is stale. A second server finds the lock taken and does
not publish: the first one stays the one hosts proxy to.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tabagent.storage.lock import DatabaseLock

log = logging.getLogger(__name__)

RUN_FILE = "server.json"


@dataclass(frozen=True)
class ServerInfo:
    url: str  # http://127.0.0.1:PORT
    token: str
    pid: int
    version: str
    mode: str


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # not ours to change (a shared XDG_RUNTIME_DIR parent)
        path.chmod(0o700)


class Publication:
    """This process's entry in the run directory, removed by :meth:`withdraw`."""

    def __init__(self, run_dir: Path, lock: DatabaseLock) -> None:
        self.path = run_dir / RUN_FILE
        self._lock = lock

    def withdraw(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
        self._lock.release()


def publish(run_dir: Path, info: ServerInfo) -> Publication | None:
    """Announce this server; None when another live server already did."""
    _private_dir(run_dir)
    lock = DatabaseLock(run_dir / "server")
    if not lock.acquire():
        log.info("another TabAgent server (pid %s) is already published", lock.holder())
        return None
    path = run_dir / RUN_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(asdict(info), handle)
    os.replace(tmp, path)
    return Publication(run_dir, lock)


def find(run_dir: Path) -> ServerInfo | None:
    """The live server published in ``run_dir``, if any."""
    path = run_dir / RUN_FILE
    if not path.exists():
        return None
    lock = DatabaseLock(run_dir / "server")
    if lock.acquire():  # nobody holds it: whoever wrote the file is gone
        lock.release()
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return ServerInfo(**{k: raw[k] for k in ServerInfo.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None
