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
unchanged symbol. The file holds only what every consumer downstream has
acknowledged: each emitted batch carries an ack hook, and the state a save
writes is built from the batches acked so far, in order (``written``,
``skipped`` and ``dropped`` count; a ``failed`` batch's values are left
out, so they are emitted again). A crash between emitting a record and its
sink storing it therefore re-emits the record after the restart (at least
once) instead of skipping it as unchanged. When the stage stops, the final
save waits for the acks still to come (it is written by the last one).

The file is a magic line and length-prefixed msgpack frames, the most
recently seen keys first, so a restore reads no more than ``max_keys``
entries however large the file. A run with ``fresh`` (``python -m
flows.run --fresh``) ignores the file. A missing, corrupt, hostile or
foreign checkpoint is reported in one log line and ignored.
"""

from __future__ import annotations

import logging
import math
import struct
from collections import OrderedDict, deque
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
from ._records import Batch

log = logging.getLogger("flows.change")

CHECKPOINT_VERSION = 2
_MAGIC = b"flows.ChangeDetector 2\n"
_FRAME = struct.Struct(">I")
_FRAME_ENTRIES = 4096
_MAX_FRAME = 64 << 20
_SETTLED = frozenset(("written", "skipped", "dropped"))
"""Outcomes whose values the checkpoint keeps (a ``failed`` batch is emitted again)."""


class _Checkpoint(msgspec.Struct, frozen=True):
    """Version 1: the whole state in one msgpack object (still read)."""

    version: int
    kind: str
    entries: list[tuple[Any, float, float]]  # key, last emitted value, its time


_Entries = msgspec.msgpack.Decoder(list[tuple[Any, float, float]])


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
        # what the checkpoint holds: the state as of the batches acked so far
        self.acked: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        self._unacked: deque[list[Any]] = deque()  # [emitted records, outcome], in order
        self._closing = False
        self._drops = DropLog(f"flows.stage.{name}")
        self._fresh = False
        self._restored = False

    def setup(self, context: RunContext) -> None:
        self._fresh = context.fresh

    def save(self) -> None:
        """Write the acknowledged state to the checkpoint file (atomically):
        the magic line, then frames of entries, most recently emitted first."""
        if self.checkpoint is None:
            return
        entries = [(k, v, t) for k, (v, t) in reversed(self.acked.items())]
        parts = [_MAGIC]
        encode = msgspec.msgpack.encode
        for i in range(0, len(entries), _FRAME_ENTRIES):
            frame = encode(entries[i : i + _FRAME_ENTRIES])
            parts += (_FRAME.pack(len(frame)), frame)
        write_atomic(self.checkpoint, b"".join(parts))

    def restore(self) -> int:
        """Load the checkpoint file into the state; returns the keys loaded.

        Reads at most ``max_keys`` entries. Anything wrong with the file is
        logged once and ignored.
        """
        path = self.checkpoint
        if path is None:
            return 0
        try:
            with open(path, "rb") as f:
                entries = self._read(f)
        except FileNotFoundError:
            log.info("change %s: no checkpoint at %s yet; starting empty", self.name, path)
            return 0
        except OSError as exc:
            log.warning("change %s: cannot read checkpoint %s (%s); ignoring it", self.name, path, exc)
            return 0
        except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
            log.warning(
                "change %s: checkpoint %s is unusable (%s); ignoring it", self.name, path,
                str(exc)[:200],
            )
            return 0
        self.state = OrderedDict((k, [v, t]) for k, v, t in reversed(entries))
        self.acked = OrderedDict((k, (v, t)) for k, v, t in reversed(entries))
        log.info("change %s: restored %d keys from %s", self.name, len(entries), path)
        return len(entries)

    def _read(self, f: Any) -> list[tuple[Hashable, float, float]]:
        """Up to ``max_keys`` entries, most recently seen first."""
        head = f.read(len(_MAGIC))
        if head != _MAGIC:  # version 1: one object, oldest first
            cp = msgspec.msgpack.decode(head + f.read(), type=_Checkpoint)
            if cp.version != 1 or cp.kind != "flows.ChangeDetector":
                raise ValueError(f"version {cp.version} of {cp.kind!r}, expected {CHECKPOINT_VERSION}")
            return [(_hashable(k), v, t) for k, v, t in reversed(cp.entries[-self.max_keys :])]
        entries: list[tuple[Hashable, float, float]] = []
        while len(entries) < self.max_keys:
            size = f.read(_FRAME.size)
            if not size:
                break
            (n,) = _FRAME.unpack(size) if len(size) == _FRAME.size else (-1,)
            if not 0 < n <= _MAX_FRAME:
                raise ValueError("a frame is cut short or too large")
            frame = f.read(n)
            if len(frame) != n:
                raise ValueError("the last frame is cut short")
            entries += ((_hashable(k), v, t) for k, v, t in _Entries.decode(frame))
        return entries[: self.max_keys]

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
        checkpointing = self.checkpoint is not None
        self._closing = False
        try:
            async for batch in inbox:
                kept = self.filter(batch.records, metrics)
                out = batch.replace(kept)
                if checkpointing and kept:
                    self._track(out)
                await outbox.send(out)  # an empty batch is acked "skipped"
                if checkpointing and trio.current_time() >= next_save:
                    await self._save(metrics)
                    next_save = trio.current_time() + self.checkpoint_every
        finally:
            self._closing = True
            if not self._unacked:
                with trio.CancelScope(shield=True):
                    await self._save(metrics)
            # else the last ack to come writes the final checkpoint

    def _track(self, batch: Batch) -> None:
        """Hook ``batch`` (emitted records) so its values reach the
        checkpoint once every consumer has handled it."""
        entry: list[Any] = [batch.records, None]
        self._unacked.append(entry)

        def acked(outcome: str) -> None:
            entry[1] = outcome
            self._settle()

        batch.acks += (acked,)

    def _settle(self) -> None:
        """Move the values of batches acked in order into ``acked``."""
        pending, acked, limit = self._unacked, self.acked, self.max_keys
        key_of, value_of, time_of = self.key, self.value, self.time
        while pending and pending[0][1] is not None:
            records, outcome = pending.popleft()
            if outcome not in _SETTLED:
                continue
            for r in records:
                k = key_of(r)
                acked[k] = (value_of(r), time_of(r))
                acked.move_to_end(k)
            while len(acked) > limit:
                acked.popitem(last=False)
        if self._closing and not pending:
            try:
                self.save()  # the final save, once the last ack is in
            except OSError as exc:
                log.error("change %s: cannot write checkpoint %s: %s", self.name, self.checkpoint, exc)

    async def _save(self, metrics: ComponentMetrics) -> None:
        if self.checkpoint is None:
            return
        try:
            await trio.to_thread.run_sync(self.save)
        except OSError as exc:
            metrics.error("checkpoint")
            log.error("change %s: cannot write checkpoint %s: %s", self.name, self.checkpoint, exc)
