"""The symbol universe and its random-walk prices, shared by every exchange.

One mid price per asset walks in discrete steps: every ``tick_interval``
seconds of trio's clock (or, with ``tick_interval=0``, once per served
price request). On a step each asset keeps its price with probability
``unchanged`` and otherwise takes a log-normal step of ``volatility``. The
walk is a function of the seed and the step number only, so two emulators
with the same seed serve the same prices at the same step, whatever the
request pattern (up to a catch-up cap after very long idle gaps).

Each exchange sees the mid times a small fixed per-asset basis (USDT and
USD markets do not print the same number), rounded to that exchange's tick.
"""

from __future__ import annotations

import math
import random
import string
import time
from collections.abc import Sequence
from decimal import Decimal

import attrs
import trio

__all__ = ["EXCHANGES", "KNOWN_ASSETS", "Asset", "Market", "Quote", "make_universe"]

EXCHANGES = ("binance", "coinbase", "kraken", "coingecko", "coincap", "okx")

# base, name, start price (USD), Kraken result key, Kraken altname, CoinGecko id, CoinCap slug
KNOWN_ASSETS: tuple[tuple[str, str, float, str, str, str, str], ...] = (
    ("BTC", "Bitcoin", 67000.0, "XXBTZUSD", "XBTUSD", "bitcoin", "bitcoin"),
    ("ETH", "Ethereum", 3500.0, "XETHZUSD", "ETHUSD", "ethereum", "ethereum"),
    ("SOL", "Solana", 150.0, "SOLUSD", "SOLUSD", "solana", "solana"),
    ("XRP", "XRP", 0.6, "XXRPZUSD", "XRPUSD", "ripple", "xrp"),
    ("ADA", "Cardano", 0.45, "ADAUSD", "ADAUSD", "cardano", "cardano"),
    ("DOGE", "Dogecoin", 0.15, "XDGUSD", "XDGUSD", "dogecoin", "dogecoin"),
    ("DOT", "Polkadot", 7.0, "DOTUSD", "DOTUSD", "polkadot", "polkadot"),
    ("AVAX", "Avalanche", 35.0, "AVAXUSD", "AVAXUSD", "avalanche-2", "avalanche"),
    ("LINK", "Chainlink", 15.0, "LINKUSD", "LINKUSD", "chainlink", "chainlink"),
    ("LTC", "Litecoin", 85.0, "XLTCZUSD", "LTCUSD", "litecoin", "litecoin"),
    ("BCH", "Bitcoin Cash", 450.0, "BCHUSD", "BCHUSD", "bitcoin-cash", "bitcoin-cash"),
    ("XLM", "Stellar", 0.11, "XXLMZUSD", "XLMUSD", "stellar", "stellar"),
    ("ATOM", "Cosmos", 8.5, "ATOMUSD", "ATOMUSD", "cosmos", "cosmos"),
    ("UNI", "Uniswap", 9.5, "UNIUSD", "UNIUSD", "uniswap", "uniswap"),
    (
        "ETC",
        "Ethereum Classic",
        27.0,
        "XETCZUSD",
        "ETCUSD",
        "ethereum-classic",
        "ethereum-classic",
    ),
    ("XMR", "Monero", 150.0, "XXMRZUSD", "XMRUSD", "monero", "monero"),
    ("TRX", "TRON", 0.12, "TRXUSD", "TRXUSD", "tron", "tron"),
    ("NEAR", "NEAR Protocol", 6.5, "NEARUSD", "NEARUSD", "near", "near-protocol"),
    ("ZEC", "Zcash", 25.0, "XZECZUSD", "ZECUSD", "zcash", "zcash"),
    ("FIL", "Filecoin", 5.5, "FILUSD", "FILUSD", "filecoin", "filecoin"),
    ("AAVE", "Aave", 95.0, "AAVEUSD", "AAVEUSD", "aave", "aave"),
    ("ALGO", "Algorand", 0.18, "ALGOUSD", "ALGOUSD", "algorand", "algorand"),
    ("SHIB", "Shiba Inu", 0.000025, "SHIBUSD", "SHIBUSD", "shiba-inu", "shiba-inu"),
    ("APT", "Aptos", 9.0, "APTUSD", "APTUSD", "aptos", "aptos"),
    ("ARB", "Arbitrum", 1.1, "ARBUSD", "ARBUSD", "arbitrum", "arbitrum"),
    ("OP", "Optimism", 2.5, "OPUSD", "OPUSD", "optimism", "optimism"),
    ("MKR", "Maker", 2800.0, "MKRUSD", "MKRUSD", "maker", "maker"),
    ("XTZ", "Tezos", 1.0, "XTZUSD", "XTZUSD", "tezos", "tezos"),
    ("EOS", "EOS", 0.8, "EOSUSD", "EOSUSD", "eos", "eos"),
    ("GRT", "The Graph", 0.28, "GRTUSD", "GRTUSD", "the-graph", "the-graph"),
)


