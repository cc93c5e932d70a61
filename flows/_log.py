"""Logging: text or JSON lines, and rate-limited lines for dropped records."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

__all__ = ["DropLog", "JsonFormatter", "setup_logging"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, plus any extras."""

    _encoder = msgspec.json.Encoder()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                entry[key] = value if isinstance(value, (str, int, float, bool)) else repr(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self._encoder.encode(entry).decode()


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Configure the root logger for the CLI (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("hypercorn").setLevel(logging.WARNING)


class DropLog:
    """Logs dropped records at most once per ``every`` seconds per reason.

    The line says how many more were dropped since the last one, so a flood
    of bad records costs one log line per interval, not one per record.
    """

    def __init__(self, logger: str, every: float = 10.0) -> None:
        self._log = logging.getLogger(logger)
        self._every = every
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def drop(self, reason: str, detail: str) -> None:
        now = time.monotonic()
        if now < self._next.get(reason, 0.0):
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        more = self._suppressed.pop(reason, 0)
        suffix = f" (+{more} more since last report)" if more else ""
        self._log.warning("dropped record (%s): %s%s", reason, detail, suffix, extra={"reason": reason})
        self._next[reason] = now + self._every
