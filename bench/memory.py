"""Change detection memory: bytes per tracked key.

What it measures: the memory a ``ChangeDetector`` keeps per key after it
has been fed N distinct keys (one source, one tick per symbol, batches of
1000, records dropped after each batch), read with ``tracemalloc`` (the
Python allocations still held at the end, over N). Two figures per row:

- ``with key``: the symbol strings are made per record (as a JSON decoder
  does), so each key's string is held by the state alone and counted;
- ``key shared``: the symbol strings already exist (a source's symbol
  list, as the synthetic market and the pollers keep), so only what the
  detector adds is counted.

Rows:

- ``issue 15 baseline``: the representation the detector had when issue 15
  was filed, rebuilt inline: an ``OrderedDict`` of ``(source, symbol)`` ->
  ``[value, time]``;
- ``plain form``: ``ChangeDetector(max_keys=4 * N)``: the state stays
  below three quarters of ``max_keys``, so it keeps the plain form (a dict symbol ->
  value; no times: nothing reads them without a heartbeat);
- ``plain, heartbeat``: the same with ``heartbeat=60``: the value and
  its time packed in a complex (one dict, symbol -> complex);
- ``ordered form``: ``ChangeDetector(max_keys=N)``: full, so it has moved to
  the ordered form; without a heartbeat it is *ranked* (a dict symbol ->
  value and a sequence number packed in a complex; no times);
- ``ordered, heartbeat``: the same with ``heartbeat=60``: *timed ranked*,
  the ranked dict plus an ``array('d')`` of emit times indexed by sequence
  number (renumbered when more than three quarters of it are dead).

Target (issue 15): at most 150 bytes per tracked key, reported as PASS/FAIL
for both figures of each detector row (the exit status is 0 either way).

The second table (``--churn-keys C``, default 100,000; 0 skips it) is the
ordered form under eviction, with ``max_keys=C``, against the ordered form
as it was before the ranked one (``OrderedDict baseline``: the same loop
with an ``OrderedDict`` of symbol -> complex(value, time),
``move_to_end`` on every hit, ``popitem(last=False)`` to evict), both fed
the same records in batches of 1000 (CPU time, best of 3, after a
warm-up filling the state). Workloads:

- ``churn``: 2C distinct keys cycling, so every record is a new key that
  evicts the least recently seen one;
- ``hits``: C known keys, unchanged values: every record is a hit that
  updates recency;
- ``mixed``: 90% hits on C/2 hot keys, 10% new keys (each evicting one).

Then the memory held after the ``churn`` workload ran 4C records past the
fill (tracemalloc, with key, as above: ``after``), and the most held at
any time during it (``peak``: the rebuilds and the candidate lists
included). A dict that had deletions grows to three times its keys when
its entries run out; the detector's ordered form (ranked, or timed ranked
with a heartbeat: the third line) copies itself back when
``sys.getsizeof`` says it grew; the baseline does not.

Run from the repository root (about two and a half minutes with the defaults)::

    python bench/memory.py                   # 1,000,000 keys
    python bench/memory.py --keys 200000 --churn-keys 20000
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows import ChangeDetector, Tick

BATCH = 1000
TARGET = 150


class Baseline:
    """The detector's state as issue 15 found it (the update rule only)."""

    def __init__(self) -> None:
        self.state: OrderedDict[Any, list[float]] = OrderedDict()

    def filter(self, records: list[Any]) -> list[Any]:
        state = self.state
        for r in records:
            k = (r.source, r.symbol)
            last = state.get(k)
            if last is None:
                state[k] = [r.price, r.ts]
            else:
                state.move_to_end(k)
        return records


def per_key(make: Callable[[], Any], n: int, *, shared: bool) -> float:
    """Bytes held per key by the detector ``make()`` returns, fed ``n`` keys."""
    names = [f"SYM{i:07d}" for i in range(n)] if shared else None
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        detector = make()
        for start in range(0, n, BATCH):
            records = [
                Tick("mem", names[i] if names else f"SYM{i:07d}", 100.0 + i * 1e-3, 1.7e9 + i)
                for i in range(start, min(start + BATCH, n))
            ]
            detector.filter(records)
            del records
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    kept = len(detector.state)
    assert kept == n, (kept, n)
    del detector
    return held / n


class OrderedBaseline:
    """The ordered form before the ranked one: ``ChangeDetector``'s loop as
    it was (``_filter_ordered`` at commit 9d14cc1, the default accessors'
    branch, one source), over an ``OrderedDict`` symbol -> complex(value,
    time), recency tracked from the first key (the state is full here)."""

    def __init__(self, rel: float, max_keys: int) -> None:
        self.rel, self.abs, self.heartbeat, self.max_keys = rel, 0.0, None, max_keys
        self.od: OrderedDict[Any, Any] = OrderedDict()
        self.src = "mem"

    def filter(self, records: list[Any]) -> list[Any]:
        od = self.od
        rel, abs_, hb = self.rel, self.abs, self.heartbeat
        exact = rel == 0 and abs_ == 0
        track_from, max_keys = 0, self.max_keys
        src = self.src
        inf = math.inf
        out: list[Any] = []
        append = out.append
        invalid = evicted = 0
        get, touch = od.get, od.move_to_end
        tracking = len(od) >= track_from
        for r in records:
            v = r.price
            if r.source is src or r.source == src:
                k = r.symbol
            else:
                raise ValueError("one source only")
            if not 0 < v < inf:
                invalid += 1
                continue
            c = get(k)
            if c is None:
                while len(od) >= max_keys:
                    od.popitem(last=False)
                    evicted += 1
                t = r.ts
                od[k] = complex(v, t) if v.__class__ is float and t.__class__ is float else (v, t)
                append(r)
                tracking = len(od) >= track_from
                continue
            if tracking:
                touch(k)
            cls = c.__class__
            lv = c[0] if cls is tuple else c.real
            d = v - lv if v >= lv else lv - v
            if (d != 0 if exact else ((rel and d >= rel * lv) or (abs_ and d >= abs_))) or (
                hb is not None and r.ts - c.imag >= hb
            ):
                t = r.ts
                od[k] = complex(v, t) if v.__class__ is float and t.__class__ is float else (v, t)
                append(r)
        return out


