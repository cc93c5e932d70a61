"""Engine throughput: synthetic ticks -> ChangeDetector -> null sink, as a chain and as a graph.

What it measures: records/s (input records per second) for

- ``minimal loop`` (the ceiling): the loop a user would write for the same
  job, with no framework: per record ``last = state.get(symbol)``; emit
  when ``last is None or abs(price - last) / last >= rel`` (and store the
  price); no validity check, no eviction, no heartbeat, no metrics;
- ``filter() loop`` (diagnostic): ``ChangeDetector.filter`` called per batch
  in a plain loop: the detector's own cost, without the engine around it;
- ``asyncio queue``: what users write today: three asyncio tasks joined by
  per-record ``asyncio.Queue(maxsize=1000)``: a producer putting each
  record of the same batches, a task doing the minimal loop's change
  detection, a task counting;
- ``bytewax`` (a peer; only when the ``bench`` extra is installed:
  ``pip install -e '.[bench]'``): a Bytewax dataflow run by
  ``bytewax.testing.run_main`` (one worker, in this process):
  ``TestingSource`` over the same records (its ``batch_size`` the batch
  size), ``key_on`` symbol, ``stateful_map`` doing the minimal loop's
  change detection, ``filter``, ``TestingSink``;
- ``engine``: a ``Flow`` of a source sending pre-generated batches of B
  records, a default ``ChangeDetector(rel=REL)`` (``max_keys`` bounded at
  its default) and a sink that only counts, run by ``flows.Runtime``
  (fresh registry, metrics on, no metrics server) under ``trio.run``; timed
  around ``await Runtime.run()``, so start-up and shutdown count;
- ``engine untagged`` (diagnostic): the engine with the source's batches
  untagged. In ``engine`` (and every other engine row) the source tags
  each batch with its one source (``Batch.source``), as flows' HTTP,
  stream and synthetic sources do: the detector then keys records by
  symbol without checking each record's source; here it checks each;
- ``engine channels`` (diagnostic): the engine with inlining off
  (``flows._runtime.INLINE``): the detector in its own task behind a
  channel, as every stage ran before; in ``engine`` the runtime runs it in
  the source's task (``InlinePort``: it is the source's only consumer,
  over a default edge), one channel hop fewer. The chain rows of the hop
  table below and the per-hop target use this variant: two channel hops;
- ``engine unfresh`` (diagnostic): the engine with the source outbox's
  freshness tracking (``Freshness.seen``: the last-seen time of every
  record's symbol; here, where each batch repeats the same symbols in the
  same order, one probed symbol per batch and a full comparison with
  the remembered run once a second) patched to a no-op: its share of the
  engine's time, not a configuration flows offers;
- ``graph``: the same source fanned out to three branches, each into a
  counting sink: a fresh ``ChangeDetector(rel=REL)`` (sink ``changed``),
  a filter ``price > 100`` (a split branch, evaluated in the source's
  outbox; sink ``filtered``) and a pass-through function stage
  ``relay`` (``lambda batch: batch``; sink ``passed``); built with
  ``Flow.source``/``then``/``filter``/``to`` and run like ``engine``;

for batch sizes 1, 100 and 1000; plus the engine at batch size 1000 with
metrics enabled and disabled (disabled: the metric updates, prometheus_client's
``Counter.inc``, ``Gauge.set``, ``Histogram.observe`` and flows' lock-free
``FastCounter.inc`` and ``FastHistogram.observe``, patched to no-ops for
that run; the engine's own ``perf_counter`` bookkeeping stays), taking
turns over ``max(7 * repeat, 21)`` rounds; metrics overhead is one less the
median over the rounds of disabled/enabled time (a difference of about
1% measured on runs that vary by several: the median of the pairs is
steadier than the best of each).

The job is the one of issue 15: ticks from ``SyntheticMarket(symbols=1000,
unchanged=0.7).tick()`` (generated once, shared by every variant),
``rel=0.001`` against the last emitted price. Every variant must emit the
same number of records for a batch size (checked), so the comparison is
like for like. Each figure is the best of ``--repeat`` runs, the variants
taking turns; runs are timed by this process's CPU time (``--clock cpu``,
the default: other work on a shared machine counts less) or by wall time
(``--clock wall``). ``us/batch`` is the time per batch.

Targets (issue 15), reported as PASS/FAIL (the exit status is 0 either
way): at batch size 1000, metrics on, the engine reaches >= 0.7x the
minimal loop, >= 8x the asyncio pipeline and >= 20x Bytewax; at batch
size 1 a hop of the chain costs <= 8 us (the chain of ``engine channels``:
two channel hops, the inlined one not counted as free); metrics cost <= 3%.
A ratio checked is the median over the rounds of the ratio within a round
(the two run back to back): steadier than the best of one against the
best of the other, which the table shows (and the check line too).

The graph case gets its own table, against the chain (``engine channels``:
source -> change -> null) from the same rounds at the same batch size. Its cost is
also given per hop, a hop being an edge the records travel: the chain has
2 (source -> change, change -> null), the graph 5 (source -> change ->
changed, source -[filter]-> filtered, source -> relay -> passed);
``us/batch/hop`` is ``us/batch`` over the hops, and the table gives the
graph's time and cost per hop as multiples of the chain's. The per-hop
figure spreads all of a run's time, change detection included, over its
hops: it is the cost of the whole per hop, not of a channel alone (the
chain's 2 hops carry the same change detection as the graph's 5, so the
graph's per-hop cost comes out lower at large batches). records/s still
counts input records, once each, however many branches they take. The
sinks' counts are checked: ``changed`` gets as many records as the chain's
sink, ``filtered`` those with ``price > 100`` in the input, ``passed``
every record. ``--only graph`` runs only the chain and the graph (at every
batch size) and prints only that table.

Run from the repository root (under a minute with the defaults)::

    python bench/engine.py                    # 200k records, best of 3
    python bench/engine.py --records 50000 --repeat 5 --clock wall
    python bench/engine.py --only graph       # only the chain vs graph table
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _common
import prometheus_client.metrics as pm
import trio
from _common import PregenSource, cut
from prometheus_client import CollectorRegistry

import flows._runtime as flows_runtime
from flows import ChangeDetector, Flow, Inbox, Runtime
from flows._freshness import Freshness
from flows._metrics import FastCounter, FastHistogram

try:  # the optional peer (pip install -e '.[bench]')
    import bytewax.operators as bw
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, TestingSource
    from bytewax.testing import run_main as bytewax_run_main
except ImportError as exc:
    bytewax_missing: str | None = f"{exc} (pip install -e '.[bench]')"
else:
    bytewax_missing = None

BATCH_SIZES = (1, 100, 1000)
REL = 0.001
SYMBOLS = 1000
UNCHANGED = 0.7
QUEUE_SIZE = 1000
DEAR = 100.0  # the graph's filter branch keeps ticks priced above this
CHAIN_HOPS = 2  # source -> change -> null
GRAPH_HOPS = 5  # source -> change -> null, source -[dear]-> null, source -> relay -> null

# What a run's seconds are read from (set by --clock): CPU time of this
# process by default, so other work on the machine does not count.
clock = time.process_time

# -- input --------------------------------------------------------------------


def make_records(n: int) -> list[Any]:
    """``n`` ticks, whole universes of SYMBOLS at a time (the last one cut)."""
    return _common.make_records(n, symbols=SYMBOLS, unchanged=UNCHANGED)


class NullSink:
    """Sink: counts the records it receives and drops them."""

    def __init__(self, *, name: str = "null") -> None:
        self.name = name
        self.n = 0

    async def run(self, inbox: Inbox) -> None:
        n = 0
        async for batch in inbox:
            n += len(batch.records)
        self.n += n


def pregen(batches: list[list[Any]], *, tagged: bool = True) -> PregenSource:
    """The bench's source; ``tagged``: its batches carry their one source,
    as flows' own sources do (``Batch.source``)."""
    sources = {r.source for records in batches for r in records[:1] + records[-1:]}
    assert len(sources) == 1, sources
    return PregenSource(batches, tag=sources.pop() if tagged else None)


