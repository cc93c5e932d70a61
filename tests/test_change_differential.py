"""The change detector's fast paths against a small reference model.

``ChangeDetector`` keeps its state in one of two forms (a plain dict for
one source while eviction is far, an ordered dict otherwise) and filters
the plain form with a loop generated for its thresholds. ``Model`` below
is the rule written out per record, with nothing clever: it must agree
with the detector on every random stream: emitted records, discard
counts, the state (keys in recency order, values, times where kept) and
the acknowledged state a checkpoint holds, across batch cuts, eviction,
the switch between forms, a second source, custom accessors, heartbeats,
invalid values, rel and abs thresholds, and checkpoint round trips.
"""

from __future__ import annotations

import itertools
import math
import sys
import tempfile
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

import flows._change as change_module
from flows import Batch, ChangeDetector, Tick

NAN, INF = math.nan, math.inf


class Model:
    """Per record: invalid values dropped; a new key emits (evicting the
    least recently seen keys while full); a known key is marked seen (only
    once the state holds ``track_from`` keys) and emits when its value moved
    by ``rel``/``abs`` from the last emitted one or the heartbeat is due.
    ``acked`` follows what a checkpoint holds: the last acknowledged value
    per key, most recently emitted last, at most ``max_keys``."""

    def __init__(self, rel: float, abs_: float, hb: float | None, max_keys: int,
                 track_from: int) -> None:
        self.rel, self.abs, self.hb, self.max_keys = rel, abs_, hb, max_keys
        self.track_from = track_from
        self.state: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()
        self.acked: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()
        self.counts: Counter[str] = Counter()

    def moved(self, v: float, lv: float) -> bool:
        d = abs(v - lv)
        if self.rel == 0 and self.abs == 0:
            return d != 0
        return bool((self.rel and d >= self.rel * lv) or (self.abs and d >= self.abs))

    def emits(self, r: Tick) -> bool:
        v, k = r.price, (r.source, r.symbol)
        if not (v > 0 and math.isfinite(v)):
            self.counts["invalid"] += 1
            return False
        if k not in self.state:
            while len(self.state) >= self.max_keys:
                self.state.popitem(last=False)
                self.counts["evicted"] += 1
            self.state[k] = (v, r.ts)
            return True
        if len(self.state) >= self.track_from:
            self.state.move_to_end(k)
        lv, lt = self.state[k]
        if self.moved(v, lv) or (self.hb is not None and r.ts - lt >= self.hb):
            self.state[k] = (v, r.ts)
            return True
        self.counts["unchanged"] += 1
        return False

    def ack(self, records: list[Tick], outcome: str) -> None:
        if outcome == "failed":
            return
        for r in records:
            k = (r.source, r.symbol)
            self.acked[k] = (r.price, r.ts)
            self.acked.move_to_end(k)
        while len(self.acked) > self.max_keys:
            self.acked.popitem(last=False)

    def restore(self) -> None:
        """A restart from the checkpoint: the state is what was acknowledged."""
        self.state = OrderedDict(self.acked)


class CountingMetrics:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def discarded(self, reason: str, n: int = 1) -> None:
        assert n > 0, (reason, n)
        self.counts[reason] += n


SYMBOLS = ["A", "B", "C", "D", "E", "F", "G", "H"]
prices = st.one_of(
    st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from([1.0, 1.01, 1.5, 2.0, 100.0, 100.05, 100.1]),
    st.sampled_from([NAN, INF, -INF, 0.0, -0.0, -1.0, -100.0]),
)
gaps = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=30.0),
                 st.sampled_from([1.0, 10.0, 7.5]))


@st.composite
def streams(draw: Any) -> list[Tick]:
    items = draw(st.lists(st.tuples(st.sampled_from(["s1", "s1", "s1", "s2"]),
                                    st.sampled_from(SYMBOLS), prices, gaps), max_size=60))
    # one source only, or a second one from some record on
    second_from = draw(st.none() | st.integers(0, 60))
    ts, out = 1_000.0, []
    for i, (source, symbol, price, gap) in enumerate(items):
        ts += gap
        if second_from is None or i < second_from:
            source = "s1"
        stamp = NAN if gap == 7.5 else ts  # now and then a record without a usable time
        out.append(Tick(source, symbol, price, stamp))
    return out