@attrs.frozen
class Asset:
    """One base asset and its name on every exchange (quote: USD or USDT)."""

    index: int
    base: str  # "BTC"
    name: str  # "Bitcoin"
    start_price: float
    binance: str  # "BTCUSDT"
    coinbase: str  # "BTC-USD"
    kraken: str  # the result key: "XXBTZUSD" (legacy X/Z names), "SOLUSD"
    kraken_altname: str  # what clients usually ask for: "XBTUSD"
    coingecko: str  # "bitcoin"
    coincap: str  # "bitcoin"
    okx: str  # "BTC-USDT"
    tick: float  # price increment, from the start price's magnitude

    def symbol(self, exchange: str) -> str:
        """The asset's symbol as ``exchange`` reports it in responses."""
        return getattr(self, exchange)

    @property
    def kraken_v2(self) -> str:
        """Kraken's websocket v2 name: ``BTC/USD``, ``DOGE/USD`` (v2 uses the
        common codes, not Kraken's XBT and XDG)."""
        return f"{self.base}/USD"

    def stream_symbol(self, exchange: str) -> str:
        """The asset's symbol on ``exchange``'s websocket feed (Kraken's v2
        name; elsewhere the same as ``symbol``)."""
        return self.kraken_v2 if exchange == "kraken" else self.symbol(exchange)


@attrs.frozen
class Quote:
    """One asset's quote as one exchange serves it (prices rounded to its tick).

    ``time`` is the emulator's wall clock (epoch seconds, following trio's
    clock) when this exchange first quoted the step; ``changed`` the wall
    time of the asset's last price move; ``step`` the walk step. ``fault``
    names the bad-value fault applied to this record when it was served (``None``: served intact).
    """

    exchange: str
    symbol: str
    base: str
    price: Decimal
    bid: Decimal
    ask: Decimal
    bid_size: Decimal
    ask_size: Decimal
    last_size: Decimal
    open: Decimal
    high: Decimal
    low: Decimal
    volume: Decimal  # 24h volume in the base asset
    trades: int  # 24h trade count; also the last trade id
    step: int
    time: float
    changed: float
    fault: str | None = None


def _tick_for(price: float) -> float:
    """About 6-7 significant digits, like the majors' price filters."""
    return 10.0 ** (math.floor(math.log10(price)) - 6)


def make_universe(
    assets: int | Sequence[str] | None = None, *, seed: int = 0
) -> list[Asset]:
    """The asset universe: ``n`` assets (known majors first, then generated
    names), or the given base symbols; deterministic for a seed."""
    if assets is None:
        assets = 50
    known = {row[0]: row for row in KNOWN_ASSETS}
    rng = random.Random(f"universe-{seed}")
    if isinstance(assets, int):
        if assets < 1:
            raise ValueError("assets must be at least 1")
        bases = [row[0] for row in KNOWN_ASSETS[:assets]]
        seen = set(known) | {"USD", "USDT", "USDC", "EUR"}
        while len(bases) < assets:
            base = "".join(rng.choices(string.ascii_uppercase, k=rng.choice((3, 4))))
            if base not in seen:
                seen.add(base)
                bases.append(base)
    else:
        bases = [str(b).upper() for b in assets]
        if not bases or len(set(bases)) != len(bases):
            raise ValueError("assets must be distinct and not empty")
        for base in bases:
            if not base.isalnum():
                raise ValueError(f"asset {base!r}: letters and digits only")
    universe = []
    for index, base in enumerate(bases):
        if base in known:
            _, name, price, kraken, altname, gecko, coincap = known[base]
        else:
            name = base.capitalize() + "coin"
            # log-uniform between a cent and a few hundred dollars
            price = float(f"{10 ** rng.uniform(-2, 2.7):.6g}")
            kraken = altname = base + "USD"
            gecko = coincap = name.lower()
        universe.append(
            Asset(
                index=index,
                base=base,
                name=name,
                start_price=price,
                binance=base + "USDT",
                coinbase=base + "-USD",
                kraken=kraken,
                kraken_altname=altname,
                coingecko=gecko,
                coincap=coincap,
                okx=base + "-USDT",
                tick=_tick_for(price),
            )
        )
    return universe