def run_engine(batches: list[list[Any]], *, tagged: bool = True) -> tuple[float, int]:
    """(seconds, records emitted) for one engine run."""
    sink = NullSink()
    flow = Flow(
        "bench",
        sources=[pregen(batches, tagged=tagged)],
        stages=[ChangeDetector(rel=REL)],
        sinks=[sink],
    )
    return timed_run(flow), sink.n


def timed_run(flow: Flow) -> float:
    """Seconds (by ``clock``) one clean run of ``flow`` takes, start-up and shutdown included."""
    runtime = Runtime(flow, registry=CollectorRegistry(), metrics_addr=None)

    async def main() -> float:
        t0 = clock()
        result = await runtime.run()
        seconds = clock() - t0
        assert result.clean, result
        return seconds

    return trio.run(main)


def is_dear(tick: Any) -> bool:
    """The graph's filter branch: ticks priced above DEAR."""
    return tick.price > DEAR


def relay(batch: Any) -> Any:
    """The graph's pass-through function stage."""
    return batch


def run_graph(batches: list[list[Any]]) -> tuple[float, tuple[int, int, int]]:
    """(seconds, records received by (changed, filtered, passed)) for one run
    of the graph: one source fanned out to change detection, a filter and a
    pass-through stage, each into a null sink."""
    changed, filtered, passed = (NullSink(name=n) for n in ("changed", "filtered", "passed"))
    flow = Flow("bench-graph")
    polled = flow.source(pregen(batches))
    polled.then(ChangeDetector(rel=REL)).to(changed)
    polled.filter(is_dear, name="dear").to(filtered)
    polled.then(relay, name="relay").to(passed)
    return timed_run(flow), (changed.n, filtered.n, passed.n)