def split(records: list[Tick], cuts: list[int]) -> list[list[Tick]]:
    bounds = sorted({0, len(records), *(c % (len(records) + 1) for c in cuts)})
    return [records[a:b] for a, b in itertools.pairwise(bounds)]


def custom_key(r: Tick) -> tuple[str, str]:
    return (r.source, r.symbol)


def custom_value(r: Tick) -> float:
    return r.price


def custom_time(r: Tick) -> float:
    return r.ts


@contextmanager
def small_track_threshold() -> Iterator[None]:
    """Detectors with max_keys >= 4 wait for a state three quarters full
    before they track recency (1024 in production), so small streams cross
    every form."""
    saved = change_module._TRACK_ALWAYS_BELOW
    change_module._TRACK_ALWAYS_BELOW = 4
    try:
        yield
    finally:
        change_module._TRACK_ALWAYS_BELOW = saved


def ticks(*prices_and_times: tuple[float, float], source: str = "s1") -> list[Tick]:
    return [Tick(source, "A", p, t) for p, t in prices_and_times]


EXAMPLE = {"hb": None, "max_keys": 100, "cuts": [], "custom": False, "round_trip": None,
           "outcomes": []}


@settings(max_examples=1000, deadline=None)
@example(records=ticks((1.0, 1.0), (-1.0, 2.0), (0.0, 3.0)), rel=0.0, abs_=50.0, **EXAMPLE)
@example(records=ticks((1.0, 1.0), (-1.0, 2.0)), rel=3.0, abs_=0.0, **EXAMPLE)
@example(records=ticks((1.0, 1.0), (1.0, 2.0), (1.0 + 2**-52, 3.0), (NAN, 4.0)), rel=0.0,
         abs_=0.0, **EXAMPLE)
@example(records=ticks((1.0, 1.0), (1.0, NAN), (1.0, 30.0)), rel=0.1, abs_=0.0,
         **{**EXAMPLE, "hb": 10.0})
@example(records=ticks((8.0, 1.0), (10.0, 2.0), (7.5, 3.0), (9.5, 4.0)), rel=0.25, abs_=0.0,
         **EXAMPLE)  # exactly at the threshold (25% of 8 is 2)
@example(records=ticks((100.0, 1.0), (100.5, 2.0), (101.0, 3.0)), rel=0.5, abs_=1.0, **EXAMPLE)
@example(records=[Tick("s1", s, 1.0, 1.0) for s in "ABCADE"], rel=0.0, abs_=0.0,
         **{**EXAMPLE, "max_keys": 4})  # a hit just after the state reached track_from
@example(records=[Tick("s1", s, 1.0, 1.0) for s in "ABC"] + [Tick("s1", "D", 1.0, 2.0)],
         rel=0.0, abs_=0.0, **{**EXAMPLE, "cuts": [3], "round_trip": 1})
@example(records=[Tick("s1", s, 1.0, 1.0) for s in "ABC"] + [Tick("s2", "A", 1.0, 2.0)]
         + [Tick("s1", s, 1.0, 3.0) for s in "DE"],
         rel=0.0, abs_=0.0, **{**EXAMPLE, "max_keys": 4, "cuts": [3, 4]})
