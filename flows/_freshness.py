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
import math
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


_RUN_MIN = 16
"""Batches shorter than this are tracked record by record."""
_RUNS_MAX = 1024
"""Batch shapes (length, first and last symbol) remembered, at most."""
_RUN_SYMBOLS_MAX = 1 << 17
"""Symbols held by remembered runs, at most (8 bytes each)."""
_NEW_SHAPES_MAX = 64
"""After this many batches in a row of shapes not seen before ..."""
_PAUSE = 1024
"""... runs are not looked for in this many batches (a source that never
repeats itself pays for no lookups)."""
_GRAIN = 1.0
"""Seconds between full comparisons of a run (at most; ``stale_after / 10``
when that is less): a symbol's age may read this much too old, never too young."""
_PROBES = 8
"""Positions of a run probed between full comparisons, one per batch in
turn (a probe is a record the batch's sender may not have touched: in a
benchmark of pre-made batches, a cache miss each)."""
_STRICT = 64
"""A run found changed is compared in full for this many batches (twice as
many each time it is found changed again, up to ``_STRICT_MAX``)."""
_STRICT_MAX = 1 << 16

# a remembered run: [symbols, when they were last seen (a full comparison
# that matched), when that was stored in ``symbols``, when the last full
# comparison was, probe positions, the symbols there, batches still to
# compare in full, how many the next change costs, the position to probe next]
_SYMBOLS, _SEEN, _STORED, _AT, _PROBES_AT, _PROBED, _STRICTLY, _NEXT_STRICT, _PROBE = range(9)


