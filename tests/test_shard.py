"""Sharding: disjoint, covering, and little movement when N changes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows import Flow, Shard, shard_of
from flows.testing import ListSink, run_briefly
from sources.synthetic import SyntheticMarket, make_symbols

symbols = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=300, unique=True)


@settings(max_examples=100, deadline=None)
@given(universe=symbols, n=st.integers(1, 12))
def test_shards_are_disjoint_and_cover_the_universe(universe, n):
    parts = [Shard(k, n).select(universe) for k in range(n)]
    assert sum(len(p) for p in parts) == len(universe)
    assert sorted(s for p in parts for s in p) == sorted(universe)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9])
def test_growing_from_n_to_n_plus_1_moves_about_1_over_n_plus_1(n):
    universe = make_symbols(6000, seed=n)
    moved = sum(shard_of(s, n) != shard_of(s, n + 1) for s in universe)
    expected = len(universe) / (n + 1)
    assert abs(moved - expected) < 0.12 * expected
    # and what moves, moves to the new shard only
    assert all(shard_of(s, n + 1) == n for s in universe if shard_of(s, n) != shard_of(s, n + 1))


def test_shards_are_balanced():
    universe = make_symbols(10_000)
    sizes = [len(Shard(k, 4).select(universe)) for k in range(4)]
    assert max(sizes) - min(sizes) < 0.1 * 2500


def test_parse_errors_are_clear():
    assert Shard.parse("1/3") == Shard(1, 3)
    for bad in ("3/2", "x", "1/0", "-1/2", "1-2"):
        with pytest.raises(ValueError, match="expected k/N"):
            Shard.parse(bad)


async def test_a_sharded_run_polls_only_its_symbols():
    seen = []
    for k in range(3):
        sink = ListSink()
        flow = Flow("sh", sources=[SyntheticMarket(symbols=90, interval=0, limit=None)], sinks=[sink])
        flow.sources[0].limit = 90 * 2  # two ticks of the full universe at most
        await run_briefly(flow, shard=Shard(k, 3))
        seen.append({t.symbol for t in sink.records})
    assert set().union(*seen) == set(make_symbols(90))
    assert sum(len(s) for s in seen) == 90