@given(
    records=streams(),
    rel=st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=3.0),
                  st.sampled_from([0.01, 0.25, 1.5])),
    abs_=st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=100.0),
                   st.sampled_from([0.01, 0.5, 50.0])),
    hb=st.one_of(st.none(), st.floats(min_value=0.5, max_value=60.0), st.sampled_from([1.0, 10.0])),
    max_keys=st.one_of(st.integers(1, 12), st.integers(13, 150)),
    cuts=st.lists(st.integers(0, 100), max_size=8),
    custom=st.booleans(),
    round_trip=st.none() | st.integers(0, 10),
    outcomes=st.lists(st.sampled_from(["written", "written", "skipped", "failed"]), max_size=12),
)
def test_detector_agrees_with_the_model(
    records: list[Tick], rel: float, abs_: float, hb: float | None, max_keys: int,
    cuts: list[int], custom: bool, round_trip: int | None, outcomes: list[str],
) -> None:
    accessors = {"key": custom_key, "value": custom_value, "time": custom_time} if custom else {}
    track_from = max_keys - max_keys // 4 if max_keys >= 4 else 0
    with small_track_threshold(), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "change.ckpt"

        def detector() -> ChangeDetector:
            return ChangeDetector(rel=rel, abs=abs_, heartbeat=hb, max_keys=max_keys,
                                  checkpoint=path, **accessors)

        det, model, metrics = detector(), Model(rel, abs_, hb, max_keys, track_from), CountingMetrics()
        for i, batch in enumerate(split(records, cuts)):
            if i == round_trip:  # a restart: save what was acknowledged, restore it
                det.save()
                det = detector()
                det.restore()
                model.restore()
            out = det.filter(batch, metrics)
            assert out == [r for r in batch if model.emits(r)], i
            if out:  # acknowledged as the runtime's sinks would
                outcome = outcomes[i % len(outcomes)] if outcomes else "written"
                emitted = Batch(out)
                det._track(emitted)
                emitted.ack(outcome)
                model.ack(out, outcome)

    assert +metrics.counts == +model.counts
    state = det.state
    assert list(state) == list(model.state)
    for k, (v, t) in state.items():
        lv, lt = model.state[k]
        assert v == lv, k
        if t is not None or hb is not None:
            assert same(t, lt), k
    assert list(det.acked) == list(model.acked)
    for k, (v, t) in det.acked.items():
        assert (v, same(t, model.acked[k][1])) == (model.acked[k][0], True), k


def same(a: float, b: float) -> bool:
    """Equal, NaN included."""
    return a == b or (math.isnan(a) and math.isnan(b))


def test_every_form_is_reached() -> None:
    """The stream shapes above reach the plain form, the ordered one, the
    switch between them and eviction (a sanity check of the strategies)."""
    with small_track_threshold():
        det = ChangeDetector(max_keys=6)
        det.filter([Tick("s1", s, 1.0, 0.0) for s in "AB"])
        assert det._od is None
        det.filter([Tick("s1", s, 1.0, 0.0) for s in "AB"])
        assert det._od is None  # plain
        det.filter([Tick("s1", s, 1.0, 1.0) for s in "CDEFGH"])
        assert det._od is not None and len(det.state) == 6  # ordered, evicted
        mixed = ChangeDetector(max_keys=100)
        mixed.filter([Tick("s1", "A", 1.0, 0.0), Tick("s2", "A", 1.0, 0.0)])
        assert list(mixed.state) == [("s1", "A"), ("s2", "A")] and mixed._src is None


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(st.tuples(st.sampled_from(SYMBOLS[:4]),
                             st.one_of(st.sampled_from([1, 2, 100, 1.0, 1.5, 100.0, 0, -1]), prices),
                             st.sampled_from([0, 1, 5, 0.5, 12.0])), max_size=40),
    hb=st.sampled_from([1.0, 10.0]),
    int_times=st.booleans(),
    cuts=st.lists(st.integers(0, 100), max_size=6),
)
def test_heartbeat_with_ints_agrees_with_the_model(
    items: list[tuple[str, Any, float]], hb: float, int_times: bool, cuts: list[int],
) -> None:
    """With a heartbeat the plain form packs floats only: an int value or
    time moves the state to the ordered form, and nothing else changes."""
    ts: Any = 1_000
    records = []
    for symbol, price, gap in items:
        ts += gap
        records.append(Tick("s1", symbol, price, int(ts) if int_times else float(ts)))
    det, model = ChangeDetector(rel=0.01, heartbeat=hb), Model(0.01, 0.0, hb, 1_000_000, 750_000)
    metrics = CountingMetrics()
    for batch in split(records, cuts):
        assert det.filter(batch, metrics) == [r for r in batch if model.emits(r)]
    assert +metrics.counts == +model.counts
    assert [(k, v, t) for k, (v, t) in det.state.items()] == [
        (k, v, t) for k, (v, t) in model.state.items()]