@contextmanager
def metrics_disabled() -> Iterator[None]:
    """Every metric update a run makes as a no-op: prometheus_client's
    Counter.inc, Gauge.set, Histogram.observe and flows' lock-free
    FastCounter.inc and FastHistogram.observe."""
    saved = [(cls, attr, cls.__dict__[attr]) for cls, attr in
             ((pm.Counter, "inc"), (pm.Gauge, "set"), (pm.Histogram, "observe"),
              (FastCounter, "inc"), (FastHistogram, "observe"))]
    noop = lambda *a, **k: None
    try:
        for cls, attr, _ in saved:
            setattr(cls, attr, noop)
        yield
    finally:
        for cls, attr, fn in saved:
            setattr(cls, attr, fn)


def run_engine_no_metrics(batches: list[list[Any]]) -> tuple[float, int]:
    with metrics_disabled():
        return run_engine(batches)


def run_engine_untagged(batches: list[list[Any]]) -> tuple[float, int]:
    """The engine with the source's batches untagged: the detector checks
    each record's source."""
    return run_engine(batches, tagged=False)


def run_engine_channels(batches: list[list[Any]]) -> tuple[float, int]:
    """The engine with every stage in its own task (no inlining)."""
    saved, flows_runtime.INLINE = flows_runtime.INLINE, False
    try:
        return run_engine(batches)
    finally:
        flows_runtime.INLINE = saved


def run_engine_unfresh(batches: list[list[Any]]) -> tuple[float, int]:
    """The engine with the source's freshness tracking (``Freshness.seen``)
    patched to a no-op: a diagnostic of its share."""
    saved = Freshness.seen
    Freshness.seen = lambda self, records: None  # type: ignore[method-assign]
    try:
        return run_engine(batches)
    finally:
        Freshness.seen = saved  # type: ignore[method-assign]


# -- the minimal loop (the ceiling) ----------------------------------------------