class Freshness:
    """Ages of a source's last valid record and of each symbol's, on trio's clock.

    Per symbol it keeps the time of the last batch that held it. A source
    that sends the same symbols in the same order again and again (a
    market's tick, a poller's universe when its symbols are the same
    objects each time) pays for that once per batch, not per record: a
    batch whose symbols repeat a remembered *run* (the symbols of an
    earlier batch with the same length, first and last symbol, compared in
    full) only stamps the run, and the symbol times are read through the
    runs (``times``). Other batches store a time per record.

    Between full comparisons, at most ``grain`` seconds apart, a repeat is
    recognised by its shape and a probed symbol (one of eight positions,
    in turn), and counts as seen at
    the last full comparison: an age may read up to ``grain`` too old, never
    too young (a dead symbol never looks alive). A run that changed is
    compared in full again for a while. A batch that differs from its run
    only away from the probed symbols passes for a repeat: a symbol held
    only by such batches keeps its older time until a full comparison meets
    one of them (batches that keep changing there make that bound longer
    than ``grain``).
    """

    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self.grain = min(_GRAIN, stale_after / 10)
        self.started = trio.current_time()
        # trio time = monotonic + offset (a real clock); for readers off the trio thread
        self._offset = self.started - time.monotonic()
        self.last: float | None = None
        self.symbols: dict[Any, float] = {}
        """Every symbol seen -> when it was last stored; a symbol of a run
        may have been seen since (``times`` has the latest)."""
        # (length, first, last symbol) -> None (seen once) or a run (above)
        self._runs: dict[tuple[int, Any, Any], list[Any] | None] = {}
        self._run_symbols = 0
        self._new_shapes = 0  # batches in a row whose shape was new
        self._pause = 0  # batches still to track record by record

    def seen(self, records: Sequence[Any]) -> None:
        """``records`` were sent just now."""
        now = trio.current_time()
        self.last = now
        if not hasattr(records[0], "symbol"):
            return
        if self._pause:
            self._pause -= 1
        elif len(records) >= _RUN_MIN:
            try:
                shape = (len(records), records[0].symbol, records[-1].symbol)
                run: Any = self._runs.get(shape, False)
            except (AttributeError, TypeError):  # mixed, or unhashable
                self._store_mixed(records, now)
                return
            if run is not False:  # this shape was seen before: compare the symbols
                self._new_shapes = 0
                if run is not None and self._probed(run, records, now):
                    return
                self._compare(shape, run, records, now)
                return
            self._runs[shape] = None
            if len(self._runs) > _RUNS_MAX:
                self._forget_runs()
            self._new_shapes += 1
            if self._new_shapes >= _NEW_SHAPES_MAX:
                self._new_shapes, self._pause = 0, _PAUSE
        self._store(records, now)

    def _probed(self, run: list[Any], records: Sequence[Any], now: float) -> bool:
        """Within ``grain`` of the run's last full comparison: do the probed
        symbols match (the batch then counts as seen at that comparison)?"""
        if run[_STRICTLY] or now - run[_AT] >= self.grain:
            return False
        try:
            probe = run[_PROBE]
            run[_PROBE] = (probe + 1) % len(run[_PROBES_AT])
            return bool(records[run[_PROBES_AT][probe]].symbol == run[_PROBED][probe])
        except AttributeError:
            return False

    def _compare(self, shape: tuple[int, Any, Any], run: list[Any] | None,
                 records: Sequence[Any], now: float) -> None:
        """Compare the batch with its shape's run in full: stamp the run, or
        store the batch record by record and make it the run."""
        try:
            symbols = [r.symbol for r in records]
        except AttributeError:
            self._store_mixed(records, now)
            return
        if run is not None and run[_SYMBOLS] == symbols:
            run[_SEEN] = run[_AT] = now
            if run[_STRICTLY]:
                run[_STRICTLY] -= 1
            return
        if self._store(records, now):
            strict = 0 if run is None else min(run[_NEXT_STRICT], _STRICT_MAX)
            self._remember(shape, symbols, now, strict)

    def _store(self, records: Sequence[Any], now: float) -> bool:
        """Store ``now`` for the symbol of every record; False when some
        record has none or an unhashable one (those are left out)."""
        symbols = self.symbols
        try:
            for r in records:  # (a plain loop: about twice as fast as map(attrgetter))
                symbols[r.symbol] = now
        except (AttributeError, TypeError):  # a mixed batch: track those that have one
            self._store_mixed(records, now)
            return False
        return True

    def _store_mixed(self, records: Sequence[Any], now: float) -> None:
        for r in records:
            symbol = getattr(r, "symbol", None)
            if symbol is not None:
                try:
                    self.symbols[symbol] = now
                except TypeError:  # unhashable
                    pass

    def _remember(self, shape: tuple[int, Any, Any], symbols: list[Any], now: float,
                  strict: int) -> None:
        """Remember ``symbols`` (just stored at ``now``) as the run of ``shape``."""
        old = self._runs.get(shape)
        if old is not None:
            self._run_symbols -= len(old[_SYMBOLS])
            self._settle(old)
        if self._run_symbols + len(symbols) > _RUN_SYMBOLS_MAX:
            self._forget_runs()
            if len(symbols) > _RUN_SYMBOLS_MAX:
                return
        probes = tuple(range(1, len(symbols) - 1, max(1, len(symbols) // _PROBES)))
        self._runs[shape] = [symbols, now, now, now, probes, [symbols[i] for i in probes],
                             strict, 2 * strict or _STRICT, 0]
        self._run_symbols += len(symbols)

    def _settle(self, run: list[Any]) -> None:
        """Store a run's last-seen time in ``symbols`` (before it is dropped)."""
        symbols, at, stored = run[_SYMBOLS], run[_SEEN], run[_STORED]
        if at > stored:
            times = self.symbols
            for s in symbols:
                if times.get(s, -math.inf) < at:
                    times[s] = at
            run[_STORED] = at

    def _forget_runs(self) -> None:
        for run in list(self._runs.values()):
            if run is not None:
                self._settle(run)
        self._runs = {}
        self._run_symbols = 0

    def times(self) -> dict[Any, float]:
        """A copy of symbol -> last-seen time (safe to call from another thread)."""
        runs = [(run[_SYMBOLS], run[_SEEN]) for run in list(self._runs.values())
                if run is not None and run[_SEEN] > run[_STORED]]
        times = self.symbols.copy()  # (after the runs: a run is settled before it is dropped)
        for symbols, at in runs:
            for s in symbols:
                if times.get(s, -math.inf) < at:
                    times[s] = at
        return times

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
        return self._stale(self.times(), now)

    def _stale(self, times: dict[Any, float], now: float) -> int:
        cutoff = now - self.stale_after
        return sum(1 for t in times.values() if t < cutoff)

    def stalest(self, n: int = 5, now: float | None = None) -> list[tuple[Any, float]]:
        """The ``n`` symbols with the oldest last record, with their ages."""
        now = self.now() if now is None else now
        return self._stalest(self.times(), n, now)

    @staticmethod
    def _stalest(times: dict[Any, float], n: int, now: float) -> list[tuple[Any, float]]:
        oldest = heapq.nsmallest(n, times.items(), key=lambda kv: kv[1])
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
        times = self.times()
        return {
            "age_seconds": round(self.age(now), 3),
            "stale_after": self.stale_after,
            "symbols": len(times),
            "stale_symbols": self._stale(times, now),
            "stalest": [{"symbol": s, "age_seconds": a} for s, a in self._stalest(times, 5, now)],
        }
