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
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from ._channels import Inbox, Outbox
from ._log import DropLog
from ._metrics import ComponentMetrics

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
            (source, symbol), price, ts).
        name: the stage's name.
    """

    def __init__(
        self,
        *,
        rel: float = 0.0,
        abs: float = 0.0,  # noqa: A002 - the documented parameter name
        heartbeat: float | None = None,
        max_keys: int = 1_000_000,
        key: Callable[[Any], Hashable] = _tick_key,
        value: Callable[[Any], float] = _tick_value,
        time: Callable[[Any], float] = _tick_time,
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
        # key -> [last emitted value, time it was emitted]
        self.state: OrderedDict[Hashable, list[float]] = OrderedDict()
        self._drops = DropLog(f"flows.stage.{name}")

    def filter(self, records: list[Any], metrics: ComponentMetrics | None = None) -> list[Any]:
        """The records of ``records`` that must be emitted; updates the state."""
        state, key_of, value_of, time_of = self.state, self.key, self.value, self.time
        rel, abs_, hb = self.rel, self.abs, self.heartbeat
        exact = rel == 0 and abs_ == 0
        hb = math.inf if hb is None else hb
        isfinite = math.isfinite
        max_keys = self.max_keys
        out = []
        invalid = evicted = 0
        for r in records:
            v = value_of(r)
            if not (v > 0 and isfinite(v)):  # NaN fails v > 0
                invalid += 1
                self._drops.drop("invalid", f"{key_of(r)!r}: value {v!r} is not a positive number")
                continue
            k = key_of(r)
            last = state.get(k)
            if last is None:
                # Evict as keys arrive (not once per batch), so the state never
                # holds more than max_keys and the output does not depend on
                # how the records were split into batches.
                while len(state) >= max_keys:
                    state.popitem(last=False)
                    evicted += 1
                state[k] = [v, time_of(r)]
                out.append(r)
                continue
            state.move_to_end(k)
            lv = last[0]
            d = v - lv if v >= lv else lv - v
            if (
                (d != 0 if exact else ((rel and d >= rel * lv) or (abs_ and d >= abs_)))
                or time_of(r) - last[1] >= hb
            ):
                last[0] = v
                last[1] = time_of(r)
                out.append(r)
        if metrics is not None:
            if invalid:
                metrics.discarded("invalid", invalid)
            if evicted:
                metrics.discarded("evicted", evicted)
            unchanged = len(records) - len(out) - invalid
            if unchanged:
                metrics.discarded("unchanged", unchanged)
        return out

    async def run(self, inbox: Inbox, outbox: Outbox) -> None:
        metrics = inbox.metrics
        async for batch in inbox:
            kept = self.filter(batch.records, metrics)
            await outbox.send(batch.replace(kept))  # an empty batch is acked "skipped"