def test_turning_the_heartbeat_on_later_counts_earlier_keys_as_never_emitted() -> None:
    """Times are not kept without a heartbeat: turned on later, it is due at
    once for the keys stored before (in the plain form, and in the ordered
    form a non-float value leads to); turned off again, the values stay."""
    for price in (1.0, 1):
        det = ChangeDetector(rel=0.5)
        det.filter([Tick("s1", "A", price, 1.0), Tick("s1", "B", 2.0, 1.0)])
        det.heartbeat = 100.0
        assert det.filter([Tick("s1", "A", price, 2.0)]) == [Tick("s1", "A", price, 2.0)]
        assert det.filter([Tick("s1", "A", price, 3.0)]) == []
        assert det.filter([Tick("s1", "A", price, 102.0)]) == [Tick("s1", "A", price, 102.0)]
        assert (det._od is None) == (price.__class__ is float)
        det.heartbeat = None
        assert det.filter([Tick("s1", "A", price, 500.0), Tick("s1", "B", 2.5, 500.0)]) == []
        assert [(k, v) for k, (v, _) in det.state.items()] == [(("s1", "A"), price),
                                                               (("s1", "B"), 2.0)]


# -- the ranked form's eviction ---------------------------------------------------
#
# Without a heartbeat the ordered form is a dict key -> (value, seq); eviction
# pops a list of the keys with the smallest seqs, made in one pass when it is
# empty, skipping keys seen since. With a list of one or two keys (in
# production: a quarter of the state, at least 64) small streams exhaust it,
# make it again, and touch its keys after it was made.


@contextmanager
def few_candidates() -> Iterator[None]:
    saved = change_module._OLDEST_AT_LEAST
    change_module._OLDEST_AT_LEAST = 1
    try:
        yield
    finally:
        change_module._OLDEST_AT_LEAST = saved


ranked_streams = st.lists(
    st.tuples(st.sampled_from("ABCDEFGHIJ"),
              st.sampled_from([1.0, 1.0, 1.0, 2.0, 1, 2, NAN])), max_size=80)


@settings(max_examples=400, deadline=None)
@example(items=[(s, 1.0) for s in "ABCDEBF"], max_keys=4, cuts=[], round_trip=None,
         custom=False)  # B is a candidate when E evicts A, seen, then passed over for C
@given(
    items=ranked_streams,
    max_keys=st.integers(1, 9),
    cuts=st.lists(st.integers(0, 100), max_size=6),
    round_trip=st.none() | st.integers(0, 6),
    custom=st.booleans(),
)
def test_ranked_eviction_agrees_with_the_model(
    items: list[tuple[str, float]], max_keys: int, cuts: list[int], round_trip: int | None,
    custom: bool,
) -> None:
    """Least recently seen first, across candidate lists made again and
    again, candidates seen after their list was made, (value, seq) tuples
    for int values, whole keys, and eviction past max_keys after a restore."""
    records = [Tick("s1", s, p, 1_000.0 + i) for i, (s, p) in enumerate(items)]
    accessors = {"key": custom_key, "value": custom_value, "time": custom_time} if custom else {}
    with few_candidates(), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "change.ckpt"

        def detector() -> ChangeDetector:
            return ChangeDetector(rel=0.1, max_keys=max_keys, checkpoint=path, **accessors)

        det, model, metrics = detector(), Model(0.1, 0.0, None, max_keys, 0), CountingMetrics()
        for i, batch in enumerate(split(records, cuts)):
            if i == round_trip:
                det.save()
                det = detector()
                det.restore()
                model.restore()  # (recency as of the acked batches: emitted last, last)
            out = det.filter(batch, metrics)
            assert out == [r for r in batch if model.emits(r)], i
            assert det._od is None or det._od.__class__ is dict  # ranked
            if out:
                emitted = Batch(out)
                det._track(emitted)
                emitted.ack("written")
                model.ack(out, "written")
            assert list(det.state) == list(model.state), i
    assert +metrics.counts == +model.counts
    assert [(k, v) for k, (v, _) in det.state.items()] == [
        (k, v) for k, (v, _) in model.state.items()]


