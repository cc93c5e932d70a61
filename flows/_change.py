"""Last-value change detection.

Per key (default: source and symbol) the detector remembers the last
*emitted* value and its time. A record is emitted when its key is new, when
its value moved by at least ``rel`` (relative) or ``abs`` (absolute) from
the last emitted value, or when ``heartbeat`` seconds passed since the key
last emitted. Comparing with the last emitted value (not the last seen)
means slow drift still emits. With ``rel`` and ``abs`` both 0 any change
emits. A price that goes A -> B -> A emits all three (this is not a
seen-set dedupe).

Records whose value is NaN, infinite, zero or negative are dropped as
``invalid``. State is bounded by ``max_keys``: the least recently seen key
is evicted (counted as discarded with reason ``evicted``).

With ``checkpoint`` set, the state is saved to that file (msgpack, written
atomically) every ``checkpoint_every`` seconds and when the stage stops,
and restored when it starts, so a restarted flow does not re-emit every
unchanged symbol. A run with ``fresh`` (``python -m flows.run --fresh``)
ignores the file. A missing, corrupt or foreign checkpoint is reported in
one log line and ignored.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import msgspec
import trio

from ._actors import RunContext
from ._channels import Inbox, Outbox
from ._checkpoint import write_atomic
from ._log import DropLog
from ._metrics import ComponentMetrics

log = logging.getLogger("flows.change")

CHECKPOINT_VERSION = 1


class _Checkpoint(msgspec.Struct, frozen=True):
    version: int
    kind: str
    entries: list[tuple[Any, float, float]]  # key, last emitted value, its time


def _hashable(key: Any) -> Hashable:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key

__all__ = ["ChangeDetector"]


def _tick_key(record: Any) -> Hashable:
    return (record.source, record.symbol)


def _tick_value(record: Any) -> float:
    return record.price


def _tick_time(record: Any) -> float:
    return record.ts


class ChangeDetector:
    """A stage that drops records whose value has not moved.

    ::

        ChangeDetector(rel=0.0005, heartbeat=60.0)

    Parameters:
        rel: emit when ``|v - last| >= rel * |last|`` (0 disables).
        abs: emit when ``|v - last| >= abs`` (0 disables).
        heartbeat: emit when this many seconds (of record time) passed since
            the key last emitted; ``None`` disables.
        max_keys: most keys remembered; the least recently seen is evicted.
        key, value, time: functions of a record (defaults fit ``Tick``:
            (source, symbol), price, ts). Keys must be msgpack-encodable
            (str, numbers, tuples of them) for checkpoints.
        checkpoint: file to save the state to and restore it from.
        checkpoint_every: seconds between saves while running.
        name: the stage's name.
    """

    def __init__(
        self,
        *,
        rel: float = 0.0,
        abs: float = 0.0,
        heartbeat: float | None = None,
        max_keys: int = 1_000_000,
        key: Callable[[Any], Hashable] = _tick_key,
        value: Callable[[Any], float] = _tick_value,
        time: Callable[[Any], float] = _tick_time,
        checkpoint: str | Path | None = None,
        checkpoint_every: float = 30.0,
        name: str = "change",
    ) -> None:
        if not (rel >= 0 and abs >= 0):
            raise ValueError("rel and abs must be >= 0")
        if heartbeat is not None and not heartbeat > 0:
            raise ValueError("heartbeat must be > 0 (or None)")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.rel, self.abs, self.heartbeat, self.max_keys = rel, abs, heartbeat, max_keys
        self.key, self.value, self.time = key, value, time
        self.name = name
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        if not checkpoint_every > 0:
            raise ValueError("checkpoint_every must be > 0")
        self.checkpoint_every = checkpoint_every
        # key -> [last emitted value, time it was emitted]
        self.state: OrderedDict[Hashable, list[float]] = OrderedDict()
        self._drops = DropLog(f"flows.stage.{name}")
        self._fresh = False
        self._restored = False

    def setup(self, context: RunContext) -> None:
        self._fresh = context.fresh

    def save(self) -> None:
        """Write the state to the checkpoint file (atomically)."""
        if self.checkpoint is None:
            return
        entries = [(k, v[0], v[1]) for k, v in self.state.items()]
        data = msgspec.msgpack.encode(
            _Checkpoint(CHECKPOINT_VERSION, "flows.ChangeDetector", entries)
        )
        write_atomic(self.checkpoint, data)

    def restore(self) -> int:
        """Load the checkpoint file into the state; returns the keys loaded.

        Anything wrong with the file is logged once and ignored.
        """
        path = self.checkpoint
        if path is None:
            return 0
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            log.info("change %s: no checkpoint at %s yet; starting empty", self.name, path)
            return 0
        except OSError as exc:
            log.warning("change %s: cannot read checkpoint %s (%s); ignoring it", self.name, path, exc)
            return 0
        try:
            cp = msgspec.msgpack.decode(data, type=_Checkpoint)
            if cp.version != CHECKPOINT_VERSION or cp.kind != "flows.ChangeDetector":
                raise ValueError(f"version {cp.version} of {cp.kind!r}, expected {CHECKPOINT_VERSION}")
            state = OrderedDict((_hashable(k), [v, t]) for k, v, t in cp.entries)
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            log.warning(
                "change %s: checkpoint %s is unusable (%s); ignoring it", self.name, path, exc
            )
            return 0
        while len(state) > self.max_keys:
            state.popitem(last=False)
        self.state = state
        log.info("change %s: restored %d keys from %s", self.name, len(state), path)
        return len(state)

    def filter(self, records: list[Any], metrics: ComponentMetrics | None = None) -> list[Any]:
        """The records of ``records`` that must be emitted; updates the state."""
        if self.key is _tick_key and self.value is _tick_value and self.time is _tick_time:
            out, invalid, evicted = self._filter_ticks(records)
        else:
            out, invalid, evicted = self._filter_any(records)
        if metrics is not None:
            if invalid:
                metrics.discarded("invalid", invalid)
            if evicted:
                metrics.discarded("evicted", evicted)
            unchanged = len(records) - len(out) - invalid
            if unchanged:
                metrics.discarded("unchanged", unchanged)
        return out

    def _new_key(self, key: Hashable, value: float, at: float) -> int:
        """Remember a new key, evicting the least recently seen ones; returns
        how many were evicted. Evicting as keys arrive (not once per batch)
        keeps the output independent of how records were split into batches."""
        state, evicted = self.state, 0
        while len(state) >= self.max_keys:
            state.popitem(last=False)
            evicted += 1
        state[key] = [value, at]
        return evicted

    def _invalid(self, key: Hashable, value: Any) -> None:
        self._drops.drop("invalid", f"{key!r}: value {value!r} is not a positive number")

    def _filter_ticks(self, records: list[Any]) -> tuple[list[Any], int, int]:
        """``filter`` for Ticks with the default key, value and time (the hot path)."""
        get, seen = self.state.get, self.state.move_to_end
        rel, abs_, hb = self.rel, self.abs, self.heartbeat
        exact = rel == 0 and abs_ == 0
        inf = math.inf
        out: list[Any] = []
        append = out.append
        invalid = evicted = 0
        for r in records:
            v = r.price
            if not 0 < v < inf:  # NaN fails too
                invalid += 1
                self._invalid((r.source, r.symbol), v)
                continue
            k = (r.source, r.symbol)
            last = get(k)
            if last is None:
                evicted += self._new_key(k, v, r.ts)
                append(r)
                continue
            seen(k)
            lv = last[0]
            d = v - lv if v >= lv else lv - v
            if (
                (d != 0 if exact else ((rel and d >= rel * lv) or (abs_ and d >= abs_)))
                or (hb is not None and r.ts - last[1] >= hb)
            ):
                last[0] = v
                last[1] = r.ts
                append(r)
        return out, invalid, evicted

    def _filter_any(self, records: list[Any]) -> tuple[list[Any], int, int]:
        """``filter`` for any record type, through the key/value/time functions."""
        state, key_of, value_of, time_of = self.state, self.key, self.value, self.time
        rel, abs_, hb = self.rel, self.abs, self.heartbeat
        exact = rel == 0 and abs_ == 0
        isfinite = math.isfinite
        out: list[Any] = []
        invalid = evicted = 0
        for r in records:
            v = value_of(r)
            if not (v > 0 and isfinite(v)):  # NaN fails v > 0
                invalid += 1
                self._invalid(key_of(r), v)
                continue
            k = key_of(r)
            last = state.get(k)
            if last is None:
                evicted += self._new_key(k, v, time_of(r))
                out.append(r)
                continue
            state.move_to_end(k)
            lv = last[0]
            d = v - lv if v >= lv else lv - v
            if (
                (d != 0 if exact else ((rel and d >= rel * lv) or (abs_ and d >= abs_)))
                or (hb is not None and time_of(r) - last[1] >= hb)
            ):
                last[0] = v
                last[1] = time_of(r)
                out.append(r)
        return out, invalid, evicted

    async def run(self, inbox: Inbox, outbox: Outbox) -> None:
        metrics = inbox.metrics
        if not self._restored and self.checkpoint is not None:
            self._restored = True
            if self._fresh:
                log.info("change %s: fresh run: ignoring checkpoint %s", self.name, self.checkpoint)
            else:
                await trio.to_thread.run_sync(self.restore)
        next_save = trio.current_time() + self.checkpoint_every
        try:
            async for batch in inbox:
                kept = self.filter(batch.records, metrics)
                await outbox.send(batch.replace(kept))  # an empty batch is acked "skipped"
                if self.checkpoint is not None and trio.current_time() >= next_save:
                    await self._save(metrics)
                    next_save = trio.current_time() + self.checkpoint_every
        finally:
            with trio.CancelScope(shield=True):
                await self._save(metrics)

    async def _save(self, metrics: ComponentMetrics) -> None:
        if self.checkpoint is None:
            return
        try:
            await trio.to_thread.run_sync(self.save)
        except OSError as exc:
            metrics.error("checkpoint")
            log.error("change %s: cannot write checkpoint %s: %s", self.name, self.checkpoint, exc)
