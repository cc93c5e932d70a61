"""Candles throughput and memory: trades -> Candles(every=60) -> null sink.

What it measures: trades/s (input trades per second, CPU time of this
process, best of ``--repeat`` runs, the variants taking turns, so a
shared machine's noise counts less) at batch size 1000 for

- ``bare loop`` (the ceiling): the loop a user would write for the same
  candles with no framework: per trade, the window start
  ``ts - ts % 60``, a dict lookup on (source, symbol, start), the OHLCV,
  count, price*size and first/last time updates inline; after each batch,
  windows whose end is at or before the batch's latest time minus the
  lateness are popped (in the order they opened) into ``Candle`` records;
  no validity check, no late records, no bounded state, no acks, no metrics;
- ``push() loop`` (diagnostic): ``Candles.push`` per batch in a plain loop:
  the stage's own cost, without the engine around it;
- ``engine``: a ``Flow`` of a source sending the pre-generated batches,
  ``Candles(every=60, lateness=5)`` and a sink that only counts, run by
  ``flows.Runtime`` (fresh registry, metrics on, no server), timed around
  ``trio.run``, so start-up and shutdown count.

The input: ``SyntheticTrades(symbols=1000, active=0.5, burst=3,
disorder=2.0)``, a round of trades every 4 s of event time (about 15
trades per candle), generated once. Every variant must give the same
candles (checked). Target (issue 12): the engine reaches >= 0.5x the bare
loop (PASS/FAIL; the exit status is 0 either way).

Memory: the bytes a ``Candles`` stage holds per open window (100,000 keys,
one trade each, read with ``tracemalloc``: with the windows open, less
after they closed) and per key once its windows have closed (what bounds
``max_keys``).

Run from the repository root (about 30 seconds)::

    python bench/windows.py
    python bench/windows.py --trades 200000 --repeat 1
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
from prometheus_client import CollectorRegistry

from bench._common import PregenSource, cut
from flows import Candle, Candles, Flow, Inbox, Runtime, Trade
from sources.synthetic import SyntheticTrades

EVERY, LATENESS, BATCH, TARGET = 60.0, 5.0, 1000, 0.5
T0 = 1_700_000_040.0


def make_trades(n: int) -> list[Trade]:
    source = SyntheticTrades(symbols=1000, active=0.5, burst=3, disorder=2.0, seed=1)
    out: list[Trade] = []
    now = T0
    while len(out) < n:
        out += source.trades(now)
        now += 4.0
    return out[:n]


def bare_loop(batches: list[list[Trade]]) -> list[Candle]:
    every, lateness = EVERY, LATENESS
    open_: dict[tuple[str, str, float], list[Any]] = {}
    out: list[Candle] = []

    def close(k: tuple[str, str, float], c: list[Any]) -> None:
        out.append(Candle(k[0], k[1], k[2], every, c[0], c[1], c[2], c[3], c[4], c[5],
                          c[6] / c[4] if c[4] else None, c[7], c[8]))

    for batch in batches:
        top = -math.inf
        for t in batch:
            ts, p, s = t.ts, t.price, t.size
            start = ts - ts % every
            k = (t.source, t.symbol, start)
            c = open_.get(k)
            if c is None:
                open_[k] = [p, p, p, p, s, 1, p * s, ts, ts]
            else:
                if p > c[1]:
                    c[1] = p
                elif p < c[2]:
                    c[2] = p
                if ts >= c[8]:
                    c[8], c[3] = ts, p
                elif ts < c[7]:
                    c[7], c[0] = ts, p
                c[4] += s
                c[5] += 1
                c[6] += p * s
            top = max(top, ts)
        wm = top - lateness
        while open_:
            k = next(iter(open_))
            if k[2] + every > wm:
                break
            close(k, open_.pop(k))
    for k, c in open_.items():
        close(k, c)
    return out


def push_loop(batches: list[list[Trade]]) -> list[Candle]:
    candles = Candles(every=EVERY, lateness=LATENESS)
    out: list[Candle] = []
    for batch in batches:
        out += candles.push(batch)
    return out + candles.flush()


class CountSink:
    name = "null"

    def __init__(self) -> None:
        self.records: list[Any] = []

    async def run(self, inbox: Inbox) -> None:
        async for batch in inbox:
            self.records += batch.records
            batch.ack("written")


def engine(batches: list[list[Trade]]) -> list[Candle]:
    sink = CountSink()
    flow = Flow("bench", sources=[PregenSource(batches)],
                stages=[Candles(every=EVERY, lateness=LATENESS, final="emit")], sinks=[sink])
    trio.run(Runtime(flow, registry=CollectorRegistry(), metrics_addr=None).run)
    return sink.records


def timed(fn: Any, batches: list[list[Trade]]) -> tuple[float, list[Candle]]:
    gc.collect()
    t0 = time.process_time()
    out = fn(batches)
    return time.process_time() - t0, out


def memory(keys: int) -> tuple[float, float]:
    """(bytes per open window, bytes per key with no open window)."""
    trades = [Trade("bench", f"S{i:07d}", 100.0, 1.0, T0 + 1) for i in range(keys)]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    candles = Candles(every=EVERY, lateness=LATENESS, max_keys=keys)
    for batch in cut(trades, BATCH):
        candles.push(batch)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    closed = candles.flush()
    del closed
    gc.collect()
    keys_only = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return (held - keys_only) / keys, keys_only / keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trades", type=int, default=500_000)
    parser.add_argument("--keys", type=int, default=100_000, help="keys for the memory figures")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (best counts)")
    args = parser.parse_args()
    trades = make_trades(args.trades)
    batches = cut(trades, BATCH)
    print(f"input: {len(trades)} trades, 1000 symbols, Candles(every={EVERY:g}, lateness={LATENESS:g}), "
          f"batch {BATCH}; best of {args.repeat}, cpu time; python {sys.version.split()[0]}, "
          f"trio {trio.__version__}\n")
    rows = [("bare loop", bare_loop), ("push() loop", push_loop), ("engine", engine)]
    results: dict[str, tuple[float, list[Candle]]] = {}
    for _ in range(args.repeat):
        for name, fn in rows:
            seconds, got = timed(fn, batches)
            if name not in results or seconds < results[name][0]:
                results[name] = (seconds, got)
    want = sorted(results["bare loop"][1], key=lambda c: (c.symbol, c.start))
    for name, (_, got) in results.items():
        if sorted(got, key=lambda c: (c.symbol, c.start)) != want:
            raise SystemExit(f"{name} gave other candles than the bare loop")
    base = len(trades) / results["bare loop"][0]
    print(f"{'variant':<12} {'trades/s':>12} {'vs bare loop':>13} {'us/batch':>9} {'candles':>8}")
    print("-" * 58)
    for name, (seconds, got) in results.items():
        rate = len(trades) / seconds
        print(f"{name:<12} {rate:>12,.0f} {rate / base:>12.2f}x {seconds / len(batches) * 1e6:>9.1f} "
              f"{len(got):>8}")
    per_window, per_key = memory(args.keys)
    print(f"\nmemory ({args.keys:,} keys, tracemalloc): {per_window:.0f} bytes per open window, "
          f"{per_key:.0f} bytes per key with no open window")
    ratio = len(trades) / results["engine"][0] / base
    print(f"\n{'PASS' if ratio >= TARGET else 'FAIL'}  engine >= {TARGET}x bare loop at batch "
          f"{BATCH}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
