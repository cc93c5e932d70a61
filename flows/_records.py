"""Records and batches: what flows through a flow."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

__all__ = [
    "MAX_FUTURE_SECONDS",
    "MAX_SYMBOL_LENGTH",
    "MIN_TS",
    "OUTCOMES",
    "AckHook",
    "Batch",
    "Candle",
    "Gap",
    "Tick",
    "Trade",
    "check_symbols",
    "check_tick",
    "screen",
]


class Tick(msgspec.Struct, frozen=True, gc=False):
    """One price observation.

    ``ts`` is the exchange's timestamp in epoch seconds. ``bid``, ``ask`` and
    ``volume`` are optional because not every API sends them.
    """

    source: str
    symbol: str
    price: float
    ts: float
    bid: float | None = None
    ask: float | None = None
    volume: float | None = None


class Trade(msgspec.Struct, frozen=True, gc=False):
    """One trade (a match) at an exchange.

    ``ts`` is the exchange's trade time in epoch seconds; ``size`` is in the
    base asset; ``side`` is the taker's side, ``"buy"`` or ``"sell"``
    (``None`` when the exchange does not say). ``trade_id`` is a string
    because exchanges send ids as numbers, strings or beyond 64 bits.
    """

    source: str
    symbol: str
    price: float
    size: float
    ts: float
    side: str | None = None
    trade_id: str | None = None


class Candle(msgspec.Struct, frozen=True, gc=False):
    """An OHLCV bar: what ``symbol`` at ``source`` did in the window
    [``start``, ``start + width``) (epoch seconds).

    ``volume`` and ``vwap`` are ``None`` for candles built from ticks (no
    sizes); ``trades`` counts the records in the window; ``first_ts`` and
    ``last_ts`` are the times of its first and last record.
    """

    source: str
    symbol: str
    start: float
    width: float
    open: float
    high: float
    low: float
    close: float
    volume: float | None
    trades: int
    vwap: float | None
    first_ts: float
    last_ts: float


class Gap(msgspec.Struct, frozen=True, gc=False):
    """Where a feed was incomplete: ``source`` had no data for ``symbols``
    (``None``: all of them) from ``start`` to ``end`` (epoch seconds), for
    ``reason`` (a small fixed word: ``closed``, ``error``, ``silent``,
    ``timeout``, ``server``, ``server_shutdown`` for a lost or replaced
    connection, ``sequence`` for lost updates, ``poll_failed``,
    ``rate_limited`` (a poll refused, to the end of the pause), ``stale``
    (a symbol polled again after more than ``stale_after`` without data),
    ``circuit_open``, ``unknown_symbol`` for a symbol the API no longer
    knows)."""

    source: str
    symbols: tuple[str, ...] | None
    start: float
    end: float
    reason: str


MIN_TS = 946_684_800.0
"""The earliest ``ts`` a source accepts: 2000-01-01T00:00:00Z (epoch seconds)."""
MAX_FUTURE_SECONDS = 86_400.0
"""How far past the wall clock a ``ts`` may be: one day (clock skew, time zones)."""
MAX_SYMBOL_LENGTH = 64
"""The longest ``symbol`` (and ``source``) a source accepts, in characters."""

_isfinite = math.isfinite


def check_symbols(symbols: Any, name: str) -> list[str]:
    """``symbols`` as a list, checked when a source is built: ValueError
    when it is empty or a single string (``symbols="BTCUSDT"`` would be
    read one character at a time). Sources call it before normalizing the
    names (``name``: the source's, for the message)::

        symbols = [s.upper() for s in check_symbols(symbols, name)]
    """
    if isinstance(symbols, (str, bytes)):
        raise ValueError(f"{name}: symbols must be a list of symbols, not the string {symbols!r} "
                         f"(write [{symbols!r}])")
    out = list(symbols)
    if not out:
        raise ValueError(f"{name}: symbols must not be empty")
    return out


def check_tick(record: Any, now: float | None = None) -> str | None:
    """None when ``record`` is fit to enter a flow, else why not.

    Sources call it on every record they read (the HTTP and websocket
    bases, replay and the Redis stream source do), and count a record that
    fails as discarded with reason ``invalid``. It checks a ``Tick``'s
    fields, and the same fields of another record type where it has them:

    - ``ts``: a finite number of epoch seconds from ``MIN_TS``
      (2000-01-01) to ``now`` (default: the wall clock) plus
      ``MAX_FUTURE_SECONDS`` (one day): NaN, infinities, negative times
      and milliseconds taken for seconds are refused;
    - ``symbol`` and ``source``: strings of 1 to ``MAX_SYMBOL_LENGTH``
      (64) characters;
    - ``price``: a positive finite number; ``bid``, ``ask``, ``volume``:
      ``None`` or finite numbers;
    - a ``Trade``'s ``size``: a positive finite number.

    Pass ``now`` (``time.time()``) when checking a batch, to read the clock
    once.
    """
    hi = (time.time() if now is None else now) + MAX_FUTURE_SECONDS
    if type(record) is Tick:
        try:  # the common case, a good Tick: one expression
            if (MIN_TS <= record.ts <= hi and 0 < len(record.symbol) <= MAX_SYMBOL_LENGTH
                    and 0 < len(record.source) <= MAX_SYMBOL_LENGTH and 0 < record.price < math.inf
                    and (record.bid is None or _isfinite(record.bid))
                    and (record.ask is None or _isfinite(record.ask))
                    and (record.volume is None or _isfinite(record.volume))):
                return None
        except TypeError:
            pass
        ts: Any = record.ts
        price: Any = record.price
        names: tuple[tuple[str, Any], ...] = (("symbol", record.symbol), ("source", record.source))
        extras: tuple[tuple[str, Any], ...] = (
            ("bid", record.bid), ("ask", record.ask), ("volume", record.volume))
    elif type(record) is Trade:
        return _check_trade(record, hi)
    else:
        ts, price = getattr(record, "ts", None), getattr(record, "price", None)
        names = tuple((n, v) for n in ("symbol", "source")
                      if (v := getattr(record, n, None)) is not None)
        extras = tuple((n, getattr(record, n, None)) for n in ("bid", "ask", "volume"))
    if ts is not None or type(record) is Tick:
        try:
            if not MIN_TS <= ts <= hi:
                return f"ts {ts!r} is not a time from 2000-01-01 to tomorrow (epoch seconds)"
        except TypeError:
            return f"ts {ts!r} is not a number"
    for name, value in names:
        if not isinstance(value, str):
            return f"{name} {value!r} is not a string"
        if not 0 < len(value) <= MAX_SYMBOL_LENGTH:
            shown = repr(value) if not value else f"{value[:20]!r}... ({len(value):,} characters)"
            return f"{name} {shown} is not 1 to {MAX_SYMBOL_LENGTH} characters long"
    if price is not None or type(record) is Tick:
        try:
            if not (price > 0 and _isfinite(price)):
                return f"price {price!r} is not a positive number"
        except TypeError:
            return f"price {price!r} is not a number"
    for name, value in extras:
        if value is not None:
            try:
                if not _isfinite(value):
                    return f"{name} {value!r} is not finite"
            except TypeError:
                return f"{name} {value!r} is not a number"
    return None


def _check_trade(record: Trade, hi: float) -> str | None:
    """``check_tick`` for a Trade (``hi``: the latest ``ts`` allowed)."""
    try:  # the common case, a good Trade: one expression
        if (MIN_TS <= record.ts <= hi and 0 < len(record.symbol) <= MAX_SYMBOL_LENGTH
                and 0 < len(record.source) <= MAX_SYMBOL_LENGTH
                and 0 < record.price < math.inf and 0 < record.size < math.inf):
            return None
    except TypeError:
        pass
    why = check_tick(Tick(record.source, record.symbol, record.price, record.ts),
                     hi - MAX_FUTURE_SECONDS)
    if why is not None:
        return why
    size = record.size
    try:
        if not (size > 0 and _isfinite(size)):
            return f"size {size!r} is not a positive number"
    except TypeError:
        return f"size {size!r} is not a number"
    return None


def screen(records: list[Any], now: float | None = None) -> tuple[list[Any], list[str]]:
    """``records`` split by ``check_tick``: (the good ones, why each bad one is bad).

    The hot path of the sources' bases: Ticks are checked inline, and only a
    record that fails is passed to ``check_tick`` for its reason.
    """
    hi = (time.time() if now is None else now) + MAX_FUTURE_SECONDS
    lo, most, isfinite = MIN_TS, MAX_SYMBOL_LENGTH, _isfinite
    bad_at: list[int] = []
    for i, r in enumerate(records):
        try:
            if (type(r) is Tick and lo <= r.ts <= hi and 0 < len(r.symbol) <= most
                    and 0 < len(r.source) <= most and 0 < r.price < math.inf
                    and (r.bid is None or isfinite(r.bid)) and (r.ask is None or isfinite(r.ask))
                    and (r.volume is None or isfinite(r.volume))):
                continue
            if (type(r) is Trade and lo <= r.ts <= hi and 0 < len(r.symbol) <= most
                    and 0 < len(r.source) <= most and 0 < r.price < math.inf
                    and 0 < r.size < math.inf):
                continue
        except TypeError:
            pass
        bad_at.append(i)
    if not bad_at:
        return records, []
    reasons: list[str] = []
    good = records[: bad_at[0]]
    skip = set(bad_at)
    for i in range(bad_at[0], len(records)):
        r = records[i]
        why = check_tick(r, hi - MAX_FUTURE_SECONDS) if i in skip else None
        if why is None:
            good.append(r)
        else:
            reasons.append(why)
    return good, reasons


AckHook = Callable[[str], None]
"""Called once per batch with its outcome, one of ``OUTCOMES``."""

OUTCOMES = ("written", "skipped", "dropped", "failed")
"""What became of a batch: every sink wrote it; a stage dropped all its
records (unchanged, filtered); an edge policy dropped it; a sink gave up on
it. With fan-out, the worst outcome over the sinks wins (failed > dropped >
written; skipped only when nothing was written)."""


class Batch:
    """A list of records moved as one message on a channel.

    ``created`` is the ``time.monotonic()`` at which the source made the
    batch; sinks use it for end-to-end latency. ``acks`` holds the hooks a
    source attached (acknowledgements); derived batches carry them on.
    ``source``, when set, is the ``source`` of every record in the batch:
    a source that builds its records with its own name says so (flows'
    sources do), and change detection then keys them by symbol without
    reading each record's source. Derived batches do not carry it.
    """

    __slots__ = ("acks", "created", "records", "source")

    def __init__(
        self,
        records: list[Any],
        *,
        created: float | None = None,
        acks: Sequence[AckHook] = (),
        source: str | None = None,
    ) -> None:
        self.records = records
        self.created = time.monotonic() if created is None else created
        self.acks: tuple[AckHook, ...] = tuple(acks)
        self.source = source

    def replace(self, records: list[Any]) -> Batch:
        """A batch holding ``records`` with this batch's time and ack hooks.

        The hooks move to the new batch: this one will not call them.
        """
        acks, self.acks = self.acks, ()
        return Batch(records, created=self.created, acks=acks)

    def ack(self, outcome: str) -> None:
        """Call the ack hooks with ``outcome``; at most once per batch."""
        hooks, self.acks = self.acks, ()
        for hook in hooks:
            hook(outcome)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __repr__(self) -> str:
        return f"Batch({len(self.records)} records, acks={len(self.acks)})"
