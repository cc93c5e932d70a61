"""Adaptive polling against fixed polling: same universe, same rate limit.

The scenario: N=200 Coinbase products polled one request each
(``GET /products/X/ticker``) under a limit of 10 requests/s (the source's
limiter keeps whole requests under 98% of it: 9/s, so a fixed sweep of
the 200 takes about 22 s). Prices step once a second; 10% of the symbols
move on 20% of the steps (every 5 s on average), 90% on 0.2% (every
8 minutes), set with the emulator's ``set_unchanged``.

Each variant runs for ``--seconds`` (1200) of trio's clock against its own
in-process emulator with the same seed (so the same walk, change for
change), on ``MockClock`` (autojump): the exchange answers at once, time
advances only while everything waits, so a run of 20 virtual minutes
takes about a minute and measures the schedules, not this machine.

- ``fixed (baseline)``: ``CoinbaseTickers(every=1)``: back-to-back sweeps
  as fast as the limit allows (the way flows polls without this feature,
  and how a plain loop over the symbols would).
- ``adaptive, floor 60 s`` / ``floor 120 s``: ``schedule="adaptive"``,
  ``every=1`` (the shortest interval of one symbol), ``max_staleness``
  60 or 120, the source comparing prices.
- ``+ ChangeDetector``: the 120 s one behind a ``ChangeDetector()``, which
  feeds the schedule (its verdicts are the source's here: ``rel=0``).
- ``adaptive, every=15``: ``AdaptiveSchedule(max_staleness=120,
  hits=0.5)``, no symbol polled more often than every 15 s (a fixed sweep
  takes 22 s), half of the polls meant to find a move: what the schedule
  saves when it is not to spend the budget on delay.

Measured from the emulator's record of every price move (its walk, each
move's time) and what reached the sink (each Tick's ``ts`` is the time of
the move it shows, Coinbase's ``time``), over the moves after a 5-minute
warm-up (a quiet symbol needs a few minutes without a move before its
interval reaches the floor) and before the last minute:

- ``requests``: requests the exchange answered after the warm-up;
- ``captured``: the share of moves that some poll saw before the next move
  replaced them;
- ``median delay`` / ``p99 delay``: from a move to the first Tick
  showing it, over the captured moves; ``volatile`` / ``quiet`` split it.
  (A move that fixed polling captures was, by that fact, recent: its
  delays are short but it misses most moves; read the two together.)

Run: ``python bench/adaptive.py`` (``--seconds``, ``--symbols``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio
import trio.testing
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows import AdaptiveSchedule, Batch, ChangeDetector, Flow, RateLimit, Runtime
from flows.testing.emulator import Emulator
from sources.coinbase import CoinbaseTickers

SEED = 11
WARMUP, TAIL = 300.0, 60.0


class ArrivalSink:
    """Keeps the first arrival (trio time) of each (symbol, ts) it is sent."""

    def __init__(self) -> None:
        self.name = "arrivals"
        self.first: dict[tuple[str, float], float] = {}

    async def run(self, inbox: Any) -> None:
        async for batch in inbox:
            now = trio.current_time()
            for t in batch.records:
                self.first.setdefault((t.symbol, round(t.ts, 3)), now)
            batch.ack("written") if isinstance(batch, Batch) else None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_variant(args: argparse.Namespace, options: dict[str, Any], detector: bool) -> dict[str, Any]:
    em = Emulator(seed=SEED, assets=args.symbols, tick_interval=1.0)
    symbols = em.symbols("coinbase")
    volatile = set(symbols[: args.symbols // 10])
    em.set_unchanged({s: 0.8 if s in volatile else 0.998 for s in symbols}, exchange="coinbase")
    em.market.record_changes()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(em.serve)
        source = CoinbaseTickers(symbols=symbols, base_url=url, limits=[RateLimit(10, 1.0)],
                                 **options)
        sink = ArrivalSink()
        stages = [ChangeDetector()] if detector else []
        flow = Flow("bench", sources=[source], stages=stages, sinks=[sink])
        start = trio.current_time()
        warm: dict[str, int] = {}

        async def after_warmup() -> None:
            await trio.sleep(WARMUP)
            warm["requests"] = em.stats["coinbase"]["ticker"]["requests"]

        nursery.start_soon(after_warmup)
        await Runtime(flow, registry=CollectorRegistry(), metrics_addr=None,
                      duration=args.seconds).run()
        nursery.cancel_scope.cancel()
    market = em.market
    to_trio = lambda wall: wall - market.wall(start) + start
    delays: dict[str, list[float]] = {"volatile": [], "quiet": []}
    moves = captured = 0
    for asset, steps in zip(em.universe, market.change_log or []):
        symbol = asset.coinbase
        kind = "volatile" if symbol in volatile else "quiet"
        for step in steps:
            at = market.step_time(step)
            t = to_trio(at) - start
            if not WARMUP <= t <= args.seconds - TAIL:
                continue
            moves += 1
            seen = sink.first.get((symbol, round(at, 3)))
            if seen is not None:
                captured += 1
                delays[kind].append(seen - to_trio(at))
    every = delays["volatile"] + delays["quiet"]
    return {
        "requests": em.stats["coinbase"]["ticker"]["requests"] - warm["requests"],
        "all_requests": em.stats["coinbase"]["ticker"]["requests"],
        "refused": em.stats["coinbase"]["ticker"]["refused"],
        "captured": captured / max(moves, 1),
        "moves": moves,
        "median": statistics.median(every) if every else float("nan"),
        "p99": percentile(every, 0.99),
        "volatile": statistics.median(delays["volatile"]) if delays["volatile"] else float("nan"),
        "quiet": statistics.median(delays["quiet"]) if delays["quiet"] else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1200.0,
                        help="virtual seconds per variant (the first 300 are a warm-up)")
    parser.add_argument("--symbols", type=int, default=200)
    args = parser.parse_args(argv)
    adaptive = {"schedule": "adaptive"}
    variants = [
        ("fixed (baseline)", {"every": 1.0}, False),
        ("adaptive, floor 60 s", {**adaptive, "every": 1.0, "max_staleness": 60.0}, False),
        ("adaptive, floor 120 s", {**adaptive, "every": 1.0, "max_staleness": 120.0}, False),
        ("  + ChangeDetector", {**adaptive, "every": 1.0, "max_staleness": 120.0}, True),
        ("adaptive, every=15", {"every": 15.0, "schedule": AdaptiveSchedule(
            max_staleness=120.0, hits=0.5)}, False),
    ]
    print(f"{args.symbols} symbols (10% moving every ~5 s, 90% every ~8 min), limit 10 requests/s, "
          f"{args.seconds:g} s of trio's clock per variant (MockClock)\n")
    header = (f"| {'variant':<22} | {'requests':>8} | {'vs fixed':>8} | {'captured':>8} | "
              f"{'median delay':>12} | {'vs fixed':>8} | {'p99 delay':>9} | {'volatile p50':>12} | "
              f"{'quiet p50':>9} | {'real s':>6} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    base: dict[str, Any] | None = None
    results: list[tuple[str, dict[str, Any]]] = []
    for name, options, detector in variants:
        t0 = time.perf_counter()
        r = trio.run(run_variant, args, options, detector,
                     clock=trio.testing.MockClock(autojump_threshold=0))
        real = time.perf_counter() - t0
        base = base or r
        results.append((name.strip(), r))
        print(f"| {name:<22} | {r['requests']:>8} | {r['requests'] / base['requests']:>7.2f}x | "
              f"{r['captured']:>7.1%} | {r['median']:>10.2f} s | "
              f"{base['median'] / r['median']:>7.2f}x | {r['p99']:>7.1f} s | "
              f"{r['volatile']:>10.2f} s | {r['quiet']:>7.1f} s | {real:>6.1f} |", flush=True)
        if r["refused"]:
            print(f"  ({name}: {r['refused']} requests refused by the exchange)")
    print(f"\nrequests: answered after the {WARMUP:g} s warm-up (the schedules learning), to the end;"
          "\nvs fixed: requests as a share of fixed polling's; delay as fixed's median over this one's"
          " (higher is better).\n")
    assert base is not None
    fewer = [(n, r) for n, r in results[1:]
             if r["requests"] <= 0.4 * base["requests"] and r["median"] <= base["median"]]
    faster = [(n, r) for n, r in results[1:]
              if r["requests"] <= 1.05 * base["requests"] and r["median"] * 3 <= base["median"]]
    verdict = lambda ok: "PASS" if ok else "FAIL"
    print(f"{verdict(fewer)}  at equal or better median delay, >= 60% fewer requests: "
          + (", ".join(f"{n} ({1 - r['requests'] / base['requests']:.0%} fewer)" for n, r in fewer)
             or "none"))
    print(f"{verdict(faster)}  at an equal budget, >= 3x lower median delay: "
          + (", ".join(f"{n} ({base['median'] / r['median']:.2f}x)" for n, r in faster) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