def test_a_candidate_seen_after_its_list_was_made_is_not_evicted() -> None:
    with few_candidates():
        det = ChangeDetector(max_keys=4)  # (below 1024: recency tracked from the first key)
        det.filter([Tick("s1", s, 1.0, 1.0) for s in "ABCD"])
        det.filter([Tick("s1", "E", 1.0, 2.0)])  # evicts A; B stays a candidate
        assert ("s1", "B") in det.state and det._oldest == ["B"]
        det.filter([Tick("s1", "B", 1.0, 3.0), Tick("s1", "F", 1.0, 4.0)])
        assert list(det.state) == [("s1", k) for k in "DEBF"]  # C went, not B


def test_churn_keeps_the_ordered_form_compact() -> None:
    """A dict that had deletions grows to three times its keys when its
    entries run out; the ordered form copies itself back (checked per
    batch), ranked, with or without a heartbeat (then its times array
    drops the dead times too)."""
    for heartbeat in (None, 60.0):
        det = ChangeDetector(max_keys=2000, heartbeat=heartbeat)
        for start in range(0, 30_000, 100):
            det.filter([Tick("s1", f"K{i}", 1.0, 1.0) for i in range(start, start + 100)])
            od = det._od
            if od is not None:
                assert sys.getsizeof(od) <= sys.getsizeof(od.__class__(od)), (heartbeat, start)
        assert len(det.state) == 2000 and next(iter(det.state)) == ("s1", "K28000")
        # (was: an OrderedDict with a heartbeat, before the timed ranked form)
        assert det._od.__class__ is dict and (det._times is not None) == (heartbeat is not None)
        if det._times is not None:
            assert len(det._times) <= 4 * 2000 + 64 + 100


def test_a_heartbeat_turned_on_in_the_ranked_form_counts_its_keys_as_never_emitted() -> None:
    """The ranked form keeps no times: turned on, the heartbeat is due at
    once for its keys (as in the plain form); recency order is kept both
    ways."""
    det = ChangeDetector(rel=0.5, max_keys=10)
    det.filter([Tick("s1", s, 1.0, 1.0) for s in "ABC"] + [Tick("s1", "A", 1.0, 1.5)])
    assert list(det.state) == [("s1", k) for k in "BCA"] and det._od.__class__ is dict
    det.heartbeat = 100.0
    assert det.filter([Tick("s1", "B", 1.0, 2.0)]) == [Tick("s1", "B", 1.0, 2.0)]
    assert det.filter([Tick("s1", "B", 1.0, 3.0)]) == []
    assert isinstance(det._od, OrderedDict) and list(det.state) == [("s1", k) for k in "CAB"]
    det.heartbeat = None
    assert det.filter([Tick("s1", "C", 1.0, 4.0)]) == []
    assert det._od.__class__ is dict and list(det.state) == [("s1", k) for k in "ABC"]