def run_minimal(batches: list[list[Any]]) -> tuple[float, int]:
    """The change detection a user would write inline (issue 15's loop)."""
    state: dict[str, float] = {}
    emitted = 0
    t0 = clock()
    for records in batches:
        for r in records:
            sym, price = r.symbol, r.price
            last = state.get(sym)
            if last is None or abs(price - last) / last >= REL:
                state[sym] = price
                emitted += 1
    return clock() - t0, emitted


def run_filter_loop(batches: list[list[Any]]) -> tuple[float, int]:
    """ChangeDetector.filter called per batch in a plain loop (no channels, no metrics)."""
    detector = ChangeDetector(rel=REL)
    filt = detector.filter
    emitted = 0
    t0 = clock()
    for records in batches:
        emitted += len(filt(records))
    return clock() - t0, emitted


# -- per-record asyncio.Queue pipeline ----------------------------------------------


def run_asyncio(batches: list[list[Any]]) -> tuple[float, int]:
    """Producer -> change detection -> counter, one record per queue item."""

    async def main() -> tuple[float, int]:
        q1: asyncio.Queue[Any] = asyncio.Queue(maxsize=QUEUE_SIZE)
        q2: asyncio.Queue[Any] = asyncio.Queue(maxsize=QUEUE_SIZE)
        done = object()

        async def produce() -> None:
            for records in batches:
                for r in records:
                    await q1.put(r)
            await q1.put(done)

        async def detect() -> None:
            state: dict[str, float] = {}
            while True:
                r = await q1.get()
                if r is done:
                    await q2.put(done)
                    return
                sym, price = r.symbol, r.price
                last = state.get(sym)
                if last is None or abs(price - last) / last >= REL:
                    state[sym] = price
                    await q2.put(r)

        async def consume() -> int:
            n = 0
            while True:
                r = await q2.get()
                if r is done:
                    return n
                n += 1

        t0 = clock()
        _, _, n = await asyncio.gather(produce(), detect(), consume())
        return clock() - t0, n

    return asyncio.run(main())


# -- Bytewax (a peer) ----------------------------------------------------------------


def _bytewax_detect(last: float | None, tick: Any) -> tuple[float, Any]:
    """stateful_map's mapper: the minimal loop's test; emits the tick or None."""
    price = tick.price
    if last is None or abs(price - last) / last >= REL:
        return price, tick
    return last, None


def run_bytewax(batches: list[list[Any]]) -> tuple[float, int]:
    """Bytewax: input -> key_on symbol -> stateful_map -> filter -> sink."""
    records = [r for b in batches for r in b]
    out: list[Any] = []
    flow = Dataflow("bench")
    ticks = bw.input("ticks", flow, TestingSource(records, batch_size=len(batches[0])))
    keyed = bw.key_on("symbol", ticks, lambda t: t.symbol)
    moved = bw.stateful_map("change", keyed, _bytewax_detect)
    kept = bw.filter("kept", moved, lambda kv: kv[1] is not None)
    bw.output("out", kept, TestingSink(out))
    t0 = clock()
    bytewax_run_main(flow)
    return clock() - t0, len(out)


# -- measuring --------------------------------------------------------------------


# A runner returns (seconds, records emitted): an int, or a tuple of the
# counts of several sinks (the graph).
Runner = Callable[[list[list[Any]]], tuple[float, Any]]


def measure(variants: list[tuple[str, Runner]], batches: list[list[Any]],
            repeat: int, runs: dict[str, list[float]] | None = None,
            ) -> dict[str, tuple[float, Any]]:
    """name -> (least seconds, records emitted) over ``repeat`` rounds
    (and every round's seconds appended to ``runs[name]``, if given).

    The variants take turns within each round, so a burst of other load on
    the machine hits them alike. A variant must emit the same number of
    records every time.
    """
    best: dict[str, tuple[float, Any]] = {}
    for _ in range(repeat):
        for name, fn in variants:
            gc.collect()
            seconds, n = fn(batches)
            if runs is not None:
                runs.setdefault(name, []).append(seconds)
            if name in best:
                assert n == best[name][1], f"{name}: emitted {n}, before {best[name][1]}"
                seconds = min(seconds, best[name][0])
            best[name] = (seconds, n)
    return best


