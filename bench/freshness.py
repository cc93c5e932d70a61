"""Per-symbol freshness: what a source's ``Freshness.seen`` costs per batch.

What it measures: microseconds per batch of 1000 ticks (1000 symbols) for

- ``per record`` (the baseline): the loop the tracking used to be, a dict
  store of the batch time per record (``symbols[r.symbol] = now``);
- ``Freshness.seen``: flows' tracking: a batch that repeats a remembered
  *run* (an earlier batch's symbols in the same order) is recognised by
  one probed symbol (one of eight positions, in turn), the run compared
  in full at most once a second;
  other batches store per record;

on three kinds of input, each a stream of 200 batches:

- ``repeating``: every batch has the same symbols in the same order, the
  same string objects (a synthetic market's tick; a source that maps
  replies onto its own symbol list);
- ``repeating, decoded``: the same order, but new string objects in every
  batch (a JSON reply decoded afresh): the comparison compares strings;
- ``shuffled``: the same symbols in a new order every batch (a stream
  source): never a repeat.

Each figure is the best of ``--repeat`` runs of this process's CPU time.
Run from the repository root (a few seconds)::

    python bench/freshness.py
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
from _common import cut, make_records

from flows._freshness import Freshness

BATCH = 1000
BATCHES = 200


def per_record(batches: list[list[Any]]) -> None:
    symbols: dict[Any, float] = {}
    for records in batches:
        now = trio.current_time()
        for r in records:
            symbols[r.symbol] = now


def seen(batches: list[list[Any]]) -> None:
    fresh = Freshness(60.0)
    for records in batches:
        fresh.seen(records)


def inputs() -> dict[str, list[list[Any]]]:
    records = make_records(BATCH * BATCHES, symbols=BATCH, unchanged=0.7)
    repeating = cut(records, BATCH)
    decoded = [[type(r)(r.source, "".join(r.symbol), r.price, r.ts) for r in b] for b in repeating]
    rng = random.Random(1)
    shuffled = [rng.sample(b, len(b)) for b in repeating]
    return {"repeating": repeating, "repeating, decoded": decoded, "shuffled": shuffled}


def best(fn: Any, batches: list[list[Any]], repeat: int) -> float:
    async def main() -> float:
        least = float("inf")
        for _ in range(repeat):
            t0 = time.process_time()
            fn(batches)
            least = min(least, time.process_time() - t0)
        return least

    return trio.run(main) / len(batches) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs, the best kept (default 7)")
    args = parser.parse_args(argv)
    print(f"{BATCHES} batches of {BATCH} ticks, {BATCH} symbols; best of {args.repeat}, cpu time; "
          f"python {sys.version.split()[0]}")
    header = f"{'input':<20} {'per record us/batch':>20} {'seen() us/batch':>16} {'ratio':>6}"
    print()
    print(header)
    print("-" * len(header))
    for name, batches in inputs().items():
        base, ours = best(per_record, batches, args.repeat), best(seen, batches, args.repeat)
        print(f"{name:<20} {base:>20.1f} {ours:>16.1f} {ours / base:>5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
