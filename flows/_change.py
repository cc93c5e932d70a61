"""Last-value change detection.

Per key (default: source and symbol) the detector remembers the last
*emitted* value (and its time, with a heartbeat). A record is emitted when
its key is new, when its value moved by at least ``rel`` (relative) or
``abs`` (absolute) from the last emitted value, or when ``heartbeat``
seconds passed since the key last emitted. Comparing with the last
emitted value (not the last seen) means slow drift still emits. With
``rel`` and ``abs`` both 0 any change emits. A price that goes A -> B -> A
emits all three (this is not a seen-set dedupe).

Records whose value is NaN, infinite, zero or negative are dropped as
``invalid``. State is bounded by ``max_keys``: the least recently seen key
is evicted (counted as discarded with reason ``evicted``). Recency is what
eviction needs, so it is kept once eviction can come near: from the first
key when ``max_keys`` is below 1024, else once the state holds three
quarters of ``max_keys``. Until then a record that finds its key costs no
bookkeeping (this is the hot path), and keys keep the order in which they
were first stored: when the state later fills up, keys not seen since it
passed three quarters of ``max_keys`` are evicted oldest stored first,
then by last sight. Recency is a sequence number per key (a hit reorders
nothing) and eviction pops a list of the keys with the smallest, made in
one pass over the state every quarter of ``max_keys`` evictions or so: it
stays exact. Times are kept only with a heartbeat (nothing else reads
them; then in an array indexed by sequence number, renumbered when three
quarters of it are dead): a heartbeat turned on later is due at once for
the keys stored before. ``bench/memory.py`` measures the bytes per key.

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

import functools
import logging
import math
import re
import struct
import sys
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable
from itertools import islice
from operator import attrgetter, itemgetter
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


_TRACK_ALWAYS_BELOW = 1024
"""Detectors with a smaller ``max_keys`` track recency from the first key;
larger ones once the state is three quarters full (``_track_from``)."""


def _track_from(max_keys: int) -> int:
    return max_keys - max_keys // 4 if max_keys >= _TRACK_ALWAYS_BELOW else 0


def _pack(value: Any, at: Any) -> Any:
    """(value, time) in 32 bytes when both are floats (a complex), the value
    alone when the time is not kept (None), else a tuple."""
    if value.__class__ is float and at.__class__ is float:
        return complex(value, at)
    if at is None:
        return value
    return (value, at)


def _time_of(packed: Any, cls: type) -> Any:
    """The time in ``packed`` (-inf when it was not kept: never emitted)."""
    if cls is complex:
        return packed.imag
    return packed[1] if cls is tuple else -math.inf


def _unpack(packed: Any) -> tuple[Any, Any]:
    cls = packed.__class__
    if cls is complex:
        return packed.real, packed.imag
    if cls is tuple:
        return packed
    return packed, None


def _value_of(packed: Any) -> Any:
    """The value in ``packed`` (any form's packing)."""
    cls = packed.__class__
    if cls is complex:
        return packed.real
    return packed[0] if cls is tuple else packed


def _seq_of(ranked: Any) -> float:
    """The sequence number in a ranked entry (``_filter_ranked``)."""
    return ranked.imag if ranked.__class__ is complex else ranked[1]


_IMAG = attrgetter("imag")
_REAL = attrgetter("real")
_SAMPLE = 4096
"""About this many sequence numbers are sorted to pick the eviction candidates."""
_OLDEST_SHARE = 4
_OLDEST_AT_LEAST = 64
"""Eviction candidates are made for about len/_OLDEST_SHARE keys, at least
_OLDEST_AT_LEAST: one pass over the state per that many evictions."""
_REBUILD_AFTER = 8
"""The ranked form's dict is rebuilt when inflated, at most once per
len/_REBUILD_AFTER evictions."""
_RENUMBER_FACTOR = 4
_RENUMBER_SLACK = 64
"""The timed ranked form renumbers its seqs (and drops the dead times) when
its times array holds more than _RENUMBER_FACTOR * len + _RENUMBER_SLACK
(each renumbering costs about 0.5 us per key: at 4 it adds ~0.2 us per
tracked hit, and the array's dead times cost at most 24 bytes per key)."""


def _oldest_keys(ranked: dict[Hashable, Any], want: int) -> tuple[list[Hashable], float]:
    """About ``want`` keys of ``ranked`` (at least one), the least recently
    seen: all whose sequence number is at most the returned bound, sorted
    most recent first."""
    n = len(ranked)
    try:
        sample = sorted(islice(map(_IMAG, ranked.values()), 0, None, max(1, n // _SAMPLE)))
        upto = sample[min(len(sample) - 1, want * len(sample) // n)]
        found = [(s, k) for k, c in ranked.items() if (s := c.imag) <= upto]
    except AttributeError:  # not all complexes: some (value, seq) tuples
        sample = sorted(islice(map(_seq_of, ranked.values()), 0, None, max(1, n // _SAMPLE)))
        upto = sample[min(len(sample) - 1, want * len(sample) // n)]
        found = [(s, k) for k, c in ranked.items() if (s := _seq_of(c)) <= upto]
    found.sort(key=itemgetter(0), reverse=True)  # (seqs are unique: keys are never compared)
    return [k for _, k in found], upto


_FAST_LOOP = """
def loop(records, src, vals, limit):
    out = []
    append = out.append
    bad = None
    for r in records:{check}
        v = r.price
        try:  # (cheaper than vals.get when the key is known, as most are)
            {load}
        except KeyError:
            if len(vals) >= limit:  # the state is about to need recency
                return out, bad, r
        else:
            if {unchanged}:
                continue
        if 0.0 < v < inf:
            {store}
            append(r)
        elif bad is None:
            bad = [r]
        else:
            bad.append(r)
    return out, bad, None
"""


_SOURCE_CHECK = """
        if r.source is not src and r.source != src:
            return out, bad, r"""


@functools.lru_cache(maxsize=64)  # (a loop holds no state: detectors with the same thresholds share it)
def _fast_loop(rel: float, abs_: float, hb: float | None, checked: bool = True) -> Callable[..., Any]:
    """The plain form's filter loop, written for these thresholds (times
    are stored only with a heartbeat: nothing else reads them; then the
    value and the time are packed in a complex, and a record whose value
    or time is not a float ends the loop: the ordered form takes it).
    A record of another source than ``src`` ends it too, unless not
    ``checked``: the batch says all its records come from ``src``.

    A record is unchanged when its value is within the thresholds of the
    last emitted one (the same arithmetic as ``_filter_ordered``) and no
    heartbeat is due. Validity is checked only where a value is about to be
    stored: an invalid value never passes for unchanged (NaN fails every
    comparison; a value <= 0 is checked explicitly when the thresholds
    could let it through) so it always reaches that check.
    """
    d = "(v - lv if v >= lv else lv - v)"
    if rel == 0 and abs_ == 0:
        unchanged = "v == lv"
    elif abs_ == 0:
        unchanged = f"{d} < rel * lv" + (" and v > 0.0" if rel > 1 else "")
    elif rel == 0:
        unchanged = f"{d} < abs_ and v > 0.0"
    else:
        unchanged = f"(d := {d}) < rel * lv and d < abs_" + (" and v > 0.0" if rel > 1 else "")
    if hb is None:
        load, store = "lv = vals[r.symbol]", "vals[r.symbol] = v"
    else:
        load = "lv = (c := vals[r.symbol]).real"
        unchanged += " and not (r.ts - c.imag >= hb)"
        store = ("if v.__class__ is not float or (t := r.ts).__class__ is not float:\n"
                 "                return out, bad, r\n"
                 "            vals[r.symbol] = complex(v, t)")
    for name, x in (("rel", rel), ("abs_", abs_), ("hb", hb)):  # constants, not globals
        if x.__class__ in (float, int) and math.isfinite(x):
            unchanged = re.sub(rf"\b{name}\b", repr(x), unchanged)
    namespace: dict[str, Any] = {"rel": rel, "abs_": abs_, "hb": hb, "inf": math.inf}
    code = _FAST_LOOP.format(unchanged=unchanged, load=load, store=store,
                             check=_SOURCE_CHECK if checked else "")
    exec(code, namespace)
    return namespace["loop"]


def _tick_key(record: Any) -> Hashable:
    return (record.source, record.symbol)


def _tick_value(record: Any) -> float:
    return record.price


def _tick_time(record: Any) -> float:
    return record.ts


class ChangeDetector:
    """A stage that drops records whose value has not moved.

    ```python
    ChangeDetector(rel=0.0005, heartbeat=60.0)
    ```

    Parameters:
        rel: emit when ``|v - last| >= rel * |last|`` (0 disables).
        abs: emit when ``|v - last| >= abs`` (0 disables).
        heartbeat: emit when this many seconds (of record time) passed since
            the key last emitted; ``None`` disables.
        max_keys: most keys remembered; past it a key is evicted: the least
            recently seen once recency is tracked (from the first key when
            ``max_keys`` < 1024, else from three quarters of ``max_keys``),
            keys not seen since then first, oldest stored first.
        key: function of a record giving its key (default: ``Tick``'s
            (source, symbol)). Keys must be msgpack-encodable (str, numbers,
            tuples of them) for checkpoints.
        value: function of a record giving the value compared (default: price).
        time: function of a record giving its time (default: ts).
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
        # Recency (for eviction) is tracked once the state holds this many
        # keys: before that, nothing can be evicted soon and a hit costs
        # nothing (see the module docstring).
        self._track_from = _track_from(max_keys)
        self._fast_cache: tuple[Any, Any, Any] | None = None
        self._clear()
        # what the checkpoint holds: the state as of the batches acked so far
        self.acked: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        self._unacked: deque[list[Any]] = deque()  # [emitted records, outcome], in order
        self._closing = False
        self._drops = DropLog(f"flows.stage.{name}")
        self._fresh = False
        self._restored = False
        self._feeds: dict[Any, Any] = {}

    def watch_changes(self, source: str, feed: Any) -> None:
        """Call ``feed.note_change(symbol, value)`` for every record of
        ``source`` this stage emits (the runtime links adaptive schedules,
        ``flows.AdaptiveSchedule``)."""
        self._feeds[source] = feed

    def _tell_feeds(self, records: list[Any]) -> None:
        feeds, value_of = self._feeds, self.value
        for r in records:
            feed = feeds.get(getattr(r, "source", None))
            if feed is not None:
                feed.note_change(getattr(r, "symbol", None), value_of(r))

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
        self._load(entries)
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

    # -- the state ---------------------------------------------------------
    #
    # Three forms hold the same thing (key -> last emitted value and its
    # time, least recently seen first):
    #
    # - the *plain* form, while nothing can be evicted soon (the state holds
    #   fewer than ``_track_from`` keys) and every key so far came from one
    #   source with the default Tick accessors: ``_vals``, a plain dict in
    #   insertion order, symbol -> the value alone (no heartbeat: the time
    #   is not kept) or, with a heartbeat, the value and its time packed in
    #   a complex (the form holds floats only: anything else moves the
    #   state to the ordered form), filtered by a loop made for the
    #   thresholds (``_fast_loop``);
    # - otherwise an *ordered* form in ``_od``. Without a heartbeat it is
    #   *ranked*: a plain dict key -> the value and a sequence number packed
    #   in a complex (a (value, seq) tuple when the value is not a float),
    #   the time not kept. Seqs come from a per-detector counter: a new key
    #   takes the next, and so does a key seen while recency is tracked (in
    #   place: a hit moves nothing), so the least recently seen key has the
    #   smallest seq. Eviction pops ``_oldest``, a list of the keys with the
    #   smallest seqs made in one pass over the dict when it is empty (all
    #   keys with a seq <= ``_oldest_upto``, most recent first), skipping
    #   keys seen since (their seq is larger now): it stays exact, as every
    #   key outside the list, or new since, has a larger seq. With a
    #   heartbeat (three numbers per key) it is *timed ranked*: the same
    #   dict plus ``_times``, an array('d') of emit times indexed by seq (a
    #   new key or a tracked hit takes the next seq and appends its time, a
    #   hit copying the time of its old seq; an emit before ``_track_from``
    #   keeps its seq and writes its time in place; ``_filter_timed``).
    #   Once the array holds more than four times the keys (plus 64) the seqs
    #   are renumbered 0..len-1 in the same order and the dead times
    #   dropped (``_renumber``; the eviction candidates go). A time that
    #   is not a float (an int, a datetime from a custom ``time``) moves it
    #   to an OrderedDict key -> packed (value, time) (``_pack``: a complex
    #   when both are floats; the value alone when its time was not kept;
    #   else a tuple), kept in least-recently-seen order, as is a ranked
    #   form the heartbeat is turned on for (its keys' times were not kept:
    #   they count as never emitted). Turning the heartbeat off drops the
    #   times (timed ranked -> ranked) or moves the OrderedDict to ranked.
    #
    # ``_src`` is the source of every key when keys are bare symbols (the
    # default accessors, one source), else None and keys are whole keys.

    def _clear(self) -> None:
        self._vals: dict[Hashable, Any] = {}
        self._timed = self.heartbeat is not None  # _vals holds (value, time) complexes
        self._od: dict[Hashable, Any] | None = None  # ranked (a dict) or an OrderedDict
        self._times: array[float] | None = None  # the timed ranked form's times, by seq
        self._src: Any = None
        self._next_seq = 0.0  # (a float: exact to 2**53 records)
        self._oldest: list[Hashable] = []
        self._oldest_upto = -math.inf
        self._deleted = 0  # evictions since the ranked dict was built
        self._built_size = 0  # sys.getsizeof of the ranked dict when built

    @property
    def state(self) -> OrderedDict[Hashable, list[Any]]:
        """A copy of the state: key -> [last emitted value, its time], least
        recently seen first (for inspection and tests; not kept up to date).
        The time is None where it was not kept (no heartbeat)."""
        src, od = self._src, self._od
        if od is None:
            return OrderedDict(((src, s), list(_unpack(c))) for s, c in self._vals.items())
        if od.__class__ is dict:  # ranked
            by_seq = sorted(od.items(), key=lambda kc: _seq_of(kc[1]))
            times = self._times
            return OrderedDict(
                (k if src is None else (src, k),
                 [_value_of(c), None if times is None else times[int(_seq_of(c))]])
                for k, c in by_seq
            )
        return OrderedDict(
            (k if src is None else (src, k), list(_unpack(c))) for k, c in od.items()
        )

    def _size(self) -> int:
        return len(self._vals) if self._od is None else len(self._od)

    def _load(self, entries: list[tuple[Hashable, float, float]]) -> None:
        """Replace the state with ``entries`` (most recently seen first)."""
        self._clear()
        sources = {k[0] for k, _, _ in entries if isinstance(k, tuple) and len(k) == 2}
        single = (
            self._default_accessors() and len(sources) == 1
            and all(isinstance(k, tuple) and len(k) == 2 for k, _, _ in entries)
        )
        if single:
            timed = self._timed
            # (keys are (source, symbol) tuples, checked above)
            vals = {k[1]: _pack(v, t if timed else None) for k, v, t in reversed(entries)}  # type: ignore[index]
            single = not timed or all(c.__class__ is complex for c in vals.values())
        if single:
            self._src, self._vals = next(iter(sources)), vals
        elif self.heartbeat is None:  # (a key twice: its first place, its last value)
            self._od = self._ranked({k: v for k, v, _ in reversed(entries)}.items())
        elif all(t.__class__ is float for _, _, t in entries):
            latest = {k: (v, t) for k, v, t in reversed(entries)}
            self._ranked_timed((k, v, t) for k, (v, t) in latest.items())
        else:
            self._new_ordered(OrderedDict((k, _pack(v, t)) for k, v, t in reversed(entries)))
        while self._size() > self.max_keys:  # a restore reads no more than max_keys
            self._evict_oldest()

    def _default_accessors(self) -> bool:
        return self.key is _tick_key and self.value is _tick_value and self.time is _tick_time

    def _ranked(self, pairs: Iterable[tuple[Hashable, Any]]) -> dict[Hashable, Any]:
        """A new ranked form of (key, value) ``pairs``, least recently seen first."""
        seq = self._next_seq
        ranked: dict[Hashable, Any] = {}
        for k, v in pairs:
            ranked[k] = complex(v, seq) if v.__class__ is float else (v, seq)
            seq += 1.0
        self._next_seq = seq
        return self._new_ordered(ranked)

    def _ranked_timed(self, entries: Iterable[tuple[Hashable, Any, float]]) -> dict[Hashable, Any]:
        """A new timed ranked form of (key, value, float time) ``entries``,
        least recently seen first (seqs from 0: the times array's indexes)."""
        ranked: dict[Hashable, Any] = {}
        times = array("d")
        put = times.append
        seq = 0.0
        for k, v, t in entries:
            ranked[k] = complex(v, seq) if v.__class__ is float else (v, seq)
            put(t)
            seq += 1.0
        self._next_seq = seq
        return self._new_ordered(ranked, times)

    def _new_ordered(self, od: dict[Hashable, Any], times: array[float] | None = None,
                     ) -> dict[Hashable, Any]:
        """``od`` as the ordered form (a new dict: no eviction candidates
        yet), with ``times`` when it is the timed ranked form."""
        self._od, self._times = od, times
        self._oldest, self._deleted, self._built_size = [], 0, sys.getsizeof(od)
        return od

    def _to_ordered(self, *, whole_keys: bool) -> dict[Hashable, Any]:
        """Move to the ordered form that fits the heartbeat (ranked without
        one), keys becoming whole keys if ``whole_keys``."""
        od, src = self._od, self._src
        rekey = whole_keys and src is not None
        ranked = self.heartbeat is None
        if ranked and self._times is not None:  # the heartbeat was turned off: times unread
            self._times = None
        if od is None:
            items: Iterable[tuple[Hashable, Any]] = self._vals.items()
            if not ranked and all(c.__class__ is complex for c in self._vals.values()):
                self._vals = {}
                od = self._ranked_timed((((src, k) if rekey else k, c.real, c.imag)
                                         for k, c in items))
                if whole_keys:
                    self._src = None
                return od
            self._vals = {}
        elif (od.__class__ is dict and self._times is None) != ranked:  # heartbeat on or off
            items = od.items() if ranked else sorted(od.items(), key=lambda kc: _seq_of(kc[1]))
        elif rekey:  # same form, whole keys
            if od.__class__ is dict:
                od = self._new_ordered({(src, k): c for k, c in od.items()}, self._times)
            else:
                od = self._new_ordered(OrderedDict(((src, k), c) for k, c in od.items()))
            self._src = None
            return od
        else:
            return od
        pairs = (((src, k) if rekey else k, c) for k, c in items)
        if ranked:
            od = self._od = self._ranked((k, _value_of(c)) for k, c in pairs)
        elif self._od is None:  # from the plain form: packed as the ordered one is
            od = self._new_ordered(OrderedDict(pairs))
        else:  # from the ranked form: no times were kept
            od = self._new_ordered(OrderedDict((k, _value_of(c)) for k, c in pairs))
        if whole_keys:
            self._src = None
        return od

    def _evict_oldest(self) -> None:
        od = self._od
        if od is None:
            del self._vals[next(iter(self._vals))]
        elif isinstance(od, OrderedDict):
            od.popitem(last=False)
        else:  # (only a _load past max_keys, which a restore never reads)
            del od[min(od, key=lambda k: _seq_of(od[k]))]

    def _make_room(self, ranked: dict[Hashable, Any], oldest: list[Hashable], upto: float,
                   ) -> tuple[int, list[Hashable], float]:
        """Evict the least recently seen keys of ``ranked`` until a new key
        fits: (keys evicted, the candidate list and its bound, refilled
        when it ran out)."""
        evicted, get = 0, ranked.get
        while len(ranked) >= self.max_keys:
            if not oldest:
                oldest, upto = self._refill_oldest(ranked), self._oldest_upto
            old = oldest.pop()
            c = get(old)
            if c is not None and (c.imag if c.__class__ is complex else c[1]) <= upto:  # else seen since
                del ranked[old]
                evicted += 1
        return evicted, oldest, upto

    def _refill_oldest(self, ranked: dict[Hashable, Any]) -> list[Hashable]:
        """Make the eviction candidates again: the list of keys with the
        smallest seqs (``_OLDEST_SHARE``; sets ``_oldest_upto``)."""
        want = max(_OLDEST_AT_LEAST, len(ranked) // _OLDEST_SHARE)
        self._oldest, self._oldest_upto = _oldest_keys(ranked, want)
        return self._oldest

    def _compact(self, od: dict[Hashable, Any], evicted: int) -> None:
        """The ordered form ``od`` after ``evicted`` more evictions: copied
        when deletions have inflated it (a dict that had deletions grows to
        three times its keys when its entries run out; a copy holds them in
        1.5x-3x)."""
        self._deleted += evicted
        if self._deleted * _REBUILD_AFTER < len(od) or sys.getsizeof(od) <= self._built_size:
            return
        oldest, upto = self._oldest, self._oldest_upto
        self._new_ordered(od.__class__(od), self._times)  # (an OrderedDict keeps its order)
        self._oldest, self._oldest_upto = oldest, upto  # (the same keys and seqs)

    # -- filtering -----------------------------------------------------------

    def filter(self, records: list[Any], metrics: ComponentMetrics | None = None, *,
               source: str | None = None) -> list[Any]:
        """The records of ``records`` that must be emitted; updates the state.

        ``source``: the source of every record, when the caller knows it
        (a batch's ``source``); the records are then not checked one by one
        (the first and the last are).
        """
        if not records:
            return []
        default = self._default_accessors()
        if self._od is None and self._timed != (self.heartbeat is not None):
            self._retime()
        if self._od is None:
            if not self._vals:
                self._src = records[0].source if default else None
            if default and len(self._vals) < self._track_from:
                src = self._src
                trusted = (source is not None and source == src == records[0].source
                           == records[-1].source)
                out, bad, stop = self._fast(trusted)(records, src, self._vals, self._track_from - 1)
                invalid, evicted = 0 if bad is None else len(bad), 0
                if stop is not None:  # another source, or recency needed from here on
                    at = next(i for i, r in enumerate(records) if r is stop)
                    more, invalid2, evicted = self._filter_ordered(records, at, default)
                    out += more
                    invalid += invalid2
                for r in bad or ():
                    self._invalid((r.source, r.symbol), r.price)
            else:
                self._to_ordered(whole_keys=not default)
                out, invalid, evicted = self._filter_ordered(records, 0, default)
        else:
            if not default and self._src is not None:
                self._to_ordered(whole_keys=True)
            out, invalid, evicted = self._filter_ordered(records, 0, default)
        if metrics is not None:
            if invalid:
                metrics.discarded("invalid", invalid)
            if evicted:
                metrics.discarded("evicted", evicted)
            unchanged = len(records) - len(out) - invalid
            if unchanged:
                metrics.discarded("unchanged", unchanged)
        return out

    def _retime(self) -> None:
        """The heartbeat was turned on or off after the start: pack or
        unpack the plain form's values (keys whose time was not kept count
        as never emitted); a value that is not a float moves the state to
        the ordered form."""
        vals = self._vals
        self._timed = timed = self.heartbeat is not None
        if not timed:
            self._vals = {s: c.real for s, c in vals.items()}
        elif all(v.__class__ is float for v in vals.values()):
            self._vals = {s: complex(v, -math.inf) for s, v in vals.items()}
        else:
            self._to_ordered(whole_keys=False)

    def _fast(self, trusted: bool) -> Callable[..., tuple[list[Any], list[Any] | None, Any]]:
        """The plain form's loop for the thresholds (``trusted``: one that
        does not check each record's source)."""
        loops = self._fast_cache
        if loops is None or loops[0] != (self.rel, self.abs, self.heartbeat):
            loops = self._fast_cache = (
                (self.rel, self.abs, self.heartbeat),
                _fast_loop(self.rel, self.abs, self.heartbeat),
                _fast_loop(self.rel, self.abs, self.heartbeat, checked=False),
            )
        return loops[2] if trusted else loops[1]

    def _invalid(self, key: Hashable, value: Any) -> None:
        self._drops.drop("invalid", f"{key!r}: value {value!r} is not a positive number")

    def _filter_ordered(self, records: list[Any], start: int, default: bool) -> tuple[list[Any], int, int]:
        """``filter`` on the ordered form, from ``records[start]`` on: any
        record type, any number of sources, eviction."""
        od = self._to_ordered(whole_keys=False)
        if not isinstance(od, OrderedDict):
            if self._times is not None:
                return self._filter_timed(od, records, start, default)
            return self._filter_ranked(od, records, start, default)
        key_of, value_of, time_of = self.key, self.value, self.time
        rel, abs_, hb = self.rel, self.abs, self.heartbeat
        exact = rel == 0 and abs_ == 0
        track_from, max_keys = self._track_from, self.max_keys
        src = self._src
        inf = math.inf
        out: list[Any] = []
        append = out.append
        invalid = evicted = 0
        get, touch = od.get, od.move_to_end
        tracking = len(od) >= track_from  # (the state only grows: recomputed on inserts)
        k: Any
        for r in records if start == 0 else records[start:]:
            if default:
                v = r.price
                if src is None:
                    k = (r.source, r.symbol)
                elif r.source is src or r.source == src:
                    k = r.symbol
                else:  # a second source: keys become whole keys
                    whole = self._to_ordered(whole_keys=True)
                    assert isinstance(whole, OrderedDict)
                    od = whole
                    get, touch, src = od.get, od.move_to_end, None
                    k = (r.source, r.symbol)
            else:
                v = value_of(r)
                k = key_of(r)
            if not 0 < v < inf:  # NaN fails too
                invalid += 1
                self._invalid(k if src is None else (src, k), v)
                continue
            c = get(k)
            if c is None:
                while len(od) >= max_keys:
                    od.popitem(last=False)
                    evicted += 1
                t = r.ts if default else time_of(r)
                od[k] = complex(v, t) if v.__class__ is float and t.__class__ is float else (v, t)
                append(r)
                tracking = len(od) >= track_from
                continue
            if tracking:
                touch(k)
            cls = c.__class__
            lv = c[0] if cls is tuple else c.real  # complex, or a bare value (time not kept)
            d = v - lv if v >= lv else lv - v
            if (d != 0 if exact else ((rel and d >= rel * lv) or (abs_ and d >= abs_))) or (
                hb is not None
                and (r.ts if default else time_of(r)) - _time_of(c, cls) >= hb
            ):
                t = r.ts if default else time_of(r)
                od[k] = complex(v, t) if v.__class__ is float and t.__class__ is float else (v, t)
                append(r)
        if evicted:
            self._compact(od, evicted)
        return out, invalid, evicted

    def _filter_ranked(
        self, od: dict[Hashable, Any], records: list[Any], start: int, default: bool,
    ) -> tuple[list[Any], int, int]:
        """``_filter_ordered`` on the ranked form (no heartbeat: times are
        not read)."""
        key_of, value_of = self.key, self.value
        rel, abs_ = self.rel, self.abs
        exact = rel == 0 and abs_ == 0
        track_from, max_keys = self._track_from, self.max_keys
        src = self._src
        inf = math.inf
        out: list[Any] = []
        append = out.append
        invalid = evicted = 0
        get = od.get
        tracking = len(od) >= track_from  # (the state only grows: recomputed on inserts)
        seq = complex(0.0, self._next_seq)  # (x + seq: complex(x, seq) for a float x, faster)
        oldest, upto = self._oldest, self._oldest_upto
        cx, flt = complex, float
        k: Any
        try:
            for r in records if start == 0 else records[start:]:
                if default:
                    v = r.price
                    if src is None:
                        k = (r.source, r.symbol)
                    elif r.source is src or r.source == src:
                        k = r.symbol
                    else:  # a second source: keys become whole keys
                        od = self._to_ordered(whole_keys=True)
                        get, src, oldest = od.get, None, self._oldest
                        k = (r.source, r.symbol)
                else:
                    v = value_of(r)
                    k = key_of(r)
                if not 0 < v < inf:  # NaN fails too
                    invalid += 1
                    self._invalid(k if src is None else (src, k), v)
                    continue
                c = get(k)
                if c is None:
                    if len(od) >= max_keys:  # evict the least recently seen
                        n, oldest, upto = self._make_room(od, oldest, upto)
                        evicted += n
                    od[k] = v + seq if v.__class__ is flt else (v, seq.imag)
                    seq += 1j
                    append(r)
                    tracking = len(od) >= track_from
                    continue
                cls = c.__class__
                lv = c.real if cls is cx else c[0]
                d = v - lv if v >= lv else lv - v
                if not (d != 0 if exact else ((rel and d >= rel * lv) or (abs_ and d >= abs_))):
                    if tracking:  # seen: the next seq, in place
                        od[k] = lv + seq if cls is cx else (lv, seq.imag)
                        seq += 1j
                    continue
                append(r)
                if tracking:
                    od[k] = v + seq if v.__class__ is flt else (v, seq.imag)
                    seq += 1j
                else:
                    at = c.imag if cls is cx else c[1]
                    od[k] = cx(v, at) if v.__class__ is flt else (v, at)
        finally:
            self._next_seq = seq.imag
        if evicted:
            self._compact(od, evicted)
        return out, invalid, evicted

    def _filter_timed(
        self, od: dict[Hashable, Any], records: list[Any], start: int, default: bool,
    ) -> tuple[list[Any], int, int]:
        """``_filter_ranked`` with a heartbeat: the timed ranked form (the
        emit times in ``_times``, indexed by seq). A record whose time is not
        a float moves the state to the ``OrderedDict`` form, which takes it
        and the rest of the batch."""
        key_of, value_of, time_of = self.key, self.value, self.time
        rel, abs_, hb = self.rel, self.abs, self.heartbeat
        exact = rel == 0 and abs_ == 0
        track_from, max_keys = self._track_from, self.max_keys
        src = self._src
        inf = math.inf
        out: list[Any] = []
        append = out.append
        invalid = evicted = 0
        get = od.get
        tracking = len(od) >= track_from  # (the state only grows: recomputed on inserts)
        times = self._times
        assert times is not None and hb is not None  # (_to_ordered drops the times without one)
        put = times.append
        seq = complex(0.0, len(times))  # (the next seq is the next index in times)
        oldest, upto = self._oldest, self._oldest_upto
        cx, flt = complex, float
        stop = None
        k: Any
        try:
            for i, r in enumerate(records if start == 0 else records[start:], start):
                if default:
                    v = r.price
                    if src is None:
                        k = (r.source, r.symbol)
                    elif r.source is src or r.source == src:
                        k = r.symbol
                    else:  # a second source: keys become whole keys (times kept)
                        od = self._to_ordered(whole_keys=True)
                        get, src, oldest = od.get, None, self._oldest
                        k = (r.source, r.symbol)
                else:
                    v = value_of(r)
                    k = key_of(r)
                if not 0 < v < inf:  # NaN fails too
                    invalid += 1
                    self._invalid(k if src is None else (src, k), v)
                    continue
                t = r.ts if default else time_of(r)
                if t.__class__ is not flt:
                    stop = i
                    break
                c = get(k)
                if c is None:
                    if len(od) >= max_keys:  # evict the least recently seen
                        n, oldest, upto = self._make_room(od, oldest, upto)
                        evicted += n
                    od[k] = v + seq if v.__class__ is flt else (v, seq.imag)
                    put(t)
                    seq += 1j
                    append(r)
                    tracking = len(od) >= track_from
                    continue
                if c.__class__ is cx:
                    lv, at = c.real, c.imag
                else:
                    lv, at = c
                d = v - lv if v >= lv else lv - v
                if not (d != 0 if exact else ((rel and d >= rel * lv) or (abs_ and d >= abs_))) \
                        and not (t - times[int(at)] >= hb):
                    if tracking:  # seen: the next seq, its time copied
                        od[k] = lv + seq if c.__class__ is cx else (lv, seq.imag)
                        put(times[int(at)])
                        seq += 1j
                    continue
                append(r)
                if tracking:
                    od[k] = v + seq if v.__class__ is flt else (v, seq.imag)
                    put(t)
                    seq += 1j
                else:  # (its seq kept: its time replaced in place)
                    od[k] = cx(v, at) if v.__class__ is flt else (v, at)
                    times[int(at)] = t
        finally:
            self._next_seq = seq.imag
        if stop is not None:  # a time that is not a float
            self._untime(od, times)
            more, invalid2, evicted2 = self._filter_ordered(records, stop, default)
            return out + more, invalid + invalid2, evicted + evicted2
        if len(times) > _RENUMBER_FACTOR * len(od) + _RENUMBER_SLACK:
            self._renumber(od, times)
        if evicted:
            self._compact(od, evicted)
        return out, invalid, evicted

    def _renumber(self, od: dict[Hashable, Any], times: array[float]) -> None:
        """Number the timed ranked form's seqs 0..len-1 again (in the same
        order) and drop the times of seqs no key holds; the eviction
        candidates go (their seqs changed)."""
        try:  # (C-level maps: a loop per key in Python would double a hit's cost)
            order = sorted(map(_IMAG, od.values()))
            rank = dict(zip(order, map(float, range(len(order)))))
            values: list[Any] = list(map(complex, map(_REAL, od.values()),
                                         map(rank.__getitem__, map(_IMAG, od.values()))))
        except AttributeError:  # not all complexes: some (value, seq) tuples
            order = sorted(map(_seq_of, od.values()))
            rank = dict(zip(order, map(float, range(len(order)))))
            values = [complex(c.real, rank[c.imag]) if c.__class__ is complex else (c[0], rank[c[1]])
                      for c in od.values()]
        od.update(zip(list(od), values))  # (the same keys: the dict keeps its size)
        self._times = array("d", map(times.__getitem__, map(int, order)))
        self._next_seq = float(len(order))
        self._oldest, self._oldest_upto = [], -math.inf

    def _untime(self, od: dict[Hashable, Any], times: array[float]) -> None:
        """The timed ranked form as the ``OrderedDict`` form (a time that is
        not a float came)."""
        by_seq = sorted(od.items(), key=lambda kc: _seq_of(kc[1]))
        self._new_ordered(OrderedDict(
            (k, _pack(_value_of(c), times[int(_seq_of(c))])) for k, c in by_seq))

    @property
    def inline(self) -> bool:
        """Whether the runtime may run ``process`` in the producer's task
        (``flows.InlinePort``): yes, unless a checkpoint needs the stage's
        own task (restore before the first batch, saves while running)."""
        return self.checkpoint is None

    def process(self, batch: Batch, metrics: ComponentMetrics | None = None) -> Batch:
        """The batch to send on for ``batch``: its records that must be
        emitted (``filter``), with its ack hooks (tracked for the checkpoint)."""
        kept = self.filter(batch.records, metrics, source=batch.source)
        if self._feeds and kept:
            self._tell_feeds(kept)
        out = batch.replace(kept)
        if self.checkpoint is not None and kept:
            self._track(out)
        return out

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
                await outbox.send(self.process(batch, metrics))  # an empty batch is acked "skipped"
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
