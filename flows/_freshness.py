"""Freshness: when a source last sent a valid record, overall and per symbol.

The runtime gives every source's outbox a ``Freshness``; each batch sent
updates it (the records reaching the outbox passed the source's own
validation). It answers, at scrape or status time: the age of the last
record, how many symbols are older than ``stale_after`` (a count: a
symbol never becomes a metric label) and which are the stalest.

A symbol is tracked from its first valid record on (spellings in a
source's config and in its records may differ, so the configured list is
not used); a source that never sends anything is caught by the overall
age, which counts from the start.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from typing import Any

import trio

__all__ = ["DEFAULT_STALE_AFTER", "Freshness", "stale_after_for"]

DEFAULT_STALE_AFTER = 60.0
"""Seconds without a valid record after which a source (or a symbol) is
stale, unless the source says otherwise (its ``stale_after``) or polls less
often (then three poll intervals)."""

def stale_after_for(source: Any) -> float:
    """The source's ``stale_after``, else the larger of the default and
    three times its poll interval (``every`` or ``interval``)."""
    explicit = getattr(source, "stale_after", None)
    if explicit is not None:
        if not explicit > 0:
            raise ValueError(f"source {source.name}: stale_after must be > 0")
        return float(explicit)
    period = getattr(source, "every", None) or getattr(source, "interval", None) or 0.0
    try:
        return max(DEFAULT_STALE_AFTER, 3.0 * float(period))
    except (TypeError, ValueError):
        return DEFAULT_STALE_AFTER


class Freshness:
    """Ages of a source's last valid record and of each symbol's, on trio's clock."""

    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self.started = trio.current_time()
        # trio time = monotonic + offset (a real clock); for readers off the trio thread
        self._offset = self.started - time.monotonic()
        self.last: float | None = None
        self.symbols: dict[Any, float] = {}

    def seen(self, records: Sequence[Any]) -> None:
        """``records`` were sent just now."""
        now = trio.current_time()
        self.last = now
        if hasattr(records[0], "symbol"):
            symbols = self.symbols
            try:
                for r in records:  # (a plain loop: about twice as fast as map(attrgetter))
                    symbols[r.symbol] = now
            except (AttributeError, TypeError):  # a mixed batch: track those that have one
                for r in records:
                    symbol = getattr(r, "symbol", None)
                    if symbol is not None:
                        try:
                            self.symbols[symbol] = now
                        except TypeError:  # unhashable
                            pass

    def now(self) -> float:
        try:
            return trio.current_time()
        except RuntimeError:  # read from another thread (a metrics render)
            return time.monotonic() + self._offset

    def age(self, now: float | None = None) -> float:
        """Seconds since the last valid record (since the start when none yet)."""
        now = self.now() if now is None else now
        return max(now - (self.started if self.last is None else self.last), 0.0)

    def stale_symbols(self, now: float | None = None) -> int:
        """How many tracked symbols are older than ``stale_after``."""
        now = self.now() if now is None else now
        cutoff = now - self.stale_after
        return sum(1 for t in list(self.symbols.values()) if t < cutoff)

    def stalest(self, n: int = 5, now: float | None = None) -> list[tuple[Any, float]]:
        """The ``n`` symbols with the oldest last record, with their ages."""
        now = self.now() if now is None else now
        oldest = heapq.nsmallest(n, list(self.symbols.items()), key=lambda kv: kv[1])
        return [(symbol, round(now - t, 3)) for symbol, t in oldest]

    def problem(self, name: str) -> str | None:
        """The /readyz reason when the source is stale, else None."""
        age = self.age()
        if age <= self.stale_after:
            return None
        what = "no valid record yet" if self.last is None else "no valid record"
        return f"source {name}: stale ({what} for {age:.0f}s, stale_after {self.stale_after:g}s)"

    def figures(self) -> dict[str, Any]:
        """The ``freshness`` entry of a source in /status."""
        now = self.now()
        return {
            "age_seconds": round(self.age(now), 3),
            "stale_after": self.stale_after,
            "symbols": len(self.symbols),
            "stale_symbols": self.stale_symbols(now),
            "stalest": [{"symbol": s, "age_seconds": a} for s, a in self.stalest(5, now)],
        }
