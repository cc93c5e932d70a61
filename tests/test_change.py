"""Tests of the last-value change detector (flows/_change.py).

See DESIGN.md, "Change detection": per key keep the last *emitted* value;
emit when the key is new, when the value moved by at least ``rel``/``abs``
from the last emitted value, or when ``heartbeat`` seconds passed since the
key last emitted. Invalid values are dropped, state is bounded by
``max_keys`` (least recently seen evicted).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, OrderedDict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows import ChangeDetector, Flow, Tick
from flows.testing import (
    ListSink,
    ListSource,
    assert_component_metrics,
    run_briefly,
    sample,
)

NAN, INF = math.nan, math.inf


def T(symbol: str, price: float, ts: float, source: str = "x") -> Tick:
    return Tick(source, symbol, price, ts)


def emitted_indices(det: ChangeDetector, records: list[Tick], batching: str) -> list[int]:
    """Indices (into ``records``) of the records ``det`` emits."""
    if batching == "one batch":
        out = det.filter(records)
    else:  # one record per filter() call
        out = [r for rec in records for r in det.filter([rec])]
    ids = [id(r) for r in records]
    assert len(set(ids)) == len(ids)
    return [ids.index(id(r)) for r in out]


# ---------------------------------------------------------------------------
# 1. Table of cases
# ---------------------------------------------------------------------------

CASES: list[tuple[str, dict[str, Any], list[Tick], list[int]]] = [
    ("first sight emits", {}, [T("A", 100.0, 0)], [0]),
    (
        "first sight of each key emits, even with a huge threshold",
        {"rel": 10.0, "abs": 1e9},
        [T("A", 1.0, 0), T("B", 1.0, 0), T("A", 1.0, 1)],
        [0, 1],
    ),
    (
        # 25% of 8 is 2 (exact in binary)
        "rel: below skipped, at and above emit, both directions",
        {"rel": 0.25},
        [
            T("A", 8.0, 0),  # first
            T("A", 9.5, 1),  # d=1.5 < 2: skip
            T("A", 10.0, 2),  # d=2 == 2: emit (at threshold)
            T("A", 10.0, 3),  # unchanged: skip
            T("A", 12.0, 4),  # d=2 < 2.5: skip
            T("A", 7.5, 5),  # d=2.5 == 2.5 downwards: emit
            T("A", 20.0, 6),  # far above: emit
        ],
        [0, 2, 5, 6],
    ),
    (
        "abs: below skipped, at and above emit, both directions",
        {"abs": 0.5},
        [
            T("A", 10.0, 0),
            T("A", 10.25, 1),  # skip
            T("A", 10.5, 2),  # d=0.5: emit
            T("A", 10.0, 3),  # d=0.5 downwards: emit
            T("A", 10.25, 4),  # skip
            T("A", 9.75, 5),  # d=0.25: skip
            T("A", 12.0, 6),  # emit
        ],
        [0, 2, 3, 6],
    ),
    (
        "rel or abs: either threshold is enough",
        {"rel": 0.5, "abs": 1.0},
        [
            T("A", 100.0, 0),
            T("A", 100.5, 1),  # below both: skip
            T("A", 101.0, 2),  # abs reached (rel needs 50): emit
            T("A", 101.5, 3),  # skip
        ],
        [0, 2],
    ),
    (
        "rel and abs both 0: any change emits, identical skips",
        {},
        [
            T("A", 10.0, 0),
            T("A", 10.0, 1),  # identical: skip
            T("A", 10.000000000000002, 2),  # smallest move: emit
            T("A", 10.000000000000002, 3),  # skip
            T("A", 10.0, 4),  # emit
        ],
        [0, 2, 4],
    ),
    (
        "heartbeat re-emits an unchanged price once ts - last_emit_ts >= heartbeat",
        {"rel": 0.25, "heartbeat": 60.0},
        [
            T("A", 8.0, 0),
            T("A", 8.0, 30),  # skip
            T("A", 8.0, 59.5),  # skip
            T("A", 8.0, 60),  # exactly 60 since last emit: emit
            T("A", 8.0, 100),  # 40 since last emit (not since last seen): skip
            T("A", 8.0, 119.9),  # skip
            T("A", 8.0, 120),  # emit
        ],
        [0, 3, 6],
    ),
    (
        "heartbeat with exact mode; a change restarts the heartbeat clock",
        {"heartbeat": 10.0},
        [
            T("A", 5.0, 0),
            T("A", 6.0, 5),  # change: emit, clock restarts at 5
            T("A", 6.0, 10),  # 5 since last emit: skip
            T("A", 6.0, 15),  # 10: emit
        ],
        [0, 1, 3],
    ),
    (
        "heartbeat is per key",
        {"rel": 0.25, "heartbeat": 10.0},
        [
            T("A", 8.0, 0),
            T("B", 8.0, 5),
            T("A", 8.0, 10),  # A: 10 since its emit: emit
            T("B", 8.0, 10),  # B: 5 since its emit: skip
            T("B", 8.0, 15),  # emit
        ],
        [0, 1, 2, 4],
    ),
    (
        "drift: many small moves emit once they add up (vs last emitted, not last seen)",
        {"rel": 0.25},
        [
            T("A", 8.0, 0),
            T("A", 8.5, 1),  # each step is < 25% of the previous value
            T("A", 9.0, 2),
            T("A", 9.5, 3),
            T("A", 10.0, 4),  # 2 from 8: emit
            T("A", 10.5, 5),
            T("A", 11.0, 6),
            T("A", 11.5, 7),
            T("A", 12.0, 8),
            T("A", 12.5, 9),  # 2.5 from 10: emit
        ],
        [0, 4, 9],
    ),
    ("A -> B -> A emits all three (exact)", {}, [T("A", 10.0, 0), T("A", 11.0, 1), T("A", 10.0, 2)], [0, 1, 2]),
    (
        "A -> B -> A emits all three (rel)",
        {"rel": 0.25},
        [T("A", 8.0, 0), T("A", 12.0, 1), T("A", 8.0, 2)],
        [0, 1, 2],
    ),
    (
        "invalid prices are dropped and do not disturb state",
        {},
        [
            T("A", 10.0, 0),
            T("A", NAN, 1),
            T("A", INF, 2),
            T("A", -INF, 3),
            T("A", -10.0, 4),
            T("A", 0.0, 5),
            T("A", -0.0, 6),
            T("A", 10.0, 7),  # still the same as the last emitted 10: skip
            T("A", 11.0, 8),
        ],
        [0, 8],
    ),
    (
        "invalid first record does not create the key",
        {"rel": 10.0, "abs": 1e9},
        [T("A", NAN, 0), T("A", -1.0, 1), T("A", 0.0, 2), T("A", 5.0, 3), T("A", 6.0, 4)],
        [3],
    ),
    (
        "invalid records do not reset the heartbeat clock",
        {"heartbeat": 10.0},
        [T("A", 10.0, 0), T("A", NAN, 9), T("A", 10.0, 10)],
        [0, 2],
    ),
    (
        "keys are per (source, symbol)",
        {},
        [
            T("A", 10.0, 0, source="s1"),
            T("A", 10.0, 0, source="s2"),  # same symbol, other source: new key
            T("A", 10.0, 1, source="s1"),  # skip
            T("A", 11.0, 1, source="s2"),  # emit (s2 moved)
            T("A", 10.0, 2, source="s2"),  # emit (s2 back)
            T("A", 10.0, 2, source="s1"),  # skip (s1 never moved)
        ],
        [0, 1, 3, 4],
    ),
    (
        "max_keys evicts the least recently SEEN key; evicted key is new again",
        {"max_keys": 2},
        [
            T("A", 10.0, 0),
            T("B", 10.0, 1),
            T("A", 10.0, 2),  # skip, but A is now the most recently seen
            T("C", 10.0, 3),  # new: evicts B (least recently seen), not A
            T("A", 10.0, 4),  # A survived: unchanged: skip
            T("B", 10.0, 5),  # B was evicted: new again: emit (evicts C)
            T("A", 10.0, 6),  # A still there: skip
            T("C", 10.0, 7),  # C was evicted: emit
        ],
        [0, 1, 3, 5, 7],
    ),
    (
        "max_keys=1 keeps only the latest key",
        {"max_keys": 1},
        [T("A", 10.0, 0), T("A", 10.0, 1), T("B", 10.0, 2), T("A", 10.0, 3), T("A", 10.0, 4)],
        [0, 2, 3],
    ),
    (
        "an invalid record does not count as 'seen' for eviction",
        {"max_keys": 2},
        [
            T("A", 10.0, 0),
            T("B", 10.0, 1),
            T("A", NAN, 2),  # invalid: A stays least recently seen
            T("C", 10.0, 3),  # evicts A
            T("B", 10.0, 4),  # B survived: skip
            T("A", 10.0, 5),  # A is new again: emit
        ],
        [0, 1, 3, 5],
    ),
]


@pytest.mark.parametrize("batching", ["one batch", "one record per call"])
@pytest.mark.parametrize(("kwargs", "records", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_filter_cases(kwargs: dict[str, Any], records: list[Tick], expected: list[int], batching: str) -> None:
    det = ChangeDetector(**kwargs)
    assert emitted_indices(det, records, batching) == expected
    assert len(det.state) <= det.max_keys


def test_invalid_records_leave_state_untouched() -> None:
    det = ChangeDetector(rel=0.1, heartbeat=5.0, max_keys=2)
    det.filter([T("A", 10.0, 0), T("B", 20.0, 1)])
    before = [(k, list(v)) for k, v in det.state.items()]
    assert det.filter([T("A", x, 100) for x in (NAN, INF, -INF, -1.0, 0.0)]) == []
    assert det.filter([T("Z", NAN, 100)]) == []
    assert [(k, list(v)) for k, v in det.state.items()] == before


def test_state_holds_last_emitted_value_and_time() -> None:
    # (internals: the time is kept where a heartbeat needs it, in either form)
    for kwargs in ({"heartbeat": 60.0}, {"heartbeat": 60.0, "max_keys": 10}):
        det = ChangeDetector(rel=0.25, **kwargs)
        det.filter([T("A", 8.0, 0), T("A", 9.0, 1), T("A", 10.0, 2), T("A", 11.0, 3)])
        assert det.state[("x", "A")] == [10.0, 2]
    for kwargs in ({}, {"max_keys": 10}):
        det = ChangeDetector(rel=0.25, **kwargs)
        det.filter([T("A", 8.0, 0), T("A", 9.0, 1), T("A", 10.0, 2), T("A", 11.0, 3)])
        assert det.state[("x", "A")] == [10.0, None]


def test_state_never_exceeds_max_keys_within_a_batch() -> None:
    det = ChangeDetector(max_keys=3)
    seen = []
    det.key = lambda r: (seen.append(len(det.state)), (r.source, r.symbol))[1]
    out = det.filter([T(str(i), 1.0, i) for i in range(20)])
    assert len(out) == 20
    assert max(seen) <= 3
    assert list(det.state) == [("x", "17"), ("x", "18"), ("x", "19")]


def test_custom_key_value_time() -> None:
    det = ChangeDetector(
        abs=1.0,
        heartbeat=10.0,
        key=lambda r: r["k"],
        value=lambda r: r["v"],
        time=lambda r: r["t"],
    )
    recs = [
        {"k": "a", "v": 1.0, "t": 0.0},
        {"k": "a", "v": 1.5, "t": 1.0},  # skip
        {"k": "b", "v": 1.5, "t": 1.0},  # new key
        {"k": "a", "v": 2.0, "t": 2.0},  # d=1: emit
        {"k": "a", "v": 2.0, "t": 12.0},  # heartbeat
        {"k": "a", "v": math.nan, "t": 13.0},  # invalid
    ]
    assert [recs.index(r) for r in det.filter(recs)] == [0, 2, 3, 4]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rel": -0.1},
        {"abs": -1.0},
        {"rel": NAN},
        {"abs": NAN},
        {"heartbeat": 0.0},
        {"heartbeat": -1.0},
        {"heartbeat": NAN},
        {"max_keys": 0},
    ],
    ids=repr,
)
def test_rejects_bad_parameters(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ChangeDetector(**kwargs)


def test_filter_of_nothing() -> None:
    det = ChangeDetector()
    assert det.filter([]) == []
    assert not det.state


# ---------------------------------------------------------------------------
# 2. Metrics, in a real flow
# ---------------------------------------------------------------------------

DISCARDED = "flows_records_discarded_total"


def discarded(registry: Any, flow: str, reason: str) -> float:
    return sample(registry, DISCARDED, flow, "change", reason=reason)


async def test_metrics_in_a_flow() -> None:
    batches = [
        [
            T("A", 10.0, 0),  # emit (new)
            T("B", 10.0, 0),  # emit (new)
            T("A", 10.0, 1),  # unchanged
            T("A", NAN, 1),  # invalid
        ],
        [
            T("C", 10.0, 2),  # emit (new; evicts B)
            T("A", 20.0, 3),  # emit (moved)
            T("B", -1.0, 3),  # invalid
            T("B", 10.0, 4),  # emit (new again; evicts C)
            T("C", 10.0, 5),  # emit (new again; evicts A)
        ],
        [
            T("C", 10.0, 6),  # unchanged
            T("B", 10.0, 6),  # unchanged: the whole batch is dropped
        ],
    ]
    det = ChangeDetector(max_keys=2)
    sink = ListSink()
    flow = Flow("chg", sources=[ListSource(batches)], stages=[det], sinks=[sink])
    result, registry = await run_briefly(flow)
    assert result.clean
    assert result.reason == "exhausted"

    got = [(r.symbol, r.price, r.ts) for r in sink.records]
    assert got == [
        ("A", 10.0, 0),
        ("B", 10.0, 0),
        ("C", 10.0, 2),
        ("A", 20.0, 3),
        ("B", 10.0, 4),
        ("C", 10.0, 5),
    ]
    assert sink.batches == 2  # an all-unchanged batch is not sent on

    values = assert_component_metrics(registry, "chg", "change", "stage")
    received = values["flows_records_received_total"]
    sent = values["flows_records_sent_total"]
    assert received == 11
    assert sent == 6
    assert discarded(registry, "chg", "unchanged") == 3
    assert discarded(registry, "chg", "invalid") == 2
    assert discarded(registry, "chg", "evicted") == 3
    assert sent + discarded(registry, "chg", "unchanged") + discarded(registry, "chg", "invalid") == received
    assert sample(registry, "flows_records_received_total", "chg", "collect") == 6


async def test_metrics_conservation_on_a_larger_flow() -> None:
    # Several sources' worth of keys, repeated prices, invalid values, evictions.
    batches = []
    for b in range(20):
        batch = []
        for i in range(25):
            n = b * 25 + i
            price = [1.0, 1.0, 2.0, NAN, 3.0, -1.0, 2.0][n % 7]
            symbol = f"S{n % 3}" if n % 2 else f"S{n % 11}"  # a few hot keys, many cold ones
            batch.append(T(symbol, price, n, source=f"src{n % 4 // 3}"))
        batches.append(batch)
    det = ChangeDetector(heartbeat=50.0, max_keys=8)
    reference = ChangeDetector(heartbeat=50.0, max_keys=8)
    expected = reference.filter([r for b in batches for r in b])
    sink = ListSink()
    flow = Flow("big", sources=[ListSource(batches)], stages=[det], sinks=[sink])
    result, registry = await run_briefly(flow)
    assert result.clean
    assert sink.records == expected

    values = assert_component_metrics(registry, "big", "change", "stage")
    received, sent = values["flows_records_received_total"], values["flows_records_sent_total"]
    unchanged, invalid = discarded(registry, "big", "unchanged"), discarded(registry, "big", "invalid")
    assert received == 500
    assert sent == len(expected)
    assert invalid == sum(1 for b in batches for r in b if not r.price > 0 or not math.isfinite(r.price))
    assert unchanged > 0 and invalid > 0
    assert discarded(registry, "big", "evicted") > 0
    assert sent + unchanged + invalid == received


def test_filter_counts_into_component_metrics() -> None:
    from prometheus_client import CollectorRegistry

    from flows._metrics import metrics_for

    registry = CollectorRegistry()
    m = metrics_for(registry).component("f", "change", "stage")
    det = ChangeDetector(max_keys=1)
    det.filter([T("A", 1.0, 0), T("A", 1.0, 1), T("B", 1.0, 2), T("B", INF, 3)], m)
    assert discarded(registry, "f", "unchanged") == 1
    assert discarded(registry, "f", "invalid") == 1
    assert discarded(registry, "f", "evicted") == 1
    det.filter([T("B", 1.0, 4)], m)  # nothing new: no zero-increments that move anything
    assert discarded(registry, "f", "unchanged") == 2
    assert discarded(registry, "f", "evicted") == 1


# ---------------------------------------------------------------------------
# 3. Properties
# ---------------------------------------------------------------------------

KEYS = [("s1", "A"), ("s1", "B"), ("s2", "A"), ("s2", "C")]

prices = st.one_of(
    st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from([1.0, 1.01, 1.5, 2.0, 100.0, 100.05]),  # repeats and small moves
    st.sampled_from([NAN, INF, -INF, 0.0, -0.0, -1.0, -100.0]),  # invalid
)
gaps = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=30.0), st.sampled_from([1.0, 5.0, 10.0]))
rels = st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=1.0), st.sampled_from([0.01, 0.25, 0.5]))
abses = st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=100.0), st.sampled_from([0.01, 0.5, 1.0]))
heartbeats = st.one_of(st.none(), st.floats(min_value=0.5, max_value=60.0), st.sampled_from([1.0, 10.0]))


@st.composite
def streams(draw: Any, max_size: int = 40) -> list[Tick]:
    items = draw(st.lists(st.tuples(st.sampled_from(KEYS), prices, gaps), max_size=max_size))
    ts, out = 1_000.0, []
    for (source, symbol), price, gap in items:
        ts += gap
        out.append(Tick(source, symbol, price, ts))
    return out


def valid(v: float) -> bool:
    return v > 0 and math.isfinite(v)


def moved(v: float, lv: float, rel: float, abs_: float) -> bool:
    """The detector's threshold test, written the same way (same rounding)."""
    d = abs(v - lv)
    if rel == 0 and abs_ == 0:
        return d != 0
    return bool((rel and d >= rel * lv) or (abs_ and d >= abs_))


