"""Adaptive polling: spend an HTTP source's rate budget where prices move.

``HttpSource(schedule="adaptive", max_staleness=60)`` replaces the fixed
poll cycle (every symbol every ``every`` seconds) with a per-symbol
schedule. Each symbol has its own interval between ``every`` (the
shortest: no symbol is asked for more often) and ``max_staleness`` (the
floor: every symbol is asked for at least this often). After each answer
the interval follows what the answer showed: a change halves it, no change
stretches it by ``2 ** (hits / (1 - hits))`` (x1.26 for the default
``hits=0.25``), so a symbol settles where about a quarter of its polls find
a move, whatever its pace. The rate limiter stays the ceiling: when more
symbols are due than the limit allows, the most overdue (age over
interval) go first, so everything slows in proportion, and symbols close
to ``max_staleness`` go before all others. A batch endpoint (Binance's
``symbols=[...]``) is packed with the most due symbols, the free places
filled with the next most due.

What counts as a change: with a ``ChangeDetector`` downstream of the
source (on a path without splits), the records it emits, so its
thresholds (``rel``, ``abs``) decide what is a move worth polling for; the
runtime links the two (``link_change_feeds``). Without one, the source
compares each symbol's price with the one it last polled.

Market hours: ``calendar=Calendar(...)`` (default ``Calendar.always()``,
crypto). While the calendar says closed every symbol is polled at the
floor only (``max_staleness``), with one fetch of every symbol right
after the close (the closing prices).

Nothing starves silently: a symbol whose last answer is older than
``max_staleness`` (the API failing, a 429 pause, an open circuit) is
reported once as a gap (reason ``overdue``), and the source's freshness
(``stale_after``, default 1.5 x ``max_staleness``) counts it stale.

The schedule lives in the source object: an actor restarted by the
supervisor keeps it (and the limiter's log, so no burst); a new process
starts like fixed polling, paced by the limiter, and learns again within
a few polls of each symbol.
"""

from __future__ import annotations

import datetime as dt
import heapq
import logging
import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import trio

from ._metrics import LATENCY_BUCKETS, MetricFamily

if TYPE_CHECKING:
    from ._http import HttpSource

__all__ = ["SCHEDULE_METRICS", "AdaptiveSchedule", "Calendar", "link_change_feeds"]

log = logging.getLogger("flows.schedule")

INTERVAL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                    1800.0, 3600.0)

REQUESTS_SAVED = MetricFamily(
    "flows_source_requests_saved_total", "counter",
    "At an HTTP source with an adaptive schedule: requests fixed polling would have made "
    "(every symbol every `every` seconds, within the rate limit) less those made.",
)
POLL_INTERVAL = MetricFamily(
    "flows_source_poll_interval_seconds", "histogram",
    "At an HTTP source with an adaptive schedule: time between two answered polls of one "
    "symbol (every symbol, no symbol label).", buckets=INTERVAL_BUCKETS,
)
DETECTION_DELAY = MetricFamily(
    "flows_source_detection_delay_seconds", "histogram",
    "At an HTTP source whose exchange times its prices: from a price change at the exchange "
    "to the answer that brought it.", buckets=LATENCY_BUCKETS,
)
SCHEDULE_METRICS = (REQUESTS_SAVED, POLL_INTERVAL, DETECTION_DELAY)

_WEEKDAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}


def _clock(text: str) -> dt.time | None:
    """``"09:30"`` as a time; ``"24:00"`` is the end of the day (None)."""
    hours, _, minutes = text.partition(":")
    h, m = int(hours), int(minutes or 0)
    if (h, m) == (24, 0):
        return None
    return dt.time(h, m)