def _decimals(tick: float) -> int:
    return max(0, -math.floor(math.log10(tick) + 1e-9))


class Market:
    """The random walk: mid prices per asset, advanced lazily on trio's clock."""

    MAX_CATCHUP = 200_000  # asset-steps walked at most per advance

    def __init__(
        self,
        universe: list[Asset],
        *,
        seed: int = 0,
        tick_interval: float = 1.0,
        unchanged: float = 0.6,
        volatility: float = 0.001,
    ) -> None:
        if tick_interval < 0:
            raise ValueError("tick_interval must be >= 0")
        if not 0 <= unchanged <= 1:
            raise ValueError("unchanged must be within [0, 1]")
        if volatility < 0:
            raise ValueError("volatility must be >= 0")
        self.universe = universe
        self.seed = seed
        self.tick_interval = tick_interval
        self.unchanged = unchanged
        self.volatility = volatility
        self._rng = random.Random(f"walk-{seed}")
        basis_rng = random.Random(f"basis-{seed}")
        self._basis = {
            ex: [
                1.0 if ex == "binance" else 1.0 + basis_rng.gauss(0, 2e-4)
                for _ in universe
            ]
            for ex in EXCHANGES
        }
        self.mid = [a.start_price for a in universe]
        # the day opened somewhere near the start price
        self.open = [p * math.exp(basis_rng.gauss(0, 0.02)) for p in self.mid]
        self.high = [max(p, o) * 1.01 for p, o in zip(self.mid, self.open)]
        self.low = [min(p, o) * 0.99 for p, o in zip(self.mid, self.open)]
        self.trades = [10_000 + (a.index * 7919) % 90_000 for a in universe]
        self.changed_step = [0] * len(universe)
        self.unchanged_of = [unchanged] * len(universe)
        """Per asset: the probability that a step leaves its price (``set_unchanged``)."""
        self.change_log: list[list[int]] | None = None
        """Per asset, the steps that moved its price, once ``record_changes()`` was called."""
        self.step = 0
        self._t0: float | None = None
        self._epoch = time.time()
        self._last_now = 0.0
        self._cache: dict[str, tuple[int, dict[int, Quote]]] = {}
        self._quoted_at = 0.0
        self._places = {
            ex: [self.decimals(ex, a) for a in universe] for ex in EXCHANGES
        }

    # -- clock -------------------------------------------------------------

    def now(self) -> float:
        """trio's clock. Outside a trio run the clock stands still (and the
        walk's start is not fixed until a run first reads the clock)."""
        try:
            self._last_now = trio.current_time()
        except RuntimeError:
            return self._last_now
        if self._t0 is None:
            self._t0 = self._last_now
            self._epoch = time.time()
        return self._last_now

    def wall(self, now: float | None = None) -> float:
        """Epoch seconds matching trio time ``now`` (tracks virtual time too)."""
        if now is None:
            now = self.now()
        start = now if self._t0 is None else self._t0
        return self._epoch + (now - start)

    def _step_wall(self, step: int) -> float:
        if self.tick_interval > 0 and self._t0 is not None:
            return self.wall(self._t0 + step * self.tick_interval)
        return self.wall()

    # -- walking -------------------------------------------------------------

    def advance(self, *, request: bool = False) -> int:
        """Walk to the step due now; ``request`` counts one price request
        (the clock when ``tick_interval`` is 0). Returns the step."""
        now = self.now()
        if self.tick_interval > 0:
            start = now if self._t0 is None else self._t0
            target = int((now - start) / self.tick_interval)
        else:
            target = self.step + (1 if request else 0)
        if target > self.step:
            todo = target - self.step
            cap = max(1, self.MAX_CATCHUP // max(1, len(self.universe)))
            if todo > cap:  # a long idle gap: skip ahead, walk the last steps
                self.step = target - cap
                todo = cap
            for _ in range(todo):
                self._walk_once()
        return self.step

    def set_unchanged(self, values: dict[int, float]) -> None:
        """Per-asset activity: asset index -> the probability that a step
        leaves its price unchanged (the others keep ``unchanged``). The walk
        draws the same random numbers whatever these are."""
        for i, p in values.items():
            if not 0 <= p <= 1:
                raise ValueError(f"unchanged for asset {i} must be within [0, 1]")
            self.unchanged_of[i] = p

    def record_changes(self) -> None:
        """Keep the step of every price move from now on (``change_log``)."""
        if self.change_log is None:
            self.change_log = [[] for _ in self.universe]

    def step_time(self, step: int) -> float:
        """Epoch seconds at which ``step`` was due (with a ``tick_interval``)."""
        return self._step_wall(step)

    def _walk_once(self) -> None:
        self.step += 1
        rng = self._rng
        vol = self.volatility
        unchanged_of, changes = self.unchanged_of, self.change_log
        mid, high, low = self.mid, self.high, self.low
        for i in range(len(mid)):
            if rng.random() < unchanged_of[i]:
                continue
            price = mid[i] * math.exp(rng.gauss(0.0, vol))
            mid[i] = price
            high[i] = max(high[i], price)
            low[i] = min(low[i], price)
            self.trades[i] += 1 + (self.step * 31 + i) % 7
            self.changed_step[i] = self.step
            if changes is not None:
                changes[i].append(self.step)

    # -- quoting -------------------------------------------------------------

    def decimals(self, exchange: str, asset: Asset) -> int:
        """Decimal places ``exchange`` prints this asset's prices with."""
        if exchange == "coincap":  # an aggregator's volume-weighted average
            return 16
        tick = asset.tick
        if exchange in ("binance", "coinbase", "okx"):
            tick = max(tick, 1e-8)
        return _decimals(tick)

    def quote(self, exchange: str, asset: Asset) -> Quote:
        """``asset``'s quote on ``exchange`` at the current step (cached per
        step; ``time`` is when the step was first quoted)."""
        cached = self._cache.get(exchange)
        if cached is None or cached[0] != self.step:
            cached = (self.step, {})
            self._cache[exchange] = cached
            self._quoted_at = self.wall()
        quote = cached[1].get(asset.index)
        if quote is None:
            quote = cached[1][asset.index] = self._quote(exchange, asset)
        return quote

    def supply(self, asset: Asset) -> float:
        """Circulating supply: market caps falling with rank, BTC's near 1.3e12 USD."""
        return round(1.3e12 / (asset.index + 1) ** 1.5 / asset.start_price)

    def _quote(self, exchange: str, asset: Asset) -> Quote:
        i = asset.index
        places = self._places[exchange][i]
        unit = 10.0**-places

        def rounded(value: float) -> Decimal:
            return Decimal(f"{value:.{places}f}")

        def amount(value: float) -> Decimal:
            return Decimal(f"{value:.8f}")

        value = max(self.mid[i] * self._basis[exchange][i], unit)
        price = rounded(value)
        half_spread = rounded(max(unit, value * 5e-5))
        basis = self._basis[exchange][i]
        wobble = (self.step * 2654435761 + i * 40503) % 1000 / 1000.0
        base_size = 5000.0 / max(asset.start_price, 1e-9) ** 0.5
        size = base_size * (0.2 + wobble)
        wall = self._quoted_at
        return Quote(
            exchange=exchange,
            symbol=asset.symbol(exchange),
            base=asset.base,
            price=price,
            bid=price - half_spread,
            ask=price + half_spread,
            bid_size=amount(size * 3),
            ask_size=amount(size * 2),
            last_size=amount(size),
            open=rounded(self.open[i] * basis),
            high=max(rounded(self.high[i] * basis), price),
            low=min(rounded(self.low[i] * basis), price),
            volume=amount(base_size * 800 * (1.0 + 0.1 * wobble)),
            trades=self.trades[i],
            step=self.step,
            time=wall,
            changed=min(wall, self._step_wall(self.changed_step[i])),
        )
