"""Keyed event-time windows, and OHLCV candles built on them.

A window stage groups records by key (default: source and symbol) into
windows of event time (``ts``): tumbling (``every`` seconds, back to back)
or hopping (``every`` seconds long, one starting every ``step`` seconds).
A window [start, start + every) closes when its key's watermark passes its
end, and its result is emitted then.

The watermark of a key is its latest event time minus ``lateness``, and it
also runs on with the wall clock (trio's clock) while the key is idle: a
key whose latest record has time T, seen at clock time c, has the
watermark ``T + max(0, now - c) - lateness``. So a window closes within
``lateness + tick`` seconds (plus the source's delay) of its end even when
no record follows. The stage checks idle keys every ``tick`` seconds and
the keys a batch moved after each batch. An idle key's clock never runs
past the stream's (its last record's time, run on with the clock while
the whole stream is idle), and nothing is closed by the clock while
batches wait in the inbox (the stage is behind, not idle).

A record whose every window has already closed is late: counted as
discarded with reason ``late``, never merged into a later window, and with
``late="emit"`` sent on unchanged, on the stage's output stream beside the
window results (split them off with ``stream.split``).

Acknowledgements and restarts: an input batch's ack hooks are held until
every window its records went into has been emitted and acknowledged
downstream (and, with a ``checkpoint``, saved as done). The checkpoint
holds, per key, where its emitted and acknowledged windows end (plus the
last close, for ``empty="carry"``), never open windows: after a crash an
at-least-once source replays every record of the windows still open, the
stage rebuilds them exactly, and records of windows already stored are
dropped as late. So a candle is never emitted twice with different values
and none is lost.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Hashable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import msgspec
import trio

from ._actors import RunContext
from ._channels import Inbox, Outbox
from ._checkpoint import write_atomic
from ._log import DropLog
from ._metrics import ComponentMetrics
from ._records import Batch, Candle

__all__ = ["Candles", "Window"]

log = logging.getLogger("flows.windows")

_RANK = {"skipped": 0, "written": 1, "dropped": 2, "failed": 3}
_SETTLED = frozenset(("written", "skipped", "dropped"))
_MAX_CARRY = 10_000
"""Most carried (empty) candles one key emits in one pass (a bogus time jump)."""
_CHECKPOINT_KIND = "flows.Window"
_CHECKPOINT_VERSION = 1
_MAX_CHECKPOINT = 1 << 30

# Per key state, a list (the hot loop indexes it):
_CLOSED = 0  # start of the earliest window not closed yet (all before it are emitted)
_MAX = 1  # latest event time seen (the Candles loop keeps it in the newest window)
_SEEN = 2  # trio clock time at which _MAX was seen
_DUE = 3  # the _MAX at which the earliest open window closes (inf: none, or queued)
_WINS = 4  # start -> window entry
_LAST = 5  # (close, last_ts, had volume) of the last non-empty window, for carry
_KEY = 6
_NEWEST = 7  # start of the newest window opened

# A window entry is a list: [last hold, holds, ...aggregate]; a candle's
# aggregate is open, high, low, close, volume, count, price*size, first_ts,
# last_ts, the clock time last_ts was seen and (in a key's newest window)
# the last_ts at which the key's oldest window is due.
_O, _H, _L, _C, _V, _N, _PV, _FT, _LT, _LS, _DUE_AT = range(2, 13)


class _Checkpoint(msgspec.Struct, frozen=True):
    version: int
    kind: str
    entries: list[tuple[Any, float, Any]]  # key, start of its first window not stored, last close


def _hashable(key: Any) -> Hashable:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _tick_key(record: Any) -> Hashable:
    return (record.source, record.symbol)


def _tick_time(record: Any) -> float:
    return record.ts


class _Hold:
    """An input batch's ack hooks, held until every window it fed is done."""

    __slots__ = ("hooks", "left", "worst")

    def __init__(self, hooks: tuple[Any, ...]) -> None:
        self.hooks, self.left, self.worst = hooks, 0, "skipped"

    def done(self, outcome: str) -> None:
        if _RANK.get(outcome, 3) > _RANK[self.worst]:
            self.worst = outcome
        self.left -= 1
        if self.left == 0:
            hooks, self.hooks = self.hooks, ()
            for hook in hooks:
                hook(self.worst)


def _release_all(holds: list[_Hold], outcome: str) -> None:
    for hold in holds:
        hold.done(outcome)