def _session(days: str | int, span: Any) -> tuple[dt.time, dt.time | None]:
    """One ``(open, close)`` pair of ``"HH:MM"`` texts as times (close None: midnight)."""
    try:
        start, end = span
        opens, closes = _clock(start), _clock(end)
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"calendar: {days!r}: {span!r} is not an (open, close) pair of times; "
                         "sessions are a list of pairs like [('09:30', '16:00')]") from None
    if opens is None or (closes is not None and closes <= opens):
        raise ValueError(f"calendar: session {start}-{end} must close after it opens")
    return opens, closes


class Calendar:
    """When a market trades: weekly sessions in a time zone, less holidays.

    ```python
    Calendar.always()                                   # crypto: never closes
    Calendar.weekdays("America/New_York", "09:30", "16:00",
                      holidays=["2026-12-25", "2027-01-01"])
    Calendar("Asia/Tokyo", {"mon-fri": [("09:00", "11:30"), ("12:30", "15:30")]})
    ```

    Parameters:
        zone: an IANA time zone name (``zoneinfo``); sessions are local times.
        sessions: weekday (``"mon"``, a range ``"mon-fri"`` or 0-6, Monday 0)
            -> ``[(open, close), ...]`` as ``"HH:MM"`` (``"24:00"``: midnight).
            ``None``: always open.
        holidays: local dates (``date`` or ``"YYYY-MM-DD"``) with no session.
    """

    def __init__(
        self,
        zone: str = "UTC",
        sessions: Mapping[str | int, Sequence[tuple[str, str]]] | None = None,
        *,
        holidays: Iterable[dt.date | str] = (),
    ) -> None:
        self.zone = ZoneInfo(zone)
        self.always_open = sessions is None
        self.sessions: dict[int, list[tuple[dt.time, dt.time | None]]] = {}
        for days, spans in (sessions or {}).items():
            for day in self._days(days):
                for span in spans:
                    opens, closes = _session(days, span)
                    self.sessions.setdefault(day, []).append((opens, closes))
        if sessions is not None and not self.sessions:
            raise ValueError("calendar: no sessions (use Calendar.always() for a market that never closes)")
        self.holidays = {h if isinstance(h, dt.date) else dt.date.fromisoformat(h) for h in holidays}

    @classmethod
    def always(cls) -> Calendar:
        """A market that never closes (crypto)."""
        return cls()

    @classmethod
    def weekdays(cls, zone: str, opens: str, closes: str, *,
                 holidays: Iterable[dt.date | str] = ()) -> Calendar:
        """One session Monday to Friday."""
        return cls(zone, {"mon-fri": [(opens, closes)]}, holidays=holidays)

    @staticmethod
    def _days(days: str | int) -> list[int]:
        if isinstance(days, int):
            if not 0 <= days <= 6:
                raise ValueError(f"calendar: weekday {days} is not 0 (Monday) to 6")
            return [days]
        first, _, last = days.lower().partition("-")
        try:
            a, b = _WEEKDAYS[first[:3]], _WEEKDAYS[(last or first)[:3]]
        except KeyError:
            raise ValueError(f"calendar: {days!r} is not a weekday or a range like 'mon-fri'") from None
        return list(range(a, b + 1)) if a <= b else [*range(a, 7), *range(b + 1)]

    def _spans(self, day: dt.date) -> list[tuple[float, float]]:
        """The sessions of local date ``day`` as epoch seconds."""
        if day in self.holidays:
            return []
        out = []
        for opens, closes in self.sessions.get(day.weekday(), ()):
            start = dt.datetime.combine(day, opens, self.zone).timestamp()
            end = (dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), self.zone)
                   if closes is None else dt.datetime.combine(day, closes, self.zone)).timestamp()
            out.append((start, end))
        return out

    def is_open(self, epoch: float) -> bool:
        """Whether the market trades at ``epoch`` (seconds)."""
        if self.always_open:
            return True
        day = dt.datetime.fromtimestamp(epoch, self.zone).date()
        return any(start <= epoch < end for start, end in self._spans(day))

    def next_change(self, epoch: float) -> float:
        """The next open or close after ``epoch`` (inf: none within two weeks)."""
        if self.always_open:
            return math.inf
        day = dt.datetime.fromtimestamp(epoch, self.zone).date()
        for offset in range(-1, 15):
            for start, end in self._spans(day + dt.timedelta(days=offset)):
                for edge in (start, end):
                    if edge > epoch:
                        return edge
        return math.inf


