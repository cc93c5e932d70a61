"""Progress of a long job (a one-shot sync, a replay): a rich bar or log lines."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("flows.progress")


class Progress:
    """Progress of a long job: units done out of the total, the rate, an ETA.

    Shown as a ``rich`` bar on standard error when ``bar`` is on and rich is
    installed (the ``tui`` extra), else as log lines such as
    ``replay ticks.jsonl: 300/1,000 lines (30.0%), 14 lines/s, ETA 50s``:
    one every ``every`` seconds and a last one at ``close()``.

    Example:
        ```python
        progress = Progress("source okx", total=len(symbols), unit="symbols")
        progress.advance(100)
        progress.close()
        ```

    Parameters:
        label: what progresses, first on each line (and the bar's title).
        total: units in all (``None``: unknown; no share or ETA).
        done: units already done (a resumed job starts there).
        unit: what is counted, in the lines and the rate.
        bar: show a rich bar (``None``: when standard error is a terminal).
        every: seconds between log lines (``None``: no lines at all).
        logger: where the lines go.
    """

    def __init__(self, label: str, *, total: int | None = None, done: int = 0,
                 unit: str = "items", bar: bool | None = None, every: float | None = 5.0,
                 logger: logging.Logger = log) -> None:
        self.label, self.total, self.done, self.unit = label, total, done, unit
        self.every, self.logger = every, logger
        self.start, self.t0 = done, time.monotonic()
        self._next_line = self.t0 + (every or 0.0)
        self._bar: Any = None
        if sys.stderr.isatty() if bar is None else bar:
            self._bar = _rich_bar(label, total, done, unit)

    @property
    def shows_bar(self) -> bool:
        """True when progress shows as a rich bar (not as log lines)."""
        return self._bar is not None

    def figures(self) -> tuple[float, float | None]:
        """(units per second since the start, seconds left or ``None``)."""
        elapsed = time.monotonic() - self.t0
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 and self.total is not None else None
        return rate, left

    def line(self) -> str:
        """The progress as one line of text."""
        rate, left = self.figures()
        if self.total:
            share = f"{self.done:,}/{self.total:,} {self.unit} ({100 * self.done / self.total:.1f}%)"
        else:
            share = f"{self.done:,} {self.unit}"
        tail = f", ETA {_duration(left)}" if left is not None else ""
        return f"{self.label}: {share}, {rate:,.0f} {self.unit}/s{tail}"

    def update(self, done: int) -> None:
        """``done`` units are done now."""
        self.done = done
        if self._bar is not None:
            rate, _ = self.figures()
            self._bar.update(self._bar.task_ids[0], completed=done, rate=f"{rate:,.0f} {self.unit}/s")
        elif self.every is not None and time.monotonic() >= self._next_line:
            self._next_line = time.monotonic() + self.every
            self.logger.info("%s", self.line())

    def advance(self, n: int) -> None:
        """``n`` more units are done."""
        self.update(self.done + n)

    def close(self, note: str | None = None, *, done: int | None = None) -> None:
        """The job ended (``done`` units, default as last told): stop the bar,
        or log the last line, with ``note`` (why it ended) when given."""
        if done is not None:
            self.done = done
        if self._bar is not None:
            self.update(self.done)
            self._bar.stop()
        elif self.every is not None:
            end = f" ({note} after {time.monotonic() - self.t0:.1f}s)" if note else ""
            self.logger.info("%s%s", self.line(), end)


def _rich_bar(label: str, total: int | None, done: int, unit: str) -> Any:
    """A started rich progress bar on standard error (``None`` without rich)."""
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress
    except ImportError:
        return None
    bar = RichProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    bar.add_task(label, total=total, completed=done, rate=f"0 {unit}/s")
    bar.start()
    return bar


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