class Window:
    """A stage that aggregates records per key over windows of event time.

    ```python
    Window(every=60, lateness=2.0, aggregate=lambda key, start, width, records: ...)
    ```

    Parameters:
        every: the window's width in seconds.
        step: a hopping window starts every ``step`` seconds (``every``
            must be a multiple of it); ``None``: tumbling (``step = every``).
        lateness: seconds a record may come after the latest one of its
            key and still count; the watermark is the latest time minus this.
        aggregate: ``(key, start, width, records) -> record | None``, called
            when a window closes with its records in arrival order.
        key: function of a record giving its key (default fits ``Tick`` and
            ``Trade``: (source, symbol)). Keys must be msgpack-encodable for
            checkpoints.
        time: function of a record giving its time (default: ts).
        late: ``"drop"`` (default) or ``"emit"``: late records go on,
            unchanged, on the output stream. Both count them ``late``.
        tick: seconds between checks for windows that the wall clock closes.
        max_keys: most keys kept; the least recently seen is forgotten
            (with its open windows, counted ``evicted``).
        final: what the stage does with open windows when its input ends:
            ``"emit"`` them, ``"keep"`` them (not emitted: a checkpointed
            restart replays their records) or ``"auto"``: keep with a
            checkpoint, else emit.
        checkpoint: a file holding what was emitted and acknowledged,
            restored at start (``--fresh`` ignores it).
        checkpoint_every: seconds between saves of ``checkpoint``.
        name: the stage's name.
    """

    def __init__(
        self,
        every: float = 60.0,
        *,
        step: float | None = None,
        lateness: float = 0.0,
        aggregate: Callable[[Hashable, float, float, list[Any]], Any] | None = None,
        key: Callable[[Any], Hashable] = _tick_key,
        time: Callable[[Any], float] = _tick_time,
        late: Literal["drop", "emit"] = "drop",
        tick: float = 1.0,
        max_keys: int = 100_000,
        final: Literal["auto", "emit", "keep"] = "auto",
        checkpoint: str | Path | None = None,
        checkpoint_every: float = 5.0,
        name: str = "window",
    ) -> None:
        step = every if step is None else step
        if not (every > 0 and math.isfinite(every)):
            raise ValueError(f"every must be a positive number of seconds, got {every!r}")
        if not (step > 0 and abs(every / step - round(every / step)) < 1e-9):
            raise ValueError(f"every ({every!r}) must be a positive multiple of step ({step!r})")
        if not (lateness >= 0 and math.isfinite(lateness)):
            raise ValueError(f"lateness must be >= 0, got {lateness!r}")
        if late not in ("drop", "emit"):
            raise ValueError(f"late must be 'drop' or 'emit', got {late!r}")
        if final not in ("auto", "emit", "keep"):
            raise ValueError(f"final must be 'auto', 'emit' or 'keep', got {final!r}")
        if not tick > 0:
            raise ValueError("tick must be > 0")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        if not checkpoint_every > 0:
            raise ValueError("checkpoint_every must be > 0")
        if aggregate is None and type(self) is Window:
            raise ValueError("Window needs an aggregate function (or use Candles)")
        self.every, self.step, self.lateness = float(every), float(step), float(lateness)
        self.aggregate = aggregate
        self.key, self.time = key, time
        self.late, self.tick, self.max_keys, self.final = late, tick, max_keys, final
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.checkpoint_every = checkpoint_every
        self.name = name
        self.carry = False
        self._keys: dict[Hashable, list[Any]] = {}
        self._active: dict[Hashable, list[Any]] = {}  # keys with open windows (or carrying)
        self._due: list[list[Any]] = []
        self._top, self._top_seen = -math.inf, 0.0  # the stream's last record time, and when
        self._open: dict[Hashable, list[Any]] | None = None  # Candles: (source, symbol, start) -> entry
        self._late_out: list[Any] = []
        self._late_holds: list[_Hold] = []
        self.late_count = self.invalid_count = self.evicted_count = 0
        # acknowledged state, for the checkpoint: key -> [closed, last]
        self.acked: dict[Hashable, list[Any]] = {}
        self._unacked: deque[list[Any]] = deque()  # [[(key, start, last)...], holds, outcome]
        self._to_release: list[tuple[_Hold, str]] = []
        self._failed: dict[Hashable, float] = {}  # key -> start of its first window a sink gave up on
        self._dirty = False
        self._closing = False
        self._fresh = False
        self._restored = False
        self._drops = DropLog(f"flows.stage.{name}")

    # -- windows -------------------------------------------------------------

    def _first_open(self, ts: float) -> float:
        """Start of the earliest window a new key must keep open for a
        record at ``ts``: the first containing ``ts - lateness``."""
        step = self.step
        t = ts - self.lateness
        # ``//`` as in ``_fold`` (which files ``ts`` under ``ts // step``):
        # ``math.floor(t / step)`` can round across a boundary when ``step``
        # is not exact in binary (0.1), making a key's first record late
        return (t // step - round(self.every / step) + 1) * step

    def _new_key(self, k: Hashable, ts: float, now: float) -> list[Any]:
        keys = self._keys
        if len(keys) >= self.max_keys:
            self._evict()
        ks = [self._first_open(ts), -math.inf, now, math.inf, {}, None, k, -math.inf]
        acked = self.acked.get(k)
        if acked is not None:  # seen before (evicted): windows before `closed` are stored
            ks[_CLOSED], ks[_LAST] = max(acked[0], ks[_CLOSED]), acked[1]
        keys[k] = ks
        if self.carry and ks[_LAST] is not None:
            self._activate(ks)
        return ks

    def _evict(self) -> None:
        """Forget the least recently seen eighth of the keys (at least one)."""
        keys = self._keys
        n = max(1, len(keys) // 8)
        clock = self._clock
        oldest = sorted(keys.values(), key=lambda ks: clock(ks)[1])[:n]
        for ks in oldest:
            k = ks[_KEY]
            del keys[k]
            self._active.pop(k, None)
            wins, ks[_WINS] = ks[_WINS], {}
            for start, entry in wins.items():
                if self._open is not None:
                    self._open.pop((*k, start), None)
                for hold in entry[1] or ():
                    hold.done("dropped")
        self.evicted_count += len(oldest)

    def _activate(self, ks: list[Any]) -> None:
        self._active[ks[_KEY]] = ks
        self._park(ks, ks[_CLOSED] + self.every)

    def process(self, records: list[Any], now: float, hooks: tuple[Any, ...] = ()) -> _Hold | None:
        """Fold ``records`` into the windows (``now``: trio's clock). Returns
        the hold of ``hooks`` (None when there are none): it fires when every
        window the records went into is done. Call ``close_due`` after."""
        hold = _Hold(hooks) if hooks else None
        self._fold(records, now, hold)
        if records:  # the stream's progress: the time of its last record
            try:
                t = float(self.time(records[-1]))
            except (TypeError, ValueError, AttributeError):
                t = -math.inf
            if self._top < t < math.inf:
                self._top, self._top_seen = t, now
        return hold

    def _stream_clock(self, now: float) -> float:
        """How far the stream's event time has got by clock time ``now``:
        its last record's time, run on with the clock while it is idle. No
        key's idle clock runs past it (a replay slowed down by its sinks
        must not close windows early)."""
        return self._top + (now - self._top_seen if now > self._top_seen else 0.0)

    def _fold(self, records: list[Any], now: float, hold: _Hold | None) -> None:
        """The generic loop: any record type, tumbling or hopping."""
        keys, key_of, time_of = self._keys, self.key, self.time
        step, every, lateness = self.step, self.every, self.lateness
        hops = round(every / step)
        for r in records:
            ts = time_of(r)
            try:
                valid = -math.inf < ts < math.inf and self._valid(r)
            except TypeError:
                valid = False
            if not valid:
                self._invalid(r)
                continue
            k = key_of(r)
            ks = keys.get(k)
            if ks is None:
                ks = self._new_key(k, ts, now)
            n = ts // step  # the latest window holding ts starts at n * step
            closed = ks[_CLOSED]
            if n * step < closed:
                self._late(r, hold)
                continue
            if ts > ks[_MAX]:
                ks[_MAX], ks[_SEEN] = ts, now
                if ts >= ks[_DUE]:
                    self._due.append(ks)
                    ks[_DUE] = math.inf
            wins = ks[_WINS]
            for i in range(hops):
                start = (n - i) * step
                if start < closed:
                    break
                entry = wins.get(start)
                if entry is None:
                    if not wins:
                        self._active[k] = ks
                    entry = wins[start] = self._create(r, ts, now)
                    if self._open is not None:
                        self._open[(*k, start)] = entry  # type: ignore[misc]  # Candles' keys are tuples
                    ks[_NEWEST] = max(ks[_NEWEST], start)
                    if hold is not None:
                        entry[0], entry[1] = hold, [hold]
                        hold.left += 1
                    due = start + every + lateness
                    if due < ks[_DUE]:
                        ks[_DUE] = due
                        if ks[_MAX] >= due:
                            self._due.append(ks)
                            ks[_DUE] = math.inf
                    continue
                self._add(entry, r, ts, now)
                if entry[0] is not hold and hold is not None:
                    self._hold(entry, hold)

    @staticmethod
    def _hold(entry: list[Any], hold: _Hold) -> None:
        """Make ``entry``'s window hold ``hold`` (once per batch)."""
        entry[0] = hold
        holds = entry[1]
        if holds is None:
            entry[1] = [hold]
        else:
            holds.append(hold)
        hold.left += 1

    def _valid(self, record: Any) -> bool:
        return True

    def _invalid(self, record: Any) -> None:
        self.invalid_count += 1
        self._drops.drop("invalid", f"{record!r}: not a finite time, price or size")

    def _late(self, record: Any, hold: _Hold | None) -> None:
        self.late_count += 1
        if self.late == "emit":
            self._late_out.append(record)
            if hold is not None and (not self._late_holds or self._late_holds[-1] is not hold):
                self._late_holds.append(hold)
                hold.left += 1

    def _create(self, record: Any, ts: float, now: float) -> list[Any]:
        return [None, None, [record]]

    def _add(self, entry: list[Any], record: Any, ts: float, now: float) -> None:
        entry[2].append(record)

    def _result(self, k: Hashable, start: float, entry: list[Any]) -> Any:
        return self.aggregate(k, start, self.every, entry[2])  # type: ignore[misc]

    def _carried(self, k: Hashable, start: float, last: Any) -> Any:
        return None

    def _last_of(self, entry: list[Any]) -> Any:
        return None

    def _clock(self, ks: list[Any]) -> tuple[float, float]:
        """(latest event time, clock time it was seen) of a key."""
        return ks[_MAX], ks[_SEEN]

    def close_due(self, now: float, *, everything: bool = False, idle: bool = False) -> list[tuple[Any, ...]]:
        """Close the windows whose watermark has passed: those of the keys
        the last batches moved, or (``idle``) of every key with open
        windows, or (``everything``) all open windows. Returns the closed
        windows as ``(key, start, last, result, holds)``."""
        out: list[tuple[Any, ...]] = []
        lateness, every, carry, clock = self.lateness, self.every, self.carry, self._clock
        cap = self._stream_clock(now)
        todo = self._due
        self._due = []
        if everything or idle:
            todo = list(self._active.values())
        for ks in todo:  # (a key queued twice finds nothing due the second time)
            latest, at = ks[_MAX], ks[_SEEN] = clock(ks)
            wins = ks[_WINS]
            if everything:
                wm = max(wins) + every if wins else -math.inf
            else:
                wm = latest + (now - at if now > at else 0.0)
                if wm > cap:
                    wm = max(latest, cap)
                wm -= lateness
            if carry and ks[_LAST] is not None:
                end = ks[_CLOSED] + every
            else:
                end = min(wins) + every if wins else math.inf
            if end <= wm:
                end = self._close_key(ks, wm, out)
            self._park(ks, end)
        return out

    def _park(self, ks: list[Any], end: float) -> None:
        """Note when ``ks``'s oldest open window (ending at ``end``) is due."""
        ks[_DUE] = end + self.lateness
        if end == math.inf:
            self._active.pop(ks[_KEY], None)

    def _close_key(self, ks: list[Any], wm: float, out: list[tuple[Any, ...]]) -> float:
        """Close ``ks``'s windows that end at or before ``wm``, in order;
        returns the end of its oldest window still open (inf: none)."""
        every, step, k, carry, opened = self.every, self.step, ks[_KEY], self.carry, self._open
        result, append = self._result, out.append
        wins = ks[_WINS]
        closed = ks[_CLOSED]
        carried = 0
        while closed + every <= wm:
            entry = wins.pop(closed, None)
            if entry is not None:
                if opened is not None:
                    del opened[(*k, closed)]
                if carry:
                    ks[_LAST] = self._last_of(entry)
                append((k, closed, ks[_LAST], result(k, closed, entry), entry[1]))
            elif carry and ks[_LAST] is not None and carried < _MAX_CARRY:
                carried += 1
                append((k, closed, ks[_LAST], self._carried(k, closed, ks[_LAST]), None))
            else:  # nothing to emit: on to the next open window, or past the watermark
                jump = ((wm - every) // step + 1) * step
                closed = min(min(wins), jump) if wins else jump
                continue
            closed = (round(closed / step) + 1) * step
        ks[_CLOSED] = closed
        if not wins:
            ks[_WINS] = {}  # a dict emptied by pops keeps its table
            return closed + every if carry and ks[_LAST] is not None else math.inf
        return closed + every if carry and ks[_LAST] is not None else min(wins) + every

    def push(self, records: list[Any], now: float = 0.0) -> list[Any]:
        """Outside a flow: fold ``records`` in at clock time ``now`` and
        return the results of the windows that closed (then, with
        ``late="emit"``, the late records)."""
        self.process(records, now)
        out = [c[3] for c in self.close_due(now) if c[3] is not None]
        late, self._late_out, self._late_holds = self._late_out, [], []
        return out + late

    def advance(self, now: float) -> list[Any]:
        """Outside a flow: the results of the windows the clock closed by ``now``."""
        return [c[3] for c in self.close_due(now, idle=True) if c[3] is not None]

    def flush(self) -> list[Any]:
        """Outside a flow: close every open window; returns the results."""
        return [c[3] for c in self.close_due(math.inf, everything=True) if c[3] is not None]

    # -- running ---------------------------------------------------------------

    def setup(self, context: RunContext) -> None:
        self._fresh = context.fresh

    @property
    def open_windows(self) -> int:
        """Windows open now, over all keys."""
        return sum(len(ks[_WINS]) for ks in self._keys.values())

    async def run(self, inbox: Inbox, outbox: Outbox) -> None:
        metrics = inbox.metrics
        if not self._restored and self.checkpoint is not None:
            self._restored = True
            if self._fresh:
                log.info("window %s: fresh run: ignoring checkpoint %s", self.name, self.checkpoint)
            else:
                await trio.to_thread.run_sync(self.restore)
                now = self._top_seen = trio.current_time()
                for ks in self._keys.values():
                    ks[_SEEN] = now
        self._closing = False
        try:
            async with trio.open_nursery() as nursery:
                stop = trio.Event()
                nursery.start_soon(self._clock_loop, stop, inbox, outbox)
                try:
                    async for batch in inbox:
                        await self._take(batch, outbox, metrics)
                finally:
                    stop.set()  # the clock loop ends after its current send (never cut short)
            if self.final == "emit" or (self.final == "auto" and self.checkpoint is None):
                await self._emit(self.close_due(math.inf, everything=True), None, outbox)
        finally:
            self._closing = True
            if not self._unacked:
                with trio.CancelScope(shield=True):
                    await self._save(metrics)
            # else the last ack to come writes the final checkpoint

    async def _take(self, batch: Batch, outbox: Outbox, metrics: ComponentMetrics) -> None:
        """Fold one input batch in and emit the windows it closed."""
        now = trio.current_time()
        before = (self.late_count, self.invalid_count, self.evicted_count)
        hold = self.process(batch.records, now, batch.acks)
        batch.acks = ()
        if hold is not None and hold.left == 0:  # every record late or invalid
            hold.left = 1
            hold.done("skipped")
        self._count(metrics, before)
        await self._emit(self.close_due(now), batch.created, outbox)

    async def _clock_loop(self, stop: trio.Event, inbox: Inbox, outbox: Outbox) -> None:
        """Every ``tick`` seconds: close the windows of idle keys (unless
        batches are waiting: then the stage is behind, not idle), and save
        the checkpoint when it is due."""
        metrics = inbox.metrics
        next_save = trio.current_time() + self.checkpoint_every
        while not stop.is_set():
            with trio.move_on_after(self.tick):
                await stop.wait()
            if stop.is_set():
                return
            now = trio.current_time()
            if not inbox.buffer()[0]:
                await self._emit(self.close_due(now, idle=True), None, outbox)
            if self.checkpoint is not None and now >= next_save:
                await self._save(metrics)
                next_save = trio.current_time() + self.checkpoint_every

    def _count(self, metrics: ComponentMetrics, before: tuple[int, int, int]) -> None:
        late, invalid, evicted = (self.late_count - before[0], self.invalid_count - before[1],
                                  self.evicted_count - before[2])
        if late:
            metrics.discarded("late", late)
        if invalid:
            metrics.discarded("invalid", invalid)
        if evicted:
            metrics.discarded("evicted", evicted)

    async def _emit(self, closed: list[tuple[Any, ...]], created: float | None, outbox: Outbox) -> None:
        records = [c[3] for c in closed if c[3] is not None]
        late, late_holds = self._late_out, self._late_holds
        self._late_out, self._late_holds = [], []
        if closed:
            batch = Batch(records, created=created)
            self._track(batch, closed)
            await outbox.send(batch)  # an empty batch is acked "skipped"
        if late:
            batch = Batch(late, created=created)
            if late_holds:
                batch.acks = (partial(_release_all, late_holds),)
            await outbox.send(batch)

    def _track(self, batch: Batch, closed: list[tuple[Any, ...]]) -> None:
        """Hook ``batch`` so its windows count as done (and release the
        input acks they hold) once every consumer has handled it."""
        holds = [h for c in closed if c[4] for h in c[4]]
        checkpointing = self.checkpoint is not None
        if not (holds or checkpointing):
            return
        windows = [(c[0], c[1], c[2]) for c in closed] if checkpointing else ()
        entry: list[Any] = [windows, holds, None]
        self._unacked.append(entry)

        def acked(outcome: str) -> None:
            entry[2] = outcome
            self._settle()

        batch.acks += (acked,)

    def _settle(self) -> None:
        """Move the windows of batches acked in order into ``acked``."""
        pending, acked, step = self._unacked, self.acked, self.step
        while pending and pending[0][2] is not None:
            windows, holds, outcome = pending.popleft()
            if outcome in _SETTLED:
                for k, start, last in windows:
                    done = min(start + step, self._failed.get(k, math.inf))
                    a = acked.get(k)
                    if a is None:
                        acked[k] = [done, last]
                    elif done > a[0]:
                        a[0], a[1] = done, last
                self._dirty = True
            else:  # not stored: the checkpoint never goes past it, so a restart rebuilds it
                for k, start, _ in windows:
                    self._failed[k] = min(start, self._failed.get(k, math.inf))
            if self.checkpoint is None:
                for h in holds:
                    h.done(outcome)
            else:
                self._to_release += [(h, outcome) for h in holds]
        while len(acked) > self.max_keys:
            del acked[next(iter(acked))]
        if self._closing and not pending:
            try:
                self.save()  # the final save, once the last ack is in
            except OSError as exc:
                log.error("window %s: cannot write checkpoint %s: %s", self.name, self.checkpoint, exc)

    # -- checkpoints -------------------------------------------------------------

    def save(self) -> None:
        """Write the acknowledged state to the checkpoint (atomically), then
        release the input acks it covers. (In a flow the stage writes in a
        worker thread and releases the acks on trio's thread.)"""
        release, data = self._snapshot()
        try:
            if data is not None:
                write_atomic(self.checkpoint, data)  # type: ignore[arg-type]
        except BaseException:
            self._to_release = release + self._to_release
            raise
        self._release(release)

    def _snapshot(self) -> tuple[list[tuple[_Hold, str]], bytes | None]:
        """The acks the next write covers, and the bytes to write."""
        release, self._to_release = self._to_release, []
        self._dirty = False
        if self.checkpoint is None:
            return release, None
        entries = [(k, a[0], a[1]) for k, a in self.acked.items()]
        return release, msgspec.msgpack.encode(_Checkpoint(_CHECKPOINT_VERSION, _CHECKPOINT_KIND, entries))

    @staticmethod
    def _release(release: list[tuple[_Hold, str]]) -> None:
        for hold, outcome in release:
            hold.done(outcome)

    async def _save(self, metrics: ComponentMetrics) -> None:
        if self.checkpoint is None or not (self._dirty or self._to_release):
            return
        release, data = self._snapshot()
        try:
            await trio.to_thread.run_sync(write_atomic, self.checkpoint, data or b"")
        except OSError as exc:
            self._to_release = release + self._to_release
            self._dirty = True
            metrics.error("checkpoint")
            log.error("window %s: cannot write checkpoint %s: %s", self.name, self.checkpoint, exc)
            return
        self._release(release)

    def restore(self) -> int:
        """Load the checkpoint; returns the keys loaded. A missing or bad
        file is logged once and ignored."""
        path = self.checkpoint
        if path is None:
            return 0
        try:
            with open(path, "rb") as f:
                data = f.read(_MAX_CHECKPOINT + 1)
            if len(data) > _MAX_CHECKPOINT:
                raise ValueError("the file is too large")
            cp = msgspec.msgpack.decode(data, type=_Checkpoint)
            if cp.kind != _CHECKPOINT_KIND or cp.version != _CHECKPOINT_VERSION:
                raise ValueError(f"version {cp.version} of {cp.kind!r}, expected {_CHECKPOINT_VERSION}")
        except FileNotFoundError:
            log.info("window %s: no checkpoint at %s yet; starting empty", self.name, path)
            return 0
        except (OSError, msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
            log.warning("window %s: checkpoint %s is unusable (%s); ignoring it", self.name, path,
                        str(exc)[:200])
            return 0
        entries = cp.entries[-self.max_keys:]
        self.acked = {_hashable(k): [closed, _hashable(last)] for k, closed, last in entries}
        for k, (closed, last) in self.acked.items():
            # the watermark at which the last stored window closed: the
            # windows open at the crash close again only with their records
            latest = closed - self.step + self.every + self.lateness
            ks = [closed, latest, 0.0, math.inf, {}, last, k, -math.inf]  # run() sets _SEEN
            self._keys[k] = ks
            self._top = max(self._top, latest)
            if self.carry and last is not None:
                self._activate(ks)
        log.info("window %s: restored %d keys from %s", self.name, len(entries), path)
        return len(entries)


class Candles(Window):
    """OHLCV candles: a window stage over trades (or ticks).

    ```python
    Candles(every=60, lateness=2.0)               # 1-minute candles
    Candles(every=300, step=60, empty="carry")    # 5-minute candles every minute
    ```

    Each closed window of a key gives a ``Candle``: open (the price of its
    earliest record), high, low, close (the price of its latest record),
    volume (sum of sizes), trade count, VWAP, first and last record time.
    From ticks (records without ``size``): close is the last price and
    volume and VWAP are None. ``empty="skip"`` (default) emits nothing for a
    window without records; ``"carry"`` emits a candle at the last close
    (trades 0, volume 0 or None, VWAP None, first and last time those of
    the last record). A candle's source and symbol come from a (source,
    symbol) key; any other key becomes its symbol (as text), with source
    "".

    Takes the parameters of [Window][flows.Window] too.

    Parameters:
        empty: ``"skip"`` (no candle for a window without records) or
            ``"carry"`` (a candle at the last close).
    """

    def __init__(
        self,
        every: float = 60.0,
        *,
        step: float | None = None,
        lateness: float = 0.0,
        empty: Literal["skip", "carry"] = "skip",
        key: Callable[[Any], Hashable] = _tick_key,
        time: Callable[[Any], float] = _tick_time,
        late: Literal["drop", "emit"] = "drop",
        tick: float = 1.0,
        max_keys: int = 100_000,
        final: Literal["auto", "emit", "keep"] = "auto",
        checkpoint: str | Path | None = None,
        checkpoint_every: float = 5.0,
        name: str = "candles",
    ) -> None:
        super().__init__(every, step=step, lateness=lateness, key=key, time=time, late=late,
                         tick=tick, max_keys=max_keys, final=final, checkpoint=checkpoint,
                         checkpoint_every=checkpoint_every, name=name)
        if empty not in ("skip", "carry"):
            raise ValueError(f"empty must be 'skip' or 'carry', got {empty!r}")
        self.empty = empty
        self.carry = empty == "carry"
        self._fast_ok = (self.step == self.every and self.every.is_integer()
                         and key is _tick_key and time is _tick_time)
        if self._fast_ok:
            self._open = {}

    def _valid(self, r: Any) -> bool:
        p, s = r.price, getattr(r, "size", None)
        return 0 < p < math.inf and (s is None or 0 <= s < math.inf)

    def _create(self, r: Any, ts: float, now: float) -> list[Any]:
        p, s = r.price, getattr(r, "size", None)
        if s is None:
            return [None, None, p, p, p, p, None, 1, None, ts, ts, now, math.inf]
        return [None, None, p, p, p, p, s, 1, p * s, ts, ts, now, math.inf]

    def _add(self, e: list[Any], r: Any, ts: float, now: float) -> None:
        p, s = r.price, getattr(r, "size", None)
        e[_H] = max(e[_H], p)
        e[_L] = min(e[_L], p)
        if ts < e[_FT]:
            e[_FT], e[_O] = ts, p
        if ts >= e[_LT]:
            e[_LT], e[_C], e[_LS] = ts, p, now
        e[_N] += 1
        if s is not None:
            e[_V] = s if e[_V] is None else e[_V] + s
            e[_PV] = p * s if e[_PV] is None else e[_PV] + p * s

    def _park(self, ks: list[Any], end: float) -> None:
        """The key's newest window holds the latest time at which the fast
        loop must queue the key (its oldest window is due)."""
        ks[_DUE] = due = end + self.lateness
        if end == math.inf:
            self._active.pop(ks[_KEY], None)
        else:
            e = ks[_WINS].get(ks[_NEWEST])
            if e is not None:
                e[_DUE_AT] = due

    def _clock(self, ks: list[Any]) -> tuple[float, float]:
        """The latest time is kept in the key's newest window by the fast loop."""
        e = ks[_WINS].get(ks[_NEWEST])
        if e is not None and e[_LT] > ks[_MAX]:
            return e[_LT], e[_LS]
        return ks[_MAX], ks[_SEEN]

    def _result(self, k: Any, start: float, e: list[Any]) -> Candle:
        if self._fast_ok:
            source, symbol = k
        else:
            source, symbol = k if type(k) is tuple and len(k) == 2 else ("", str(k))
        v = e[6]
        return Candle(source, symbol, start, self.every, e[2], e[3], e[4], e[5], v, e[7],
                      e[8] / v if v else None, e[9], e[10])

    def _last_of(self, e: list[Any]) -> Any:
        return (e[_C], e[_LT], e[_V] is not None) if self.carry else None

    def _carried(self, k: Any, start: float, last: Any) -> Candle:
        source, symbol = k if type(k) is tuple and len(k) == 2 else ("", str(k))
        close, last_ts, sized = last
        return Candle(source, symbol, start, self.every, close, close, close, close,
                      0.0 if sized else None, 0, None, last_ts, last_ts)

    def close_due(self, now: float, *, everything: bool = False, idle: bool = False) -> list[tuple[Any, ...]]:
        """``Window.close_due``, inlined for the fast loop's keys (tumbling,
        no carry): what runs after every batch."""
        if everything or idle or self.carry or not self._fast_ok:
            return super().close_due(now, everything=everything, idle=idle)
        out: list[tuple[Any, ...]] = []
        append = out.append
        todo, self._due = self._due, []
        lateness, every, opened, active, inf = self.lateness, self.every, self._open, self._active, math.inf
        cap = self._stream_clock(now)
        assert opened is not None
        for ks in todo:
            wins = ks[4]
            if not wins:
                continue
            latest, at = ks[1], ks[2]
            e = wins.get(ks[7])
            if e is not None and e[10] > latest:
                latest = ks[1] = e[10]
                at = ks[2] = e[11]
            wm = latest + (now - at if now > at else 0.0)
            if wm > cap:
                wm = max(latest, cap)
            wm -= lateness
            first = min(wins)
            if first + every <= wm:
                src, sym = k = ks[6]
                while True:
                    c = wins.pop(first)
                    del opened[(src, sym, first)]
                    v = c[6]
                    append((k, first, None, Candle(src, sym, first, every, c[2], c[3], c[4], c[5], v, c[7],
                                                    c[8] / v if v else None, c[9], c[10]), c[1]))
                    if not wins:
                        break
                    first = min(wins)
                    if first + every > wm:
                        break
                jump = ((wm - every) // every + 1) * every
                if not wins:
                    ks[0] = jump
                    ks[3] = inf
                    ks[4] = {}  # a dict emptied by pops keeps its table
                    del active[k]
                    continue
                ks[0] = min(first, jump)
            ks[3] = due = first + every + lateness
            if e is not None:
                e[12] = due
        return out

    def _fold(self, records: list[Any], now: float, hold: _Hold | None) -> None:
        """Tumbling candles over Trades with the default key and time: one
        loop, inlined; a record whose window is open costs one dict lookup
        on (source, symbol, start); anything else goes to the generic loop."""
        if not self._fast_ok:
            return super()._fold(records, now, hold)
        opened = self._open
        assert opened is not None
        oget, get, due = opened.get, self._keys.get, self._due
        every, wl, inf = self.every, self.every + self.lateness, math.inf
        r = None
        try:
            for r in records:
                ts, p, s = r.ts, r.price, r.size  # AttributeError: not a Trade
                ps = p * s
                x = ps + ts
                if not (p > 0.0 <= s and x - x == 0.0):  # x - x: NaN for NaN and inf
                    self._invalid(r)
                    continue
                start = ts - ts % every  # exact for a whole number of seconds: (ts // every) * every
                src, sym = r.source, r.symbol
                e = oget((src, sym, start))
                if e is not None:  # an open window
                    if p > e[3]:
                        e[3] = p
                    elif p < e[4]:
                        e[4] = p
                    if ts >= e[10]:
                        e[10] = ts
                        e[5] = p
                        e[11] = now
                        if ts >= e[12]:  # the key's oldest window is due
                            e[12] = inf
                            due.append(get((src, sym)))  # type: ignore[arg-type]  # a key with an open window
                    elif ts < e[9]:
                        e[9] = ts
                        e[2] = p
                    e[6] += s
                    e[7] += 1
                    e[8] += ps
                    if e[0] is not hold and hold is not None:
                        self._hold(e, hold)
                    continue
                k = (src, sym)
                ks = get(k)
                if ks is None:
                    ks = self._new_key(k, ts, now)
                if start < ks[0]:
                    self._late(r, hold)
                    continue
                wins = ks[4]
                if not wins:
                    self._active[k] = ks
                d = ks[0] + wl  # when the oldest window (or carry) is due
                if ts >= d:
                    due.append(ks)
                    d = inf
                if hold is None:
                    e = [None, None, p, p, p, p, s, 1, ps, ts, ts, now, d]
                else:
                    e = [hold, [hold], p, p, p, p, s, 1, ps, ts, ts, now, d]
                    hold.left += 1
                wins[start] = opened[(src, sym, start)] = e
                if start > ks[7]:
                    ks[7] = start
        except (AttributeError, TypeError):  # a record without a size, or not numbers: the generic loop
            at = next(i for i, x in enumerate(records) if x is r)
            return super()._fold(records[at:], now, hold)
        return None
