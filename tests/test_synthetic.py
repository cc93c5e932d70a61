"""sources.synthetic: determinism, share unchanged, limits, batching, metrics."""

from __future__ import annotations

import pytest

from flows import Flow
from flows.testing import ListSink, assert_component_metrics, run_briefly, sample
from sources.synthetic import SyntheticMarket, make_symbols


def test_same_seed_same_prices_and_symbols():
    a, b = SyntheticMarket(symbols=100, seed=7), SyntheticMarket(symbols=100, seed=7)
    for _ in range(5):
        assert [(t.symbol, t.price) for t in a.tick()] == [(t.symbol, t.price) for t in b.tick()]
    c = SyntheticMarket(symbols=100, seed=8)
    assert [t.price for t in c.tick()] != [t.price for t in SyntheticMarket(symbols=100, seed=7).tick()]
    assert len(set(make_symbols(5000))) == 5000
    assert make_symbols(3) == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]


@pytest.mark.parametrize("share", [0.0, 0.6, 0.9])
def test_share_of_unchanged_symbols_per_tick(share):
    market = SyntheticMarket(symbols=500, unchanged=share)
    previous = {t.symbol: t.price for t in market.tick()}
    same = total = 0
    for _ in range(40):
        for t in market.tick():
            same += previous[t.symbol] == t.price
            total += 1
            previous[t.symbol] = t.price
    assert abs(same / total - share) < 0.02


def test_timestamps_increase_and_prices_stay_positive():
    market = SyntheticMarket(symbols=10, volatility=0.5)
    stamps = []
    for _ in range(200):
        ticks = market.tick()
        assert all(t.price > 0 for t in ticks)
        stamps.append(ticks[0].ts)
    assert stamps == sorted(set(stamps))


async def test_limit_makes_it_finite_and_batches_are_split(autojump_clock):
    source = SyntheticMarket(symbols=30, interval=1.0, batch_size=8, limit=100)
    sink = ListSink()
    result, registry = await run_briefly(Flow("syn", sources=[source], sinks=[sink]))
    assert result.clean and result.reason == "exhausted"
    assert len(sink.records) == 100
    # 3 full ticks of 30 (4 batches each: 8+8+8+6) and a last tick cut to 10 (8+2)
    assert sink.batches == 3 * 4 + 2
    assert sample(registry, "flows_source_poll_cycle_seconds_count", "syn", "synthetic") == 4
    assert_component_metrics(registry, "syn", "synthetic", "source")


def test_rejects_bad_configuration():
    with pytest.raises(ValueError):
        SyntheticMarket(unchanged=1.5)
    with pytest.raises(ValueError):
        SyntheticMarket(symbols=0)
    with pytest.raises(ValueError):
        SyntheticMarket(interval=-1)
