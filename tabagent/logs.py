"""Logging: stderr and a rotating file, every line tagged with the request id.

Nothing is ever written to stdout: in native-messaging mode stdout carries frames only.
"""

from __future__ import annotations

import contextvars
import logging
import logging.handlers
import sys
from pathlib import Path

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
LOG_FILE_NAME = "tabagent.log"
_MAX_BYTES = 10 * 1024 * 1024
_BACKUPS = 5


class RequestIdFilter(logging.Filter):
    """Copies the current request id (a contextvar) onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure(level: str, log_dir: Path | None, file_name: str = LOG_FILE_NAME) -> Path | None:
    """Install the handlers on the root logger; returns the log file path, if one could be made.

    A log folder that cannot be created (read-only home, say) is reported on stderr and the
    server runs on with stderr logging only.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_tabagent", False):
            root.removeHandler(handler)
            handler.close()
    formatter = logging.Formatter(LOG_FORMAT)
    id_filter = RequestIdFilter()

    stderr = logging.StreamHandler(sys.stderr)
    handlers: list[logging.Handler] = [stderr]
    log_file: Path | None = None
    if log_dir is not None:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            log_file = log_dir / file_name
            handlers.append(
                logging.handlers.RotatingFileHandler(
                    log_file, maxBytes=_MAX_BYTES, backupCount=_BACKUPS, encoding="utf-8"
                )
            )
        except OSError as exc:
            log_file = None
            sys.stderr.write(f"tabagent: cannot write logs to {log_dir}: {exc}\n")
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(id_filter)
        handler._tabagent = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's access log duplicates our request logging; keep its errors.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return log_file