def paired(first: Runner, second: Runner, batches: list[list[Any]], rounds: int,
           emitted: int) -> list[tuple[float, float]]:
    """(seconds of ``first``, seconds of ``second``) of each round, run
    back to back; both must emit ``emitted`` records."""
    pairs = []
    for _ in range(rounds):
        times = []
        for fn in (first, second):
            gc.collect()
            seconds, n = fn(batches)
            assert n == emitted, (fn.__name__, n, emitted)
            times.append(seconds)
        pairs.append((times[0], times[1]))
    return pairs


def main(argv: list[str] | None = None) -> int:
    global clock
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000,
                        help="ticks in the input (default 200000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per measurement, the best kept (default 3)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="time runs by this process's CPU time (default) or wall time")
    parser.add_argument("--only", choices=("all", "graph"), default="all",
                        help="graph: run only the chain and the graph and print only "
                             "their table (default all)")
    args = parser.parse_args(argv)
    if args.records < 1 or args.repeat < 1:
        parser.error("--records and --repeat must be >= 1")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    t_start = time.perf_counter()
    records = make_records(args.records)
    total = len(records)
    print(
        f"input: {total} ticks, {SYMBOLS} symbols, unchanged={UNCHANGED}, "
        f"ChangeDetector(rel={REL}); best of {args.repeat}, {args.clock} time; "
        f"python {sys.version.split()[0]}, trio {trio.__version__}"
    )

    variants: list[tuple[str, Runner]] = [
        ("minimal loop", run_minimal),
        ("filter() loop", run_filter_loop),
        ("asyncio queue", run_asyncio),
        *([("bytewax", run_bytewax)] if bytewax_missing is None else []),
        ("engine", run_engine),
        ("engine untagged", run_engine_untagged),
        ("engine channels", run_engine_channels),
        ("engine unfresh", run_engine_unfresh),
        ("graph", run_graph),
    ]
    if bytewax_missing is not None:
        print(f"bytewax: left out: {bytewax_missing}")
    if args.only == "graph":
        variants = [(name, fn) for name, fn in variants if name in ("engine channels", "graph")]
    dear = sum(1 for r in records if is_dear(r))
    rows = []
    graph_rows = []
    rates: dict[tuple[str, int], float] = {}
    runs: dict[str, list[float]] = {}  # every round's seconds at the largest batch size
    for size in BATCH_SIZES:
        batches = cut(records, size)
        result = measure(variants, batches, args.repeat,
                         runs if size == BATCH_SIZES[-1] else None)
        graph_seconds, graph_counts = result.pop("graph")
        counts = {name: n for name, (_, n) in result.items()}
        assert len(set(counts.values())) == 1, f"batch size {size}: emitted counts differ: {counts}"
        want = (next(iter(counts.values())), dear, total)
        assert graph_counts == want, (
            f"batch size {size}: graph sinks (changed, filtered, passed) got {graph_counts}, "
            f"want {want}"
        )
        graph_rows.append(
            (size, len(batches), result["engine channels"][0], graph_seconds, graph_counts))
        for name, (seconds, n) in result.items():
            rates[name, size] = total / seconds
            rows.append((name, size, rates[name, size], n))

    if args.only == "graph":
        print_graph_table(graph_rows, total)
        print(f"\n({time.perf_counter() - t_start:.0f}s)")
        return 0

    # Metrics on/off at the largest batch size, taking turns; the difference
    # is a few percent, so more rounds (these runs are short), paired.
    size = BATCH_SIZES[-1]
    pairs = paired(run_engine_no_metrics, run_engine, cut(records, size),
                   max(7 * args.repeat, 21), counts["engine"])
    rate_on = total / min(on for _, on in pairs)
    rate_off = total / min(off for off, _ in pairs)
    overhead = 1 - statistics.median(off / on for off, on in pairs)

    print()
    peer = bytewax_missing is None
    header = (
        f"{'variant':<16} {'batch':>6} {'records/s':>13} {'vs minimal':>11} {'vs asyncio':>11} "
        + (f"{'vs bytewax':>11} " if peer else "") + f"{'us/batch':>9} {'emitted':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, size_, rate, n in rows:
        print(
            f"{name:<16} {size_:>6} {rate:>13,.0f} {rate / rates['minimal loop', size_]:>10.2f}x "
            f"{rate / rates['asyncio queue', size_]:>10.2f}x "
            + (f"{rate / rates['bytewax', size_]:>10.2f}x " if peer else "")
            + f"{size_ / rate * 1e6:>9.2f} {n:>9}"
        )
    print()
    print(
        f"metrics at batch {size}: enabled {rate_on:,.0f} records/s, disabled {rate_off:,.0f} "
        f"records/s (best of each), overhead {overhead * 100:.1f}% (median of {len(pairs)} pairs)"
    )

    print_graph_table(graph_rows, total)

    size1, nbatches1, chain1, _, _ = graph_rows[0]
    hop_us = chain1 / nbatches1 / CHAIN_HOPS * 1e6
    print()
    checks = []
    peers = [("minimal loop", 0.7), ("asyncio queue", 8.0)] + ([("bytewax", 20.0)] if peer else [])
    for other, target in peers:
        paired_ratio = statistics.median(
            theirs / ours for ours, theirs in zip(runs["engine"], runs[other], strict=True))
        best_ratio = rates["engine", size] / rates[other, size]
        checks.append((f"engine >= {target:g}x {other} at batch {size}", paired_ratio >= target,
                       f"{paired_ratio:.2f}x (median of the {len(runs[other])} rounds' ratios; "
                       f"best against best {best_ratio:.2f}x)"))
    checks += [
        (f"chain <= 8 us per hop at batch {size1}", hop_us <= 8, f"{hop_us:.2f} us"),
        ("metrics overhead <= 3%", overhead <= 0.03, f"{overhead * 100:.1f}%"),
    ]
    for what, ok, got in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}: {got}")
    if not peer:
        print(f"(bytewax left out: {bytewax_missing})")
    print(f"\n({time.perf_counter() - t_start:.0f}s)")
    return 0