@settings(max_examples=300, deadline=None)
@given(
    records=streams(),
    rel=st.one_of(st.just(0.0), st.sampled_from([0.01, 0.25, 1.5])),
    hb=st.none() | st.sampled_from([1.0, 10.0]),
    max_keys=st.one_of(st.integers(1, 12), st.integers(13, 150)),
    cuts=st.lists(st.integers(0, 100), max_size=8),
    lie=st.booleans(),
)
def test_a_batch_tagged_with_its_source_filters_as_an_untagged_one(
    records: list[Tick], rel: float, hb: float | None, max_keys: int, cuts: list[int], lie: bool,
) -> None:
    """``filter(source=)`` (a batch's ``source``) spares the per-record
    source check and changes nothing; a tag that the first or the last
    record contradicts is ignored."""
    with small_track_threshold():
        tagged = ChangeDetector(rel=rel, heartbeat=hb, max_keys=max_keys)
        untagged = ChangeDetector(rel=rel, heartbeat=hb, max_keys=max_keys)
        for batch in split(records, cuts):
            ends = {batch[0].source, batch[-1].source}
            single = {r.source for r in batch} == ends and len(ends) == 1
            liar = "s2" if "s2" not in ends else "s1"  # a tag the ends contradict
            tag = liar if lie else (batch[0].source if single else None)
            assert tagged.filter(batch, source=tag) == untagged.filter(batch)
        got, want = tagged.state, untagged.state
        assert list(got) == list(want)
        assert all(same(a, b) for k in got for a, b in zip(got[k], want[k], strict=True) if a is not None)


def test_a_tagged_batch_is_trusted_between_its_ends() -> None:
    """The tag is a promise the detector keeps to: it does not look at the
    records between the first and the last (a source that tags its batches
    must build every record with its name)."""
    batch = [Tick("s1", "A", 1.0, 1.0), Tick("s2", "A", 1.0, 2.0), Tick("s1", "B", 1.0, 3.0)]
    assert len(ChangeDetector().filter(batch)) == 3  # ("s2", "A") is a new key
    assert len(ChangeDetector().filter(batch, source="s1")) == 2  # taken for ("s1", "A")
    two = [Tick("s1", "A", 1.0, 1.0), Tick("s2", "A", 1.0, 2.0)]
    for tag in ("s1", "s2"):  # the last or the first record says otherwise: not trusted
        assert len(ChangeDetector().filter(two, source=tag)) == 2


# -- the timed ranked form ----------------------------------------------------------
#
# With a heartbeat the ordered form is the ranked dict key -> (value, seq) plus
# an array of emit times indexed by seq; it renumbers its seqs (and drops the
# dead times) once the array holds more than 4 * len + 64. With a threshold
# of len + 0 small streams renumber after almost every batch, between
# candidate lists, evictions and round trips; a time that is not a float
# moves the state to the OrderedDict form.


@contextmanager
def renumber_often() -> Iterator[None]:
    saved = change_module._RENUMBER_FACTOR, change_module._RENUMBER_SLACK
    change_module._RENUMBER_FACTOR, change_module._RENUMBER_SLACK = 1, 0
    try:
        yield
    finally:
        change_module._RENUMBER_FACTOR, change_module._RENUMBER_SLACK = saved


@settings(max_examples=500, deadline=None)
@example(records=[Tick("s1", s, 1.0, float(i)) for i, s in enumerate("ABCABDAEBA")],
         hb=3.0, max_keys=3, cuts=[2, 4, 6, 8], round_trip=None, custom=False, int_from=None,
         int_prices=False)
