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
  the ordered form (an ``OrderedDict`` of symbol -> value and time packed
  in a complex).

Target (issue 15): at most 150 bytes per tracked key, reported as PASS/FAIL
for both figures of each detector row (the exit status is 0 either way).

Run from the repository root (about a minute with the defaults)::

    python bench/memory.py                   # 1,000,000 keys
    python bench/memory.py --keys 200000
"""

from __future__ import annotations

import argparse
import gc
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys fed (default 1000000)")
    args = parser.parse_args(argv)
    if args.keys < BATCH:
        parser.error(f"--keys must be >= {BATCH}")
    n = args.keys
    t0 = time.perf_counter()
    print(f"{n:,} keys, one source, batches of {BATCH}; python {sys.version.split()[0]}")
    rows = [
        ("issue 15 baseline", Baseline, False),
        ("plain form", lambda: ChangeDetector(rel=0.001, max_keys=4 * n), True),
        ("plain, heartbeat",
         lambda: ChangeDetector(rel=0.001, heartbeat=60.0, max_keys=4 * n), True),
        ("ordered form", lambda: ChangeDetector(rel=0.001, max_keys=n), True),
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
    print(f"\n({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