def split(records: list[Tick], cuts: list[int]) -> list[list[Tick]]:
    bounds = sorted({0, len(records), *(c % (len(records) + 1) for c in cuts)})
    return [records[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=200, deadline=None)
@given(records=streams(), rel=rels, abs_=abses, hb=heartbeats, cuts=st.lists(st.integers(0, 100), max_size=6))
def test_properties(records: list[Tick], rel: float, abs_: float, hb: float | None, cuts: list[int]) -> None:
    det = ChangeDetector(rel=rel, abs=abs_, heartbeat=hb)  # max_keys large
    out = [r for batch in split(records, cuts) for r in det.filter(batch)]
    emitted = {id(r) for r in out}
    assert len(emitted) == len(out)  # each record at most once
    # Output is the emitted inputs in input order.
    assert out == [r for r in records if id(r) in emitted]

    last: dict[tuple[str, str], tuple[float, float]] = {}  # key -> (emitted value, ts)
    for r in records:
        k = (r.source, r.symbol)
        if not valid(r.price):
            # (d) invalid records are never emitted
            assert id(r) not in emitted, r
            continue
        if k not in last:
            # (c) the first valid record of each key is always emitted
            assert id(r) in emitted, r
            last[k] = (r.price, r.ts)
            continue
        lv, lt = last[k]
        beat = hb is not None and r.ts - lt >= hb
        if id(r) in emitted:
            # (a) an emitted value moved enough from the previous emitted one,
            # or the heartbeat fired
            assert beat or moved(r.price, lv, rel, abs_), (r, lv, lt)
            last[k] = (r.price, r.ts)
        else:
            # (b) no key is silent longer than the heartbeat while fed valid data
            assert not beat, (r, lv, lt)
            # and a skipped value really did not move enough
            assert not moved(r.price, lv, rel, abs_), (r, lv, lt)


class Reference:
    """A simple model: an LRU dict of key -> (last emitted value, its time)."""

    def __init__(self, rel: float, abs_: float, hb: float | None, max_keys: int) -> None:
        self.rel, self.abs, self.hb, self.max_keys = rel, abs_, hb, max_keys
        self.state: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()
        self.evicted = 0

    def emits(self, r: Tick) -> bool:
        if not valid(r.price):
            return False
        k = (r.source, r.symbol)
        if k not in self.state:
            self.state[k] = (r.price, r.ts)
            if len(self.state) > self.max_keys:
                self.state.popitem(last=False)
                self.evicted += 1
            return True
        self.state.move_to_end(k)
        lv, lt = self.state[k]
        if moved(r.price, lv, self.rel, self.abs) or (self.hb is not None and r.ts - lt >= self.hb):
            self.state[k] = (r.price, r.ts)
            return True
        return False


class CountingMetrics:
    """Stands in for ComponentMetrics (cheaper than a registry per example)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def discarded(self, reason: str, n: int = 1) -> None:
        assert n > 0, (reason, n)
        self.counts[reason] += n


@settings(max_examples=200, deadline=None)
@given(
    records=streams(),
    rel=rels,
    abs_=abses,
    hb=heartbeats,
    max_keys=st.integers(1, 5),
    cuts=st.lists(st.integers(0, 100), max_size=6),
)
def test_matches_lru_reference_model(
    records: list[Tick], rel: float, abs_: float, hb: float | None, max_keys: int, cuts: list[int]
) -> None:
    m = CountingMetrics()
    det = ChangeDetector(rel=rel, abs=abs_, heartbeat=hb, max_keys=max_keys)
    ref = Reference(rel, abs_, hb, max_keys)
    out = []
    for batch in split(records, cuts):
        out += det.filter(batch, m)
        assert len(det.state) <= max_keys
    assert out == [r for r in records if ref.emits(r)]
    assert list(det.state) == list(ref.state)
    # (times are kept only where a heartbeat reads them)
    assert {k: tuple(v) for k, v in det.state.items()} == {
        k: (v, t if hb is not None else None) for k, (v, t) in ref.state.items()}

    n_invalid = sum(1 for r in records if not valid(r.price))
    assert m.counts["invalid"] == n_invalid
    assert m.counts["evicted"] == ref.evicted
    assert len(out) + m.counts["unchanged"] + n_invalid == len(records)
    assert set(m.counts) <= {"invalid", "evicted", "unchanged"}