@given(
    records=streams(),
    hb=st.sampled_from([1.0, 10.0, 25.0]),
    max_keys=st.integers(1, 9),
    cuts=st.lists(st.integers(0, 100), max_size=10),
    round_trip=st.none() | st.integers(0, 10),
    custom=st.booleans(),
    int_from=st.none() | st.integers(0, 60),
    int_prices=st.booleans(),
)
def test_timed_ranked_form_agrees_with_the_model(
    records: list[Tick], hb: float, max_keys: int, cuts: list[int], round_trip: int | None,
    custom: bool, int_from: int | None, int_prices: bool,
) -> None:
    """Renumbering often, with a heartbeat, eviction from short candidate
    lists, a second source, round trips, int values (symbol C: (value, seq)
    tuples), and (from ``int_from`` on) int times that move the state to
    the OrderedDict form."""
    if int_prices:
        records = [Tick(r.source, r.symbol, int(r.price), r.ts)
                   if r.symbol == "C" and math.isfinite(r.price) else r for r in records]
    if int_from is not None:
        records = [Tick(r.source, r.symbol, r.price, int(r.ts) if i >= int_from and r.ts == r.ts
                        else r.ts) for i, r in enumerate(records)]
    accessors = {"key": custom_key, "value": custom_value, "time": custom_time} if custom else {}
    track_from = max_keys - max_keys // 4 if max_keys >= 4 else 0
    with (small_track_threshold(), few_candidates(), renumber_often(),
          tempfile.TemporaryDirectory() as tmp):
        path = Path(tmp) / "change.ckpt"

        def detector() -> ChangeDetector:
            return ChangeDetector(rel=0.1, heartbeat=hb, max_keys=max_keys, checkpoint=path,
                                  **accessors)

        det, model = detector(), Model(0.1, 0.0, hb, max_keys, track_from)
        metrics = CountingMetrics()
        for i, batch in enumerate(split(records, cuts)):
            if i == round_trip:
                det.save()
                det = detector()
                det.restore()
                model.restore()
            out = det.filter(batch, metrics)
            assert out == [r for r in batch if model.emits(r)], i
            if det._times is not None:
                assert len(det._times) <= len(det._od) or not batch, i  # renumbered
            if out:
                emitted = Batch(out)
                det._track(emitted)
                emitted.ack("written")
                model.ack(out, "written")
            state = det.state
            assert list(state) == list(model.state), i
            assert all(v == model.state[k][0] and same(t, model.state[k][1])
                       for k, (v, t) in state.items()), i
    assert +metrics.counts == +model.counts


def test_the_timed_ranked_form_renumbers_and_keeps_recency() -> None:
    """Hits past track_from take new seqs and copy their time; the array is
    renumbered once it holds more than four times the keys (plus 64): the seqs
    become 0..len-1 in recency order, each key's time kept."""
    det = ChangeDetector(rel=0.5, heartbeat=100.0, max_keys=4)
    det.filter([Tick("s1", s, 1.0, float(i)) for i, s in enumerate("ABCD")])
    assert det._od.__class__ is dict and list(det._times) == [0.0, 1.0, 2.0, 3.0]
    hits = [Tick("s1", s, 1.0, 50.0) for s in "BA" * 40]  # 80 hits: 84 times > 4 * 4 + 64
    assert det.filter(hits) == []
    assert sorted(c.imag for c in det._od.values()) == [0.0, 1.0, 2.0, 3.0]
    assert list(det._times) == [2.0, 3.0, 1.0, 0.0] and det._oldest == []
    assert [(k[1], t) for k, (_, t) in det.state.items()] == [
        ("C", 2.0), ("D", 3.0), ("B", 1.0), ("A", 0.0)]
    assert det.filter([Tick("s1", "E", 1.0, 60.0), Tick("s1", "C", 1.0, 102.0)]) == [
        Tick("s1", "E", 1.0, 60.0), Tick("s1", "C", 1.0, 102.0)]  # C evicted, new again
    assert list(det.state) == [("s1", k) for k in "BAEC"]


def test_a_heartbeat_turned_off_and_on_in_the_timed_ranked_form() -> None:
    """Off, the times are dropped (the ranked form); on again, the keys
    count as never emitted (the OrderedDict form, as from the ranked one)."""
    det = ChangeDetector(rel=0.5, heartbeat=100.0, max_keys=10)
    det.filter([Tick("s1", s, 1.0, 1.0) for s in "ABC"])
    assert det._times is not None
    det.heartbeat = None
    assert det.filter([Tick("s1", "A", 1.0, 500.0)]) == []
    assert det._od.__class__ is dict and det._times is None
    det.heartbeat = 100.0
    assert det.filter([Tick("s1", "B", 1.0, 501.0)]) == [Tick("s1", "B", 1.0, 501.0)]
    assert det.filter([Tick("s1", "B", 1.0, 502.0)]) == []
    assert list(det.state) == [("s1", k) for k in "CAB"]
