"""One process at a time per database folder: an advisory lock beside it.

Two servers writing the same SQLite/LanceDB files would each keep their own vector index and
writer thread and corrupt each other's view; restore must not swap files under a running server.
The lock file is ``.<folder name>.lock`` next to the folder, so it survives the folder being
renamed (restore) and is never part of a backup. The OS drops the lock when the process dies,
``kill -9`` included, so a crash never leaves a stale lock.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType
from typing import IO


class DatabaseLock:
    def __init__(self, db_path: Path) -> None:
        self.path = db_path.parent / f".{db_path.name}.lock"
        self._file: IO[str] | None = None
        self.acquired = False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held for the lock's lifetime
        try:
            if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
                import msvcrt

                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        self.acquired = True
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None
        self.acquired = False

    def holder(self) -> int | None:
        """The pid written by the holder (for messages), if readable."""
        try:
            return int(self.path.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def __enter__(self) -> DatabaseLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