class AdaptiveSchedule:
    """Per-symbol poll intervals for one HTTP source (see the module docstring);
    each source needs its own (a second source given it is refused).

    ```python
    BinanceTickers(symbols=[...], every=1.0, schedule="adaptive", max_staleness=60)
    CoinbaseTickers(symbols=[...], schedule=AdaptiveSchedule(max_staleness=120, hits=0.1),
                    calendar=Calendar.weekdays("America/New_York", "09:30", "16:00"))
    ```

    Parameters:
        max_staleness: seconds; every symbol is polled at least this often.
        hits: the share of polls that should find a change (0 < hits < 1);
            lower polls moving symbols more often.
        calendar: the market's hours (default: always open).
        adapt: False keeps every interval at the source's ``every`` (a
            fixed schedule that still follows the calendar).
    """

    DOWN = 0.5
    """A poll that found a change multiplies the interval by this."""

    def __init__(
        self,
        *,
        max_staleness: float = 60.0,
        hits: float = 0.25,
        calendar: Calendar | None = None,
        adapt: bool = True,
    ) -> None:
        if not max_staleness > 0:
            raise ValueError("max_staleness must be > 0")
        if not 0 < hits < 1:
            raise ValueError("hits must be between 0 and 1")
        self.max_staleness = float(max_staleness)
        self.hits = hits
        self.up = 2.0 ** (hits / (1.0 - hits))
        self.calendar = calendar or Calendar.always()
        self.adapt = adapt
        self.detector: str | None = None
        """The ChangeDetector feeding this schedule (None: the source compares prices)."""
        self.source: HttpSource | None = None
        self._owner: weakref.ref[HttpSource] | None = None  # the source built with it
        self.symbols: list[str] = []
        self.interval: dict[str, float] = {}
        self.last: dict[str, float] = {}  # trio time of the last answer
        self.polls: dict[str, int] = {}
        self.changes: dict[str, int] = {}
        self.price: dict[str, float] = {}  # last polled price
        self.noted: dict[str, float] = {}  # last price the detector emitted
        self.alias: dict[str, str] = {}  # a record's symbol -> the configured one
        self._pending: dict[str, float] = {}  # symbol -> gap of its last poll, until the detector speaks
        self._inflight: set[str] = set()
        self._held: dict[str, float] = {}  # failed polls wait until then
        self._overdue: set[str] = set()  # reported as a gap, until answered
        self._forced: set[str] = set()  # the fetch after a close
        self._open: bool | None = None
        self._poked = trio.Event()
        self.requests = 0
        self.fixed_equivalent = 0.0
        self._saved = 0.0
        self._accounted_at: float | None = None

    # -- set up ----------------------------------------------------------------

    def claim(self, source: HttpSource) -> None:
        """Belong to ``source``: a schedule holds one source's symbols, so a
        second source given the same object is refused (it would poll the
        first one's symbols and never its own)."""
        owner = self._owner() if self._owner is not None else None
        if owner is not None and owner is not source:
            raise ValueError(f"{source.name}: this AdaptiveSchedule already schedules source "
                             f"{owner.name}; give each source its own")
        self._owner = weakref.ref(source)

    def bind(self, source: HttpSource) -> None:
        """Take the source's symbols, shortest interval and limits."""
        self.source = source
        self.min_interval = min(source.every, self.max_staleness)
        plan = source.plan(list(source.symbols))
        sizes = [len(r.symbols) for r in plan]
        self.per_request = len(source.symbols) if not sizes or 0 in sizes else max(sizes)
        self.weight = max((r.weight for r in plan), default=1.0)
        # the limiter lets no window hold more than its limit: whole requests
        per_second = min((max(math.floor(lim.limit / self.weight + 1e-9), 1) / lim.window
                          for lim in source.limiter.limits), default=math.inf)
        self.limit_rate = per_second
        self.fixed_rate = min(len(plan) / source.every, per_second)
        # a symbol this close to max_staleness goes before all others: time for
        # the requests picked before it (at most ``concurrency``) and one more
        self.guard = min(0.1 * self.max_staleness, 1.0 + (source.concurrency + 2) / per_second)
        floor = math.ceil(len(source.symbols) / self.per_request) / (self.max_staleness - self.guard)
        if floor > per_second:
            raise ValueError(
                f"{source.name}: max_staleness {self.max_staleness:g}s is too short for "
                f"{len(source.symbols)} symbols under the rate limit (the floor alone needs "
                f"{floor:.3g} requests/s, the limit allows {per_second:.3g})")
        for s in source.symbols:
            if s not in self.interval:  # a restarted actor keeps what it learned
                self.interval[s] = self.start_interval(len(source.symbols))
                self.last[s] = -math.inf
                self.polls[s] = 0
                self.changes[s] = 0
        self.symbols = list(source.symbols)

    def start_interval(self, n: int) -> float:
        """What fixed polling would give a symbol: ``every``, or the time the
        limit needs for a sweep of all ``n``."""
        sweep = math.ceil(n / self.per_request) / self.limit_rate
        return self._clamp(max(self.min_interval, sweep))

    def _clamp(self, interval: float) -> float:
        return min(max(interval, self.min_interval), self.max_staleness)

    # -- the change signal -----------------------------------------------------

    def note_change(self, symbol: str, price: float) -> None:
        """The detector downstream emitted ``price`` for ``symbol``: a change
        when it differs from the last one it emitted (not a heartbeat)."""
        s = self.alias.get(symbol, symbol)
        before = self.noted.get(s)
        self.noted[s] = price
        if before is None or before == price or s not in self.interval:
            return
        gap = self._pending.pop(s, None)
        self.changes[s] += 1
        if gap is not None and self.adapt and self._open:
            self.interval[s] = self._clamp(gap * self.DOWN)
            self._poked.set()

    def answered(self, symbols: Sequence[str], ticks: Sequence[Any], metrics: Any, wall: float) -> None:
        """A poll of ``symbols`` was answered with ``ticks`` just now."""
        now = trio.current_time()
        by_symbol = {t.symbol: t for t in ticks}
        if len(symbols) == 1 and len(by_symbol) == 1:
            (got,) = by_symbol
            if got != symbols[0]:
                self.alias[got] = symbols[0]
                by_symbol = {symbols[0]: by_symbol[got]}
        timed = getattr(self.source, "EXCHANGE_TIMES", False)
        histogram = metrics.labeled(POLL_INTERVAL)
        for s in symbols or by_symbol:
            s = self.alias.get(s, s)
            if s not in self.interval:
                continue
            before = self.last[s]
            self.last[s] = now
            self.polls[s] += 1
            self._overdue.discard(s)
            self._forced.discard(s)
            self._held.pop(s, None)
            gap = now - before
            if math.isfinite(gap):
                histogram.observe(gap)
            tick = by_symbol.get(s)
            old = self.price.get(s)
            moved = tick is not None and old is not None and tick.price != old
            if tick is not None:
                self.price[s] = tick.price
            if moved and timed and tick is not None:
                metrics.labeled(DETECTION_DELAY).observe(max(wall - tick.ts, 0.0))
            if self.detector is None and moved:
                self.changes[s] += 1
            if not (self.adapt and self._open and math.isfinite(gap) and tick is not None):
                continue
            if self.detector is None:
                self.interval[s] = self._clamp(gap * (self.DOWN if moved else self.up))
            else:  # unchanged until the detector says otherwise
                self.interval[s] = self._clamp(gap * self.up)
                self._pending[s] = gap

    # -- choosing --------------------------------------------------------------

    def _candidates(self, now: float) -> list[str]:
        parked = self.source.parked if self.source is not None else {}
        held, inflight = self._held, self._inflight
        return [s for s in self.symbols
                if s not in inflight and not (s in parked and parked[s] > now)
                and held.get(s, -math.inf) <= now]

    def _wait(self, s: str) -> float:
        """Seconds from ``s``'s last answer to when it is due."""
        if s in self._forced:
            return 0.0
        floor = self.max_staleness - self.guard
        return floor if not self._open else min(self.interval[s], floor)

    def _key(self, s: str, now: float) -> tuple[int, float]:
        """Sort key, most due first: symbols near the floor (oldest first),
        then by age over interval."""
        last = self.last[s]
        age = now - last
        if s in self._forced or age >= self.max_staleness - self.guard:
            return (0, last)
        return (1, -age / self._wait(s))

    def next_due(self, now: float) -> float:
        """Trio time at which the next symbol is due."""
        candidates = self._candidates(now)
        if not candidates:
            return now + self.min_interval
        return min(self.last[s] + self._wait(s) for s in candidates)

    def pick(self, now: float) -> list[str]:
        """The symbols for the next request: the most due first, the batch
        filled up with the next most due; empty when none is due."""
        candidates = self._candidates(now)
        if not candidates:
            return []
        ranked = heapq.nsmallest(self.per_request, candidates, key=lambda s: self._key(s, now))
        first = ranked[0]
        if self.last[first] + self._wait(first) > now:  # (the arithmetic of next_due)
            return []
        return ranked

    # -- running ----------------------------------------------------------------

    def _market(self, wall: float) -> None:
        """Follow the calendar: on a close, fetch every symbol once."""
        is_open = self.calendar.is_open(wall)
        if self._open is True and not is_open:
            self._forced = set(self.symbols)
            log.info("source %s: market closed; one fetch of every symbol, then every %gs",
                     self.source.name if self.source else "?", self.max_staleness)
        self._open = is_open

    def _report_overdue(self, now: float, wall: float, outbox: Any) -> None:
        late = [s for s in self._unreported() if now - self.last[s] > self.max_staleness]
        if late:
            self._overdue.update(late)
            since = min(self.last[s] for s in late)
            outbox.gap(late, wall - (now - since), wall, "overdue")

    def _next_overdue(self, now: float) -> float:
        """When the next symbol not yet reported overdue becomes overdue."""
        ahead = min((self.last[s] for s in self._unreported()), default=math.inf)
        return max(ahead + self.max_staleness + 1e-3, now + 0.01)

    def _unreported(self) -> list[str]:
        """Symbols polled before, not parked, not reported overdue yet."""
        parked = self.source.parked if self.source is not None else {}
        return [s for s in self.symbols if s not in self._overdue and s not in parked
                and math.isfinite(self.last[s])]

    def _account(self, now: float, metrics: Any) -> None:
        """Move ``flows_source_requests_saved_total`` up to fixed polling's count less ours."""
        if self._accounted_at is not None:
            self.fixed_equivalent += (now - self._accounted_at) * self.fixed_rate
        self._accounted_at = now
        saved = self.fixed_equivalent - self.requests
        if saved > self._saved:
            metrics.labeled(REQUESTS_SAVED).inc(saved - self._saved)
            self._saved = saved

    async def serve(self, source: HttpSource, client: Any, outbox: Any, state: Any) -> None:
        """Poll ``source``'s symbols by this schedule until cancelled."""
        self.bind(source)
        metrics = outbox.metrics
        metrics.register(*SCHEDULE_METRICS)
        wall_clock = source._wall
        assert wall_clock is not None, "serve() runs inside HttpSource.run()"
        slots = trio.Semaphore(source.concurrency)
        self._accounted_at = None
        async with trio.open_nursery() as nursery:
            while True:
                if await source._standing_by():
                    continue
                now, wall = trio.current_time(), wall_clock.now()
                self._market(wall)
                self._report_overdue(now, wall, outbox)
                self._account(now, metrics)
                due = self.next_due(now)
                if due > now:
                    change = self.calendar.next_change(wall) - wall + now
                    with trio.move_on_at(min(due, change, self._next_overdue(now))):
                        await self._poked.wait()
                    self._poked = trio.Event()
                    continue
                await slots.acquire()
                ready = getattr(source.limiter, "ready_at", None)
                if ready is not None:
                    await trio.sleep_until(ready(self.weight))
                batch = self.pick(trio.current_time())
                if not batch:  # (the rounding of times can differ by a hair)
                    slots.release()
                    await trio.sleep_until(max(self.next_due(now), now + 1e-3))
                    continue
                requests = source._plan_with_probes(batch)
                self._inflight.update(batch)
                self.requests += len(requests)
                nursery.start_soon(self._poll, source, client, requests, batch, outbox, state, slots)

    async def _poll(self, source: HttpSource, client: Any, requests: list[Any], batch: list[str],
                    outbox: Any, state: Any, slots: trio.Semaphore) -> None:
        sent = trio.current_time()
        try:
            for request in requests:
                await source._poll(client, request, outbox, state, None)
        finally:
            self._inflight.difference_update(batch)
            now = trio.current_time()
            for s in batch:  # not answered (failed for good, or parked): tried again later
                if self.last[s] < sent:
                    self._held[s] = now + max(self.min_interval,
                                              min(self.interval[s], self.max_staleness / 4))
            slots.release()
            self._poked.set()

    # -- reading ---------------------------------------------------------------

    def figures(self, n: int = 5) -> dict[str, Any]:
        """The ``schedule`` entry of a source in /status."""
        def row(s: str) -> dict[str, Any]:
            return {"symbol": s, "interval_seconds": round(self.interval[s], 3),
                    "polls": self.polls[s], "changes": self.changes[s]}

        order = sorted(self.symbols, key=lambda s: (self.interval[s], -self.polls[s]))
        return {
            "mode": "adaptive" if self.adapt else "fixed",
            "market_open": self._open,
            "max_staleness": self.max_staleness,
            "min_interval": getattr(self, "min_interval", None),
            "change_signal": f"detector {self.detector}" if self.detector else "source",
            "requests": self.requests,
            "requests_saved": round(max(self.fixed_equivalent - self.requests, 0.0)),
            "most_polled": [row(s) for s in order[:n]],
            "least_polled": [row(s) for s in reversed(order[-n:])],
        }


def _upstream_sources(flow: Any, name: str) -> list[Any]:
    """The sources whose every record reaches ``name`` (paths without a split or route)."""
    sources = {a.name: a for a in flow.sources}
    found, todo, seen = [], [name], set()
    while todo:
        for tap in flow.inputs(todo.pop()):
            if tap.chain or tap.producer in seen:
                continue
            seen.add(tap.producer)
            if tap.producer in sources:
                found.append(sources[tap.producer])
            else:
                todo.append(tap.producer)
    return found


def link_change_feeds(flow: Any) -> None:
    """Let each ChangeDetector tell the adaptive schedules of the sources
    upstream of it which symbols moved (called by the runtime at start)."""
    for stage in flow.stages:
        watch = getattr(stage, "watch_changes", None)
        if not callable(watch):
            continue
        for source in _upstream_sources(flow, stage.name):
            schedule = getattr(source, "schedule", None)
            if isinstance(schedule, AdaptiveSchedule) and schedule.detector in (None, stage.name):
                watch(source.name, schedule)
                schedule.detector = stage.name