def print_graph_table(graph_rows: list[tuple[int, int, float, float, tuple[int, int, int]]],
                      total: int) -> None:
    """The chain and the graph at each batch size: records/s, cost per batch
    and per hop, the graph's as multiples of the chain's, the sinks' counts."""
    print()
    print(
        f"graph: source -> change -> changed, source -[price > {DEAR:g}]-> filtered, "
        f"source -> relay -> passed ({GRAPH_HOPS} hops); chain: source -> change -> null "
        f"({CHAIN_HOPS} channel hops: engine channels)"
    )
    header = (
        f"{'variant':<7} {'batch':>6} {'hops':>4} {'records/s':>13} {'us/batch':>9} "
        f"{'us/batch/hop':>12} {'time vs chain':>13} {'per hop vs chain':>16}  sinks"
    )
    print(header)
    print("-" * len(header))
    for size, nbatches, chain_s, graph_s, (changed, filtered, passed) in graph_rows:
        chain_hop = chain_s / nbatches / CHAIN_HOPS * 1e6
        graph_hop = graph_s / nbatches / GRAPH_HOPS * 1e6
        print(
            f"{'chain':<7} {size:>6} {CHAIN_HOPS:>4} {total / chain_s:>13,.0f} "
            f"{chain_s / nbatches * 1e6:>9.2f} {chain_hop:>12.2f} {'':>13} {'':>16}  "
            f"null={changed}"
        )
        print(
            f"{'graph':<7} {size:>6} {GRAPH_HOPS:>4} {total / graph_s:>13,.0f} "
            f"{graph_s / nbatches * 1e6:>9.2f} {graph_hop:>12.2f} {graph_s / chain_s:>12.2f}x "
            f"{graph_hop / chain_hop:>15.2f}x  changed={changed} filtered={filtered} passed={passed}"
        )


if __name__ == "__main__":
    sys.exit(main())