def churn_batches(c: int, workload: str, n: int, *, offset: int = 0) -> list[list[Any]]:
    """``n`` records of ``workload`` (see the module docstring) for
    ``max_keys=c``, in batches, starting ``offset`` records in."""
    if workload == "churn":
        symbols = (f"SYM{(offset + i) % (2 * c):07d}" for i in range(n))
    elif workload == "hits":
        symbols = (f"SYM{(offset + i) % c:07d}" for i in range(n))
    else:  # mixed: 9 of 10 on c/2 hot keys, every 10th a key never seen before
        hot = max(1, c // 2)
        symbols = (f"NEW{offset + i:09d}" if i % 10 == 9 else f"SYM{(offset + i) % hot:07d}"
                   for i in range(n))
    records = [Tick("mem", s, 100.0, 1.7e9 + i) for i, s in enumerate(symbols)]
    return [records[i : i + BATCH] for i in range(0, n, BATCH)]


def fill(detector: Any, c: int) -> None:
    for batch in churn_batches(c, "hits", c):
        detector.filter(batch)


def churn_cost(make: Callable[[], Any], c: int, workload: str) -> float:
    """CPU microseconds per record of ``workload`` past the fill (best of 3)."""
    n = 4 * c
    batches = churn_batches(c, workload, n, offset=c)
    best = math.inf
    for _ in range(3):
        detector = make()
        fill(detector, c)
        gc.collect()
        t0 = time.process_time()
        for batch in batches:
            detector.filter(batch)
        best = min(best, time.process_time() - t0)
        del detector
    return best / n * 1e6


def churn_memory(make: Callable[[], Any], c: int) -> tuple[float, float]:
    """Bytes per key held after 4c records of churn past the fill, and the
    most held at any time, with the key strings made per record."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        detector = make()
        fill(detector, c)
        for start in range(c, 5 * c, BATCH):
            detector.filter(churn_batches(c, "churn", BATCH, offset=start)[0])
        gc.collect()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del detector
    return (held - before) / c, (peak - before) / c


def churn_table(c: int) -> None:
    old = lambda: OrderedBaseline(0.001, c)
    new = lambda: ChangeDetector(rel=0.001, max_keys=c)
    print(f"\nthe ordered form under eviction: max_keys={c:,}, batches of {BATCH}")
    header = f"{'workload':<22} {'OrderedDict us/rec':>18} {'ranked us/rec':>14} {'ratio':>6}"
    print()
    print(header)
    print("-" * len(header))
    for workload in ("churn", "hits", "mixed"):
        a, b = churn_cost(old, c, workload), churn_cost(new, c, workload)
        print(f"{workload:<22} {a:>18.2f} {b:>14.2f} {b / a:>5.2f}x")
    for what, make in (("OrderedDict baseline", old), ("ranked", new),
                       ("ordered, heartbeat", lambda: ChangeDetector(
                           rel=0.001, heartbeat=60.0, max_keys=c))):
        after, peak = churn_memory(make, c)
        print(f"memory after churn, {what}: {after:.0f} B/key (peak {peak:.0f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys fed (default 1000000)")
    parser.add_argument("--churn-keys", type=int, default=100_000,
                        help="max_keys of the eviction table (default 100000; 0 skips it)")
    args = parser.parse_args(argv)
    if args.keys < BATCH or 0 < args.churn_keys < BATCH:
        parser.error(f"--keys and --churn-keys must be >= {BATCH}")
    n = args.keys
    t0 = time.perf_counter()
    print(f"{n:,} keys, one source, batches of {BATCH}; python {sys.version.split()[0]}")
    rows = [
        ("issue 15 baseline", Baseline, False),
        ("plain form", lambda: ChangeDetector(rel=0.001, max_keys=4 * n), True),
        ("plain, heartbeat",
         lambda: ChangeDetector(rel=0.001, heartbeat=60.0, max_keys=4 * n), True),
        ("ordered form", lambda: ChangeDetector(rel=0.001, max_keys=n), True),
        ("ordered, heartbeat",
         lambda: ChangeDetector(rel=0.001, heartbeat=60.0, max_keys=n), True),
    ]
    header = f"{'state':<18} {'with key B/key':>15} {'key shared B/key':>17}"
    print()
    print(header)
    print("-" * len(header))
    checks = []
    for name, make, target in rows:
        own, shared = per_key(make, n, shared=False), per_key(make, n, shared=True)
        print(f"{name:<18} {own:>15.0f} {shared:>17.0f}")
        if target:
            checks += [(f"{name}, key shared", shared), (f"{name}, with key", own)]
    print()
    for what, got in checks:
        print(f"{'PASS' if got <= TARGET else 'FAIL'}  <= {TARGET} bytes per key ({what}): {got:.0f}")
    if args.churn_keys:
        churn_table(args.churn_keys)
    print(f"\n({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
