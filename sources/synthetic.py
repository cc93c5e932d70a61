"""A synthetic market: random-walk prices (``SyntheticMarket``) and trades
(``SyntheticTrades``) for a universe of symbols. Talks to nothing.

The reference (parameters, metrics, example output) is the docs page
``docs/sources/synthetic.md``.
"""

from __future__ import annotations

import math
import random
import string
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from flows import Batch, Outbox, RunContext, Tick, Trade

__all__ = ["SyntheticMarket", "SyntheticTrades", "make_symbols"]

_MAJORS = ["BTC", "ETH", "SOL", "XRP", "ADA", "DOGE", "DOT", "AVAX", "LINK", "LTC"]


def make_symbols(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct, deterministic ticker names such as ``BTCUSDT``."""
    rng = random.Random(f"symbols-{seed}")
    bases = list(_MAJORS[:n])
    seen = set(bases)
    while len(bases) < n:
        base = "".join(rng.choices(string.ascii_uppercase, k=rng.choice((3, 4))))
        if base not in seen:
            seen.add(base)
            bases.append(base)
    return [b + "USDT" for b in bases]


def _positive(instance, attribute, value) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


@attrs.define(kw_only=True)
class SyntheticMarket:
    """Source: a random-walk market.

    Parameters:
        symbols: how many symbols (named deterministically), or their names.
        interval: seconds between ticks of the whole universe; 0 ticks as
            fast as the flow takes them.
        unchanged: share of symbols whose price does not move on a tick.
        volatility: standard deviation of a moving symbol's log-return.
        batch_size: most records per batch (a tick is split into batches).
        limit: stop after this many records (``None``: run forever).
        seed: makes prices deterministic.
        name: the actor's name; also the ``source`` field of every Tick.
    """

    symbols: int | list[str] = 300
    interval: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    unchanged: float = attrs.field(
        default=0.6, validator=[attrs.validators.ge(0), attrs.validators.le(1)]
    )
    volatility: float = attrs.field(default=0.001, validator=attrs.validators.ge(0))
    batch_size: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    limit: int | None = None
    seed: int = 0
    name: str = "synthetic"
    emitted: int = attrs.field(default=0, init=False)
    _names: list[str] = attrs.field(init=False)
    _prices: list[float] = attrs.field(init=False)
    _rng: random.Random = attrs.field(init=False)
    _last_ts: float = attrs.field(default=0.0, init=False)

    def __attrs_post_init__(self) -> None:
        if isinstance(self.symbols, int):
            if self.symbols < 1:
                raise ValueError("symbols must be >= 1")
            self._names = make_symbols(self.symbols, self.seed)
        else:
            self._names = list(self.symbols)
            if not self._names:
                raise ValueError("symbols must not be empty")
        self._rng = random.Random(self.seed)
        self._prices = [round(self._rng.lognormvariate(3.0, 2.0), 6) + 0.01 for _ in self._names]

    def setup(self, context: RunContext) -> None:
        """Keep only this process's shard of the universe (``--shard k/N``)."""
        if context.shard is not None:
            keep = set(context.shard.select(self._names))
            pairs = [(n, p) for n, p in zip(self._names, self._prices) if n in keep]
            self._names = [n for n, _ in pairs]
            self._prices = [p for _, p in pairs]

    def tick(self) -> list[Tick]:
        """One tick of the whole universe (advances the random walk)."""
        rng, prices, vol, still = self._rng, self._prices, self.volatility, self.unchanged
        ts = max(time.time(), self._last_ts + 1e-6)
        self._last_ts = ts
        src = self.name
        out = []
        for i, symbol in enumerate(self._names):
            if rng.random() >= still:
                prices[i] = round(prices[i] * math.exp(rng.gauss(0.0, vol)), 8)
            out.append(Tick(src, symbol, prices[i], ts))
        return out

    async def run(self, outbox: Outbox) -> None:
        await _emit(self, self.tick, outbox)


@attrs.define(kw_only=True)
class SyntheticTrades:
    """Source: random-walk trades (``Trade`` records).

    Parameters:
        symbols: how many symbols (named deterministically), or their names.
        interval: seconds between rounds of trades (0: as fast as the flow
            takes them).
        active: share of symbols that trade in a round.
        burst: most trades a symbol makes in a round.
        volatility: standard deviation of a trade's log-return.
        disorder: a trade's time is up to this many seconds before the
            round's (arrival out of time order).
        batch_size: most records per batch.
        limit: stop after this many trades (``None``: run forever).
        seed: makes prices, sizes and sides deterministic.
        name: the actor's name; also the ``source`` field of every Trade.
    """

    symbols: int | list[str] = 50
    interval: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    active: float = attrs.field(default=0.5, validator=[attrs.validators.ge(0), attrs.validators.le(1)])
    burst: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    volatility: float = attrs.field(default=0.0005, validator=attrs.validators.ge(0))
    disorder: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    batch_size: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    limit: int | None = None
    seed: int = 0
    name: str = "synthetic_trades"
    emitted: int = attrs.field(default=0, init=False)
    _market: SyntheticMarket = attrs.field(init=False)
    _next_id: int = attrs.field(default=1, init=False)

    def __attrs_post_init__(self) -> None:
        self._market = SyntheticMarket(symbols=self.symbols, seed=self.seed, name=self.name)

    def setup(self, context: RunContext) -> None:
        """Keep only this process's shard of the universe (``--shard k/N``)."""
        self._market.setup(context)

    def trades(self, now: float | None = None) -> list[Trade]:
        """One round of trades at epoch time ``now`` (default: the wall clock)."""
        market = self._market  # its private state: trades walk the same prices
        rng = market._rng  # noqa: SLF001
        now = time.time() if now is None else now
        src, vol, out = self.name, self.volatility, []
        for i, symbol in enumerate(market._names):  # noqa: SLF001
            if rng.random() >= self.active:
                continue
            for _ in range(rng.randint(1, self.burst)):
                step = math.exp(rng.gauss(0.0, vol))
                price = market._prices[i] = round(market._prices[i] * step, 8)  # noqa: SLF001
                ts = now - rng.uniform(0.0, self.disorder) if self.disorder else now
                out.append(Trade(src, symbol, price, round(rng.lognormvariate(0.0, 1.0), 6), ts,
                                 "buy" if rng.random() < 0.5 else "sell", str(self._next_id)))
                self._next_id += 1
        return out

    async def run(self, outbox: Outbox) -> None:
        await _emit(self, self.trades, outbox)


async def _emit(source: Any, make: Callable[[], list[Any]], outbox: Outbox) -> None:
    """Send what ``make()`` returns every ``source.interval`` seconds (0: as
    fast as the flow takes it), in batches of ``source.batch_size``, until
    ``source.limit`` records went out (None: for ever)."""
    metrics = outbox.metrics
    deadline = trio.current_time()
    while source.limit is None or source.emitted < source.limit:
        cycle_start = time.perf_counter()
        with metrics.timed_batch():
            records = make()
            if source.limit is not None:
                records = records[: source.limit - source.emitted]
        for i in range(0, len(records), source.batch_size):
            chunk = records[i : i + source.batch_size]
            await outbox.send(Batch(chunk, source=source.name))
            source.emitted += len(chunk)
        metrics.observe_poll_cycle(time.perf_counter() - cycle_start)
        if source.interval:
            deadline = max(deadline + source.interval, trio.current_time())
            await trio.sleep_until(deadline)
        elif not records:
            await trio.lowlevel.checkpoint()  # nothing sent: let the others run
