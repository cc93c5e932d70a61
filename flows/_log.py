"""Logging: text or JSON lines, and rate-limited lines for dropped records."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

from ._redact import redact

__all__ = ["DropLog", "JsonFormatter", "TextFormatter", "setup_logging"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class TextFormatter(logging.Formatter):
    """``time level logger: message``, with secrets masked (``flows.redact``)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, plus any extras;
    secrets masked (``flows.redact``) in the event, the extras and the
    exception."""

    _encoder = msgspec.json.Encoder()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                if isinstance(value, (int, float, bool)):
                    entry[key] = value
                else:
                    entry[key] = redact(value if isinstance(value, str) else repr(value))
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return self._encoder.encode(entry).decode()


_CHATTY = ("httpx", "httpcore")
"""Libraries that log every request (with its URL) at INFO or DEBUG."""


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Configure the root logger for the CLI (stderr).

    Every line goes through ``flows.redact`` (URL passwords, tokens, API
    keys). httpx's and httpcore's per-request lines are shown only at
    ``DEBUG`` (and redacted then too).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("hypercorn").setLevel(logging.WARNING)
    debug = root.getEffectiveLevel() <= logging.DEBUG
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.WARNING)


class DropLog:
    """Logs dropped records at most once per ``every`` seconds per reason.

    The line says how many more were dropped since the last one, so a flood
    of bad records costs one log line per interval, not one per record.
    A ``detail`` longer than ``MAX_DETAIL`` characters is cut (a hostile
    record must not make a huge log line), and secrets in it are masked
    (``flows.redact``).
    """

    MAX_DETAIL = 300

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
        size = len(detail)
        detail = redact(detail[: 2 * self.MAX_DETAIL])  # a server may echo a key in its error
        if size > self.MAX_DETAIL:
            detail = f"{detail[: self.MAX_DETAIL]}... ({size:,} characters)"
        suffix = f" (+{more} more since last report)" if more else ""
        self._log.warning("dropped record (%s): %s%s", reason, detail, suffix, extra={"reason": reason})
        self._next[reason] = now + self._every
